"""Evaluation: mIoU, mAcc and aAcc (mmsegmentation's metrics) from a confusion matrix, with
whole-image or sliding-window inference, multi-scale and flip; colour-coded prediction PNGs.

    python -m models.evaluate --checkpoint runs/demo/checkpoint.pth
    python -m models.evaluate --checkpoint ckpt.pth --mode slide --crop-size 768 \\
        --scales 0.75 1.0 1.25 1.5 1.75 2.0 --flip
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE_INDEX, MEAN, STD, EvalTransform, build_dataset


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


@torch.no_grad()
def predict(model, img, nclass, mode="whole", crop_size=None, scales=(1.0,), flip=False, align_corners=True,
            stride=None):
    """Summed class probabilities [B, nclass, H, W] of a normalised image batch over scales (and flips)."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and not crop_size:
        raise ValueError("sliding-window inference needs crop_size")
    H, W = img.shape[-2:]
    infer = _whole if mode == "whole" else (lambda m, x: _slide(m, x, nclass, crop_size, stride))
    total = 0
    for s in scales:
        x = img if s == 1 else F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=align_corners)
        p = infer(model, x)
        if flip:
            p = p + infer(model, x.flip(-1)).flip(-1)
        total = total + (p if s == 1 else F.interpolate(p, (H, W), mode="bilinear", align_corners=align_corners))
    return total


def palette(nclass):
    """The PASCAL VOC colour map (bit-interleaved class index), extended to any number of classes."""
    cmap = torch.zeros(max(nclass, 1), 3, dtype=torch.uint8)
    for i in range(nclass):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = torch.tensor([r, g, b], dtype=torch.uint8)
    return cmap


def save_visual(path, img, label, pred, nclass):
    """One PNG: input image | ground truth | prediction (ignored pixels black)."""
    from PIL import Image

    cmap = torch.cat([palette(nclass), torch.zeros(1, 3, dtype=torch.uint8)])
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
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
def evaluate(model, dataset, nclass, device, vis_dir=None, num_vis=0, **predict_kw):
    """Confusion matrix of ``model`` on ``dataset`` (raw (uint8 image, label) pairs), one image at a
    time; under torch.distributed each rank takes every world_size-th image and the matrices are summed."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    data = EvalTransform(dataset)
    conf = torch.zeros(nclass, nclass, dtype=torch.int64, device=device)
    if vis_dir:
        os.makedirs(vis_dir, exist_ok=True)
    for i in range(rank, len(data), world):
        img, label = data[i]
        img, label = img[None].to(device), label.to(device)
        pred = predict(model, img, nclass, **predict_kw).argmax(1)[0]
        conf += confusion_matrix(pred, label, nclass)
        if vis_dir and i < num_vis:
            save_visual(os.path.join(vis_dir, f"{i:05d}.png"), img[0], label, pred, nclass)
    if world > 1:
        dist.all_reduce(conf)
    model.train(was_training)
    return conf.cpu()


def main(argv=None):
    from .checkpoints import build_model_from_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by models.train")
    p.add_argument("--dataset", help="default: the checkpoint's training dataset")
    p.add_argument("--data-root", help="default: the checkpoint's")
    p.add_argument("--split", default="val")
    p.add_argument("--mode", choices=("whole", "slide"), default="whole")
    p.add_argument("--crop-size", type=int, help="window of --mode slide (default: the training crop)")
    p.add_argument("--slide-stride", type=int, help="window stride of --mode slide (default 2/3 of the crop)")
    p.add_argument("--scale-attention", type=float, nargs="+", metavar="SCALE",
                   help="input scales of a model trained with --scale-attention (default: the training ones; "
                        "as many as it was trained with)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--flip", action="store_true")
    p.add_argument("--vis-dir", help="write colour-coded predictions here")
    p.add_argument("--num-vis", type=int, default=8)
    p.add_argument("--vis-attention", metavar="DIR",
                   help="write, for a few query pixels of the first --num-vis images, the image with the query "
                        "marked and its PAM attention as a heat map (danet_ops.attention_map: no NxN memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model, cfg = build_model_from_checkpoint(args.checkpoint, map_location=args.device)
    if args.scale_attention:
        model.set_scales(args.scale_attention)
    cfg = {**cfg, **{k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root)) if v}}
    dataset = build_dataset(cfg, args.split)
    if args.vis_attention:
        from .vis_attention import visualise
        paths = visualise(model, dataset, args.vis_attention, num_images=args.num_vis, device=args.device)
        print(f"attention maps: {len(paths)} PNGs in {args.vis_attention}")
    conf = evaluate(model, dataset, model.nclass, torch.device(args.device), vis_dir=args.vis_dir,
                    num_vis=args.num_vis if args.vis_dir else 0, mode=args.mode,
                    crop_size=args.crop_size or cfg["crop_size"], stride=args.slide_stride, scales=args.scales,
                    flip=args.flip, align_corners=model.align_corners)
    res = metrics(conf)
    print(format_table(res, getattr(dataset, "classes", None)))
    print(f"mAcc: {res['mAcc']:.4f}  aAcc: {res['aAcc']:.4f}")
    print(f"mIoU: {res['mIoU']:.4f}")
    return res["mIoU"]


if __name__ == "__main__":
    main()
