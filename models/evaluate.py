"""Evaluation: mIoU, mAcc and aAcc (mmsegmentation's metrics) from a confusion matrix, with
whole-image or sliding-window inference, multi-scale and flip; colour-coded prediction PNGs.

    python -m models.evaluate --checkpoint runs/demo/checkpoint.pth
    python -m models.evaluate --checkpoint ckpt.pth --mode slide --crop-size 768 \\
        --scales 0.75 1.0 1.25 1.5 1.75 2.0 --flip
    python -m models.evaluate --weights DANet101.pth.tar --arch danet101_cityscapes \\
        --data-root /data/cityscapes        # released / mmseg weights: the arch's protocol
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE_INDEX, MEAN, STD, EvalTransform, build_dataset
from .readers import voc_colormap   # the colour map of the visualisations when the arch gives none


def confusion_matrix(pred, target, nclass, ignore_index=IGNORE_INDEX):
    """[nclass, nclass] int64 counts, rows = ground truth, columns = prediction."""
    keep = target != ignore_index
    idx = target[keep] * nclass + pred[keep]
    return torch.bincount(idx, minlength=nclass * nclass).reshape(nclass, nclass)


def metrics(conf):
    """mmsegmentation's metrics of a confusion matrix (rows = ground truth):

    - ``IoU`` [nclass]: tp / (gt + pred - tp), NaN for a class absent from both ground truth and prediction;
    - ``Acc`` [nclass]: tp / gt (per-class recall), NaN for a class absent from the ground truth;
    - ``mIoU``, ``mAcc``: their means over the classes that are not NaN;
    - ``aAcc``: all correctly labelled pixels / all labelled pixels.
    """
    conf = conf.double()
    tp = conf.diag()
    gt, pred = conf.sum(1), conf.sum(0)
    iou = tp / (gt + pred - tp)  # 0/0 = NaN: the class is not in the evaluation
    acc = tp / gt
    return {"IoU": iou, "Acc": acc, "mIoU": float(iou.nanmean()), "mAcc": float(acc.nanmean()),
            "aAcc": float(tp.sum() / conf.sum().clamp(min=1))}


def scores(conf):
    """(per-class IoU, mIoU, aAcc): the short form of ``metrics``."""
    m = metrics(conf)
    return m["IoU"], m["mIoU"], m["aAcc"]


def _whole(model, img):
    return model(img)[0].float().softmax(1)


def _slide(model, img, nclass, crop, stride=None):
    """Average the softmax over crop x crop windows at ``stride`` (default 2/3 of the crop; the
    last window of a row or column is aligned with the edge), the image padded up to the crop."""
    H, W = img.shape[-2:]
    img = F.pad(img, (0, max(crop - W, 0), 0, max(crop - H, 0)))
    Hp, Wp = img.shape[-2:]
    stride = stride or max(1, crop * 2 // 3)
    if not 1 <= stride <= crop:
        raise ValueError(f"slide stride must be in [1, crop size {crop}], got {stride}")

    def starts(n):
        s = list(range(0, n - crop + 1, stride))
        return s if s[-1] == n - crop else s + [n - crop]

    out = img.new_zeros(img.shape[0], nclass, Hp, Wp, dtype=torch.float32)
    count = img.new_zeros(1, 1, Hp, Wp, dtype=torch.float32)
    for y in starts(Hp):
        for x in starts(Wp):
            out[..., y:y + crop, x:x + crop] += _whole(model, img[..., y:y + crop, x:x + crop])
            count[..., y:y + crop, x:x + crop] += 1
    return (out / count)[..., :H, :W]


def fit_factor(H, W, fit):
    """The resize factor that fits an H x W image into ``fit = (long, short)`` keeping its aspect
    ratio (``short=None``: the long side alone; ``fit=None``: 1)."""
    if not fit:
        return 1.0
    long, short = fit
    r = long / max(H, W)
    return min(r, short / min(H, W)) if short else r


@torch.no_grad()
def predict(model, img, nclass, mode="whole", crop_size=None, scales=(1.0,), flip=False, align_corners=True,
            stride=None, fit=None):
    """Summed class probabilities [B, nclass, H, W] of a normalised image batch over scales (and
    flips). ``fit``: first resize the image to fit ``(long, short)`` (see ``fit_factor``), the
    scales then apply to that size; the probabilities come back at the input's size."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and not crop_size:
        raise ValueError("sliding-window inference needs crop_size")
    H, W = img.shape[-2:]
    r = fit_factor(H, W, fit)
    infer = _whole if mode == "whole" else (lambda m, x: _slide(m, x, nclass, crop_size, stride))
    total = 0
    for s in scales:
        if r == 1:
            x = img if s == 1 else F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=align_corners)
        else:  # sizes rounded as mmseg's Resize rounds them
            size = (max(1, int(H * r * s + 0.5)), max(1, int(W * r * s + 0.5)))
            x = F.interpolate(img, size, mode="bilinear", align_corners=align_corners)
        p = infer(model, x)
        if flip:
            p = p + infer(model, x.flip(-1)).flip(-1)
        total = total + (p if p.shape[-2:] == (H, W) else
                         F.interpolate(p, (H, W), mode="bilinear", align_corners=align_corners))
    return total


def save_visual(path, img, label, pred, nclass, mean=MEAN, std=STD, colors=None):
    """One PNG: input image | ground truth | prediction (ignored pixels black). ``mean``/``std``: the
    image's normalisation; ``colors``: [nclass, 3] uint8 (default: the PASCAL VOC colour map)."""
    from PIL import Image

    cmap = torch.cat([voc_colormap(nclass) if colors is None else colors, torch.zeros(1, 3, dtype=torch.uint8)])
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    rgb = ((img.cpu().float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)

    def colour(lbl):
        lbl = lbl.cpu().clone()
        lbl[(lbl < 0) | (lbl >= nclass)] = nclass
        return cmap[lbl]

    Image.fromarray(torch.cat([rgb, colour(label), colour(pred)], dim=1).numpy()).save(path)


def format_table(res, class_names=None):
    """The per-class table (class name, IoU, Acc) of ``metrics()``'s result (or of a bare IoU tensor)."""
    iou, acc = (res["IoU"], res["Acc"]) if isinstance(res, dict) else (res, None)
    names = list(class_names or [str(i) for i in range(len(iou))])
    width = max(len("class"), *(len(n) for n in names))

    def cell(v):
        return "   n/a" if torch.isnan(v) else f"{float(v):.4f}"

    rows = [f"{'class':<{width}}  IoU   " + ("  Acc" if acc is not None else "")]
    for i, n in enumerate(names):
        rows.append(f"{n:<{width}}  {cell(iou[i])}" + (f"  {cell(acc[i])}" if acc is not None else ""))
    return "\n".join(rows)


@torch.no_grad()
def evaluate(model, dataset, nclass, device, vis_dir=None, num_vis=0, norm=None, colors=None, amp=None,
             **predict_kw):
    """Confusion matrix of ``model`` on ``dataset`` (raw (uint8 image, label) pairs), one image at a
    time; under torch.distributed each rank takes every world_size-th image and the matrices are
    summed. ``norm``: normalize's keywords (default ImageNet's); ``colors``: the visualisations'
    palette; ``amp``: run the model under autocast to this dtype."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    norm = norm or {}
    data = EvalTransform(dataset, **norm)
    conf = torch.zeros(nclass, nclass, dtype=torch.int64, device=device)
    if vis_dir:
        os.makedirs(vis_dir, exist_ok=True)
    for i in range(rank, len(data), world):
        img, label = data[i]
        img, label = img[None].to(device), label.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = predict(model, img, nclass, **predict_kw).argmax(1)[0]
        conf += confusion_matrix(pred, label, nclass)
        if vis_dir and i < num_vis:
            mean, std, shown = norm.get("mean", MEAN), norm.get("std", STD), img[0]
            if norm.get("bgr"):  # back to RGB for the picture
                mean, std, shown = mean[::-1], std[::-1], shown.flip(0)
            save_visual(os.path.join(vis_dir, f"{i:05d}.png"), shown, label, pred, nclass, mean, std, colors)
    if world > 1:
        dist.all_reduce(conf)
    model.train(was_training)
    return conf.cpu()


def add_inference_options(p):
    """The model and test-time options shared by models.evaluate and models.predict (defaults:
    the arch's or the checkpoint's protocol)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by models.train")
    src.add_argument("--weights", help="released DANet or mmsegmentation DANet weights (see --arch)")
    p.add_argument("--arch", help="the architecture of --weights (python -m models.archs lists them; an mmseg config "
                                  "name works too); default: the one entry the weights' keys and shapes match")
    p.add_argument("--mode", choices=("whole", "slide"), help="default: the arch's (a checkpoint: whole)")
    p.add_argument("--crop-size", type=int, help="window of --mode slide (default: the arch's, or the training crop)")
    p.add_argument("--slide-stride", type=int, help="window stride of --mode slide (default: the arch's, else 2/3 "
                                                    "of the crop)")
    p.add_argument("--scales", type=float, nargs="+", help="default: the arch's (a checkpoint: 1)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="add the flipped image's prediction "
                                                                         "(default: the arch's; a checkpoint: no)")
    p.add_argument("--fit", metavar="LONGxSHORT|LONG|none",
                   help="first resize each image, keeping its aspect ratio, to fit LONG x SHORT (or its long side "
                        "to LONG); default: the arch's (e.g. mmseg Cityscapes 2048x1024), a checkpoint: none")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype of the model")
    p.add_argument("--attention-backend", default="auto", help="danet_ops backend of PAM/CAM (--weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _parse_fit(text):
    if text.lower() == "none":
        return None
    try:
        parts = [int(v) for v in text.lower().split("x")]
        if len(parts) in (1, 2) and all(v > 0 for v in parts):
            return (parts[0], parts[1] if len(parts) == 2 else None)
    except ValueError:
        pass
    raise SystemExit(f"--fit: expected LONGxSHORT, LONG or none, got {text!r}")


def inference_setup(args):
    """(model, Arch, dataset config, predict's keywords, autocast dtype or None) from
    add_inference_options' arguments."""
    from .checkpoints import load_for_inference

    if args.arch and not args.weights:
        raise SystemExit("--arch goes with --weights (a models.train checkpoint names its own architecture)")
    model, arch, cfg = load_for_inference(args.checkpoint, args.weights, args.arch, args.device,
                                          args.attention_backend)
    t = arch.test
    kw = dict(mode=args.mode or t.mode, crop_size=args.crop_size or t.crop, stride=args.slide_stride or t.stride,
              scales=tuple(args.scales or t.scales), flip=t.flip if args.flip is None else args.flip,
              fit=t.fit if args.fit is None else _parse_fit(args.fit), align_corners=model.align_corners)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    return model, arch, cfg, kw, amp


def describe_protocol(kw):
    how = f"{kw['mode']} image" if kw["mode"] == "whole" else \
        f"{kw['crop_size']}px windows, stride {kw['stride'] or max(1, kw['crop_size'] * 2 // 3)}"
    how += ", scales " + "/".join(f"{s:g}" for s in kw["scales"]) + (", flip" if kw["flip"] else "")
    if kw["fit"]:
        how += f", fitted to {kw['fit'][0]}" + (f"x{kw['fit'][1]}" if kw["fit"][1] else " (long side)")
    return how


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_options(p)
    p.add_argument("--dataset", help="default: the arch's, or the checkpoint's training dataset")
    p.add_argument("--data-root", help="the dataset's folder (default: a checkpoint's)")
    p.add_argument("--split", default="val")
    p.add_argument("--scale-attention", type=float, nargs="+", metavar="SCALE",
                   help="input scales of a model trained with --scale-attention (default: the training ones; "
                        "as many as it was trained with)")
    p.add_argument("--vis-dir", help="write colour-coded predictions here")
    p.add_argument("--num-vis", type=int, default=8)
    p.add_argument("--vis-attention", metavar="DIR",
                   help="write, for a few query pixels of the first --num-vis images, the image with the query "
                        "marked and its PAM attention as a heat map (danet_ops.attention_map: no NxN memory)")
    args = p.parse_args(argv)

    if args.weights and not args.data_root:
        p.error("--weights needs --data-root (the folder of the dataset's standard layout)")
    model, arch, cfg, kw, amp = inference_setup(args)
    if args.scale_attention:
        model.set_scales(args.scale_attention)
    cfg = {**cfg, **{k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root)) if v}}
    dataset = build_dataset(cfg, args.split)
    if len(getattr(dataset, "classes", ())) not in (0, model.nclass):
        p.error(f"the {cfg['dataset']} dataset has {len(dataset.classes)} classes, the model {model.nclass}")
    if args.vis_attention:
        from .vis_attention import visualise
        paths = visualise(model, dataset, args.vis_attention, num_images=args.num_vis, device=args.device)
        print(f"attention maps: {len(paths)} PNGs in {args.vis_attention}")
    if args.weights:
        print(f"{arch.name} on {cfg['dataset']} {args.split} ({len(dataset)} images): {describe_protocol(kw)}")
    conf = evaluate(model, dataset, model.nclass, torch.device(args.device), vis_dir=args.vis_dir,
                    num_vis=args.num_vis if args.vis_dir else 0, norm=arch.normalization(), colors=arch.palette(),
                    amp=amp, **kw)
    res = metrics(conf)
    print(format_table(res, getattr(dataset, "classes", None)))
    print(f"mAcc: {res['mAcc']:.4f}  aAcc: {res['aAcc']:.4f}")
    print(f"mIoU: {res['mIoU']:.4f}")
    return res["mIoU"]


if __name__ == "__main__":
    main()
