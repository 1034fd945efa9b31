"""Export a trained DANet checkpoint for deployment and check it against eager PyTorch.

    python -m models.export --checkpoint runs/demo/best.pth --format onnx
    python -m models.export --checkpoint runs/demo/best.pth --format aoti --output danet.pt2

``onnx``: ``torch.onnx.export`` (dynamo by default, ``--legacy`` for the TorchScript exporter); the
fused attention ops become standard ONNX ops (MatMul/Softmax/MatMul, danet_ops/_export.py) and the
result runs in ONNX Runtime (CPU). ``aoti``: ``torch.export`` + AOTInductor
(``aoti_compile_and_package``); the package keeps calling the fused ``danet_ops`` ops, so whoever
loads it must ``import danet_ops`` first (or load its ``_C`` library; docs/deploy.md).

Both exports take a dynamic input height and width (``--static`` fixes them). The check runs the
exported model and the eager model on a validation image of the checkpoint's dataset (and on the
same image at 3/4 size, to exercise the dynamic shape) and prints the largest difference of the
logits. It exits with status 1 when the relative difference exceeds ``--tol``.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from .checkpoints import build_model_from_checkpoint
from .data import build_dataset, normalize

OUTPUT_NAMES = ["logits", "pam_logits", "cam_logits"]


def validation_image(cfg, split="val", index=0):
    """A normalised [1, 3, H, W] image of the checkpoint's dataset (``cfg`` of models.train)."""
    dataset = build_dataset(cfg, split)
    img = dataset[index][0]
    return normalize(img)[None] if img.dtype == torch.uint8 else img[None].float()


def _dynamic_shapes(static):
    if static:
        return None
    dim = torch.export.Dim.DYNAMIC
    return ({2: dim, 3: dim},)


def export_onnx(model, example, path, legacy=False, static=False, opset=None):
    """Write ``model`` as ONNX to ``path``; returns a callable ``x -> tuple of numpy arrays`` (ONNX Runtime)."""
    kw = {} if opset is None else {"opset_version": opset}
    if legacy:
        dyn = None if static else {"x": {2: "height", 3: "width"}}
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"],
                          output_names=OUTPUT_NAMES, dynamic_axes=dyn, **kw)
    else:
        torch.onnx.export(model, (example,), path, dynamo=True, input_names=["x"], output_names=OUTPUT_NAMES,
                          dynamic_shapes=_dynamic_shapes(static), verbose=False, **kw)
    import onnx

    onnx.checker.check_model(path, full_check=True)
    return onnxruntime_runner(path)


def onnxruntime_runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: tuple(session.run(None, {name: x.detach().cpu().float().numpy()}))


def export_aoti(model, example, path, static=False):
    """AOTInductor package of ``model`` at ``path``; returns the loaded package (callable)."""
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(static))
    path = torch._inductor.aoti_compile_and_package(program, package_path=path)
    return torch._inductor.aoti_load_package(path)


def compare(exported, model, x):
    """(max |diff|, max |diff| / max |eager|, fraction of pixels with the same argmax) of the fused logits."""
    with torch.inference_mode():
        ref = model(x)[0].float()
    out = exported(x)[0]
    out = torch.as_tensor(out).float()
    diff = (out - ref).abs().max().item()
    rel = diff / max(ref.abs().max().item(), 1e-30)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    return diff, rel, agree


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by models.train")
    p.add_argument("--format", choices=("onnx", "aoti"), required=True)
    p.add_argument("--output", help="default: the checkpoint's path with .onnx / .pt2")
    p.add_argument("--legacy", action="store_true", help="onnx: the TorchScript exporter (dynamo=False)")
    p.add_argument("--opset", type=int, help="onnx: opset version (default: the exporter's)")
    p.add_argument("--static", action="store_true", help="fix the input size to the validation image's")
    p.add_argument("--split", default="val", help="split of the checkpoint's dataset to take the image from")
    p.add_argument("--index", type=int, default=0, help="which image of that split")
    p.add_argument("--dataset", help="default: the checkpoint's training dataset")
    p.add_argument("--data-root", help="default: the checkpoint's")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest accepted max|diff| / max|eager logit| (default 1e-4: fp32 rounding only)")
    args = p.parse_args(argv)

    model, cfg = build_model_from_checkpoint(args.checkpoint)
    model = model.float().eval()
    cfg = {**cfg, **{k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root)) if v}}
    x = validation_image(cfg, args.split, args.index)
    H, W = x.shape[-2:]
    sizes = [(H, W)] if args.static else [(H, W), (max(8, H * 3 // 4), max(8, W * 3 // 4))]
    out = args.output or os.path.splitext(args.checkpoint)[0] + (".onnx" if args.format == "onnx" else ".pt2")

    t0 = time.perf_counter()
    if args.format == "onnx":
        exported = export_onnx(model, x, out, legacy=args.legacy, static=args.static, opset=args.opset)
    else:
        exported = export_aoti(model, x, out, static=args.static)
    how = f"{args.format}{' (legacy exporter)' if args.legacy else ''}"
    print(f"exported {args.checkpoint} as {how} to {out} in {time.perf_counter() - t0:.1f} s "
          f"({'static' if args.static else 'dynamic'} input size)")

    worst = 0.0
    for h, w in sizes:
        xi = x if (h, w) == (H, W) else F.interpolate(x, (h, w), mode="bilinear", align_corners=False)
        diff, rel, agree = compare(exported, model, xi)
        worst = max(worst, rel)
        print(f"{args.split} image {args.index} at {h}x{w}: max |exported - eager| = {diff:.3e} "
              f"(relative {rel:.3e}); same argmax on {100 * agree:.2f}% of pixels")
    ok = worst <= args.tol
    print(f"{'OK' if ok else 'FAIL'}: largest relative difference {worst:.3e} (tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
