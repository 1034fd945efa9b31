"""What a pixel attends to: PAM attention rows of a trained DANet as heat maps over the image.

The fused kernels never hold the N x N attention; danet_ops.attention_map rebuilds just the rows
of the chosen query pixels (O(rows * N) memory) from the PAM's own q and k. Used by
``python -m models.evaluate ... --vis-attention``.
"""
import os

import torch
import torch.nn.functional as F

import danet_ops
from .data import MEAN, STD


def _pam_modules(model):
    return [m for m in model.modules() if isinstance(m, danet_ops.PositionAttention)]


@torch.no_grad()
def pam_rows(model, img, points):
    """Attention of the query pixels `points` ((y, x) in image pixels) over the PAM's key grid.

    img: [1, 3, H, W] normalised. Returns (rows [len(points), Hk, Wk] fp32, the feature grid
    (Hq, Wq)). The first PositionAttention of the model is used (DANet has one: head.sa)."""
    pams = _pam_modules(model)
    if not pams:
        raise ValueError("the model has no danet_ops.PositionAttention (convert_attention first?)")
    pam, seen = pams[0], {}
    handle = pam.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        model(img)
    finally:
        handle.remove()
    x = seen["x"]
    Hq, Wq = x.shape[-2:]
    q, k = pam.query_conv(x), pam.key_conv(x)
    if pam.kv_pool > 1:
        k = F.max_pool2d(k, pam.kv_pool)
    H, W = img.shape[-2:]
    index = [min(int(py * Hq / H), Hq - 1) * Wq + min(int(px * Wq / W), Wq - 1) for py, px in points]
    rows = danet_ops.attention_map(q, k, index, scale=pam.scale)[0]      # [P, Nk]
    return rows.view(len(points), *k.shape[-2:]).float(), (Hq, Wq)


def save_attention_png(path, img, points, rows):
    """One PNG: per query point, the image with the point marked and its attention as a heat map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    rgb = (img[0].cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    H, W = rgb.shape[:2]
    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.2), squeeze=False)
    for ax, (py, px), row in zip(axes[0], points, rows):
        heat = F.interpolate(row[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(rgb)
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
        ax.plot([px], [py], marker="x", color="white", markersize=10, markeredgewidth=2.5)
        ax.set_title(f"query ({py}, {px})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def default_points(H, W):
    """Four query pixels spread over the image (centre and three off-centre)."""
    return [(H // 2, W // 2), (H // 4, W // 4), (H // 4, 3 * W // 4), (3 * H // 4, W // 2)]


@torch.no_grad()
def visualise(model, dataset, out_dir, num_images=4, points=None, device="cpu"):
    """Write attention PNGs for the first `num_images` images of `dataset` (an EvalTransform-like
    dataset giving normalised (img [3, H, W], label)); returns the paths."""
    from .data import EvalTransform

    was_training = model.training
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    data, paths = EvalTransform(dataset), []
    for i in range(min(num_images, len(data))):
        img, _ = data[i]
        img = img[None].to(device)
        pts = points or default_points(*img.shape[-2:])
        rows, _ = pam_rows(model, img, pts)
        path = os.path.join(out_dir, f"attention_{i:05d}.png")
        save_attention_png(path, img.cpu(), pts, rows.cpu())
        paths.append(path)
    model.train(was_training)
    return paths
