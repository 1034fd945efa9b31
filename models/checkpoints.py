"""Weights in and out: torchvision ImageNet ResNets into the backbone, released DANet checkpoints,
mmsegmentation DAHead checkpoints (converted), named architectures (``models.archs``), and this
trainer's own checkpoints, written atomically and rotated (``iter_<N>.pth``, ``checkpoint.pth``
the newest).

    python -m models.checkpoints mmseg2danet danet_r50-d8_cityscapes.pth danet_r50.pth
"""
import argparse
import glob
import os
import re

import torch

from .danet import DANet


def _numpy_scalar_globals():
    """What unpickling numpy scalars and dtypes needs (plain data, no code): older checkpoints hold
    some beside the weights (the released DANet's ``best_pred``), pickled as numpy 1.x named them."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_file(path):
    """torch.load on CPU (``weights_only``: tensors and plain data, numpy scalars included) with a
    clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same thing here
        raise RuntimeError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def state_dict_of(obj, where="checkpoint"):
    """The state dict inside a checkpoint (bare, or under "state_dict"/"model"), "module." prefixes removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{where}: expected a state dict (name -> tensor), bare or under 'state_dict' or 'model'")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone_weights(backbone, path):
    """Load torchvision-format ResNet ImageNet weights (``conv1``, ``bn1``, ``layerK.*``; ``fc.*``
    ignored) from a local file into ``DANet.pretrained``. Dilation does not change any shape."""
    sd = {k: v for k, v in state_dict_of(load_file(path), path).items() if not k.startswith("fc.")}
    try:
        backbone.load_state_dict(sd)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: not a torchvision ResNet of this backbone's depth/stem: {e}") from None


# mmsegmentation EncoderDecoder(ResNetV1c, DAHead, FCNHead) -> released DANet names. A key maps by
# its longest matching prefix; ``None`` drops it.
_MMSEG = {
    "backbone.stem.0": "pretrained.conv1.0", "backbone.stem.1": "pretrained.conv1.1",
    "backbone.stem.3": "pretrained.conv1.3", "backbone.stem.4": "pretrained.conv1.4",
    "backbone.stem.6": "pretrained.conv1.6", "backbone.stem.7": "pretrained.bn1",
    "backbone": "pretrained",
    "decode_head.pam_in_conv.conv": "head.conv5a.0", "decode_head.pam_in_conv.bn": "head.conv5a.1",
    "decode_head.pam.query_project": "head.sa.query_conv", "decode_head.pam.key_project": "head.sa.key_conv",
    "decode_head.pam.value_project": "head.sa.value_conv", "decode_head.pam.gamma.scale": "head.sa.gamma",
    "decode_head.pam_out_conv.conv": "head.conv51.0", "decode_head.pam_out_conv.bn": "head.conv51.1",
    "decode_head.pam_conv_seg": "head.conv6.1",
    "decode_head.cam_in_conv.conv": "head.conv5c.0", "decode_head.cam_in_conv.bn": "head.conv5c.1",
    "decode_head.cam.gamma.scale": "head.sc.gamma",
    "decode_head.cam_out_conv.conv": "head.conv52.0", "decode_head.cam_out_conv.bn": "head.conv52.1",
    "decode_head.cam_conv_seg": "head.conv7.1",
    "decode_head.conv_seg": "head.conv8.1",
    "auxiliary_head.convs.0.conv": "auxlayer.conv5.0", "auxiliary_head.convs.0.bn": "auxlayer.conv5.1",
    "auxiliary_head.conv_seg": "auxlayer.conv5.4",
    "data_preprocessor": None,
}


def convert_mmseg(sd):
    """Convert an mmsegmentation DANet state dict (``configs/danet``: ResNetV1c backbone, DAHead,
    FCNHead auxiliary head) to the released layout. ``Scale`` gammas (0-dim) become shape [1].
    Build the model to load it into with ``deep_stem=True, stem_width=32, align_corners=False``
    (and ``aux=True`` when the checkpoint has an auxiliary head)."""
    out, unknown = {}, []
    for key, value in state_dict_of(sd, "mmseg checkpoint").items():
        match = max((p for p in _MMSEG if key == p or key.startswith(p + ".")), key=len, default=None)
        if match is None:
            unknown.append(key)
        elif _MMSEG[match] is not None:
            out[_MMSEG[match] + key[len(match):]] = value.reshape(1) if key.endswith("gamma.scale") else value
    if unknown:
        raise ValueError(f"not an mmsegmentation DANet checkpoint: no mapping for {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    return out


def read_weights(path):
    """The state dict of a weights file in the released layout: mmseg checkpoints converted, a
    trainer checkpoint's model, ``module.`` prefixes and the backbone's ``pretrained.fc.*`` removed."""
    sd = state_dict_of(load_file(path), path)
    if any(k.startswith("decode_head.") for k in sd):
        sd = convert_mmseg(sd)
    return {k: v for k, v in sd.items() if not k.startswith("pretrained.fc.")}


def shape_diff(expected, got, limit=5):
    """Lines naming the first keys missing from ``got``, unexpected in it, and of another shape
    (``expected``/``got``: {key: shape}); empty when they match. A BatchNorm's
    ``num_batches_tracked`` may be missing (files of torch < 0.4.1; load_state_dict fills it in)."""
    missing = [k for k in expected if k not in got and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in got if k not in expected]
    shape = [k for k in expected if k in got and tuple(expected[k]) != tuple(got[k])]
    lines = []
    for what, keys, fmt in (
            ("missing from the file", missing, lambda k: f"{k} {list(expected[k])}"),
            ("not in the model", unexpected, lambda k: f"{k} {list(got[k])}"),
            ("of another shape", shape, lambda k: f"{k}: model {list(expected[k])}, file {list(got[k])}")):
        if keys:
            more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
            lines.append(f"  {len(keys)} {what}: " + "; ".join(fmt(k) for k in keys[:limit]) + more)
    return lines


def candidate_archs(path):
    """Names of the entries of ``models.archs`` whose keys and shapes match the weights in ``path``."""
    from .archs import candidates

    return candidates({k: tuple(v.shape) for k, v in read_weights(path).items()}, path)


def load_weights(model, path, arch=None, attention_backend="auto"):
    """Load released DANet weights, mmseg DANet weights (converted) or a checkpoint of this trainer
    into ``model``, or, with ``model=None``, into a new model of the named architecture ``arch``
    (``models.archs``; when ``arch`` is None too, the one entry whose keys and shapes the file
    matches; several or none is an error naming them). Every key and shape must match; a mismatch
    is an error naming the first differing keys and shapes (nothing is loaded). Returns the model."""
    return _load(model, read_weights(path), path, arch, attention_backend)[0]


def _load(model, sd, path, arch, attention_backend):
    """load_weights on a state dict read from ``path``: (model, the Arch entry or None)."""
    from .archs import arch_for_filename, candidates, get_arch

    if model is not None and arch is not None:
        raise TypeError("load_weights takes a model or an arch, not both")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if model is None:
        if arch is None:
            found = candidates(shapes, path)
            named = arch_for_filename(path)  # mmseg's file names start with the config's
            if len(found) > 1 and named is not None and named.name in found:
                found = [named.name]
            if len(found) != 1:
                raise ValueError(f"{path}: name the architecture (arch=, --arch); the weights' keys and shapes match "
                                 + (", ".join(found) if found else "no named arch (python -m models.archs lists them)"))
            arch = found[0]
        arch = get_arch(arch)
        model = arch.build(attention_backend)
    diff = shape_diff({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes)
    if diff:
        found = candidates(shapes, path)
        what = f"arch {arch.name}" if arch is not None else "this DANet (backbone, deep stem, aux head, classes?)"
        raise RuntimeError(f"{path}: does not match {what}:\n" + "\n".join(diff) + "\n  the file matches "
                           + (f"the archs {', '.join(found)}" if found else "no named arch"))
    model.load_state_dict(sd)
    return model, arch


def build_model(cfg, nclass):
    """DANet from a training config dict (see models.train)."""
    return DANet(nclass, backbone=cfg["backbone"], aux=cfg["aux"], deep_stem=cfg["deep_stem"],
                 stem_width=cfg["stem_width"], multi_grid=cfg["multi_grid"],
                 align_corners=cfg["align_corners"], attention_backend=cfg["attention_backend"],
                 scale_attention=cfg.get("scale_attention"))


def build_model_from_checkpoint(path, map_location="cpu"):
    """(model with weights, training config) from a checkpoint written by models.train."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a models.train checkpoint (no 'cfg'/'model'); "
                         "build DANet yourself and use load_weights() for released or mmseg weights")
    model = build_model(ckpt["cfg"], ckpt["nclass"])
    model.load_state_dict(ckpt["model"])
    return model.to(map_location), ckpt["cfg"]


def load_for_inference(checkpoint=None, weights=None, arch=None, device="cpu", attention_backend="auto"):
    """(model in eval mode on ``device``, its ``models.archs.Arch``, dataset config) for a
    ``models.train`` checkpoint (its training config), or for released / mmseg ``weights`` of the
    named ``arch`` (None: the one entry the weights' keys and shapes match; ``{"dataset": ...}``)."""
    from .archs import arch_of_checkpoint

    if (checkpoint is None) == (weights is None):
        raise ValueError("give a models.train checkpoint or weights (with their arch), one of the two")
    if checkpoint is not None:
        model, cfg = build_model_from_checkpoint(checkpoint)
        spec = arch_of_checkpoint(cfg)
    else:
        model, spec = _load(None, read_weights(weights), weights, arch, attention_backend)
        cfg = {"dataset": spec.dataset}
    return model.to(device).eval(), spec, cfg


# ----------------------------------------------------------------------------------------------
# Writing: atomic files, the trainer's rotating checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_write(path, write):
    """``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``: a
    reader (or a crash at any point) sees the old file or the new one, never a partial one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state):
    """torch.save ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(state, f))


def _link_atomic(src, dst):
    """Make ``dst`` the same file as ``src`` (a hard link, or a copy where links are not supported), atomically."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fi:
                atomic_write(tmp, lambda fo: fo.write(fi.read()))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def iter_checkpoints(out_dir):
    """[(iteration, path)] of the iter_<N>.pth files in out_dir, oldest first."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "iter_*.pth")):
        m = re.fullmatch(r"iter_(\d+)\.pth", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_rotating(out_dir, iteration, state, keep):
    """Write ``<out_dir>/iter_<iteration>.pth`` atomically, make ``checkpoint.pth`` a hard link to it
    (atomically replaced) and delete all but the newest ``keep`` (at least 1) ``iter_*.pth``."""
    path = os.path.join(out_dir, f"iter_{iteration}.pth")
    save_checkpoint(path, state)
    _link_atomic(path, os.path.join(out_dir, "checkpoint.pth"))
    for _, old in iter_checkpoints(out_dir)[:-max(keep, 1)]:
        os.remove(old)


def remove_stale_tmp(out_dir):
    """Temporary files left by a process killed while writing (only ever ours: ``<name>.tmp<pid>``)."""
    for path in glob.glob(os.path.join(out_dir, "*.tmp[0-9]*")):
        if re.fullmatch(r".+\.tmp\d+", os.path.basename(path)):
            os.remove(path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert checkpoints to the released DANet layout.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("mmseg2danet", help="mmsegmentation DANet checkpoint -> released DANet state dict")
    c.add_argument("src")
    c.add_argument("dst")
    args = p.parse_args(argv)
    sd = convert_mmseg(load_file(args.src))
    torch.save(sd, args.dst)
    print(f"wrote {len(sd)} tensors to {args.dst}")


if __name__ == "__main__":
    main()
