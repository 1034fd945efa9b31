"""Train DANet (SGD, poly LR, CE summed over the three outputs), single process or torchrun + DDP.

    python -m models.train --preset demo        # synthetic scenes on CPU, prints val mIoU
    torchrun --nproc_per_node 8 -m models.train --preset cityscapes \\
        --data-root /data/cityscapes --pretrained-backbone resnet101-torchvision.pth

Options come from, lowest priority first: the built-in defaults, ``--preset``, ``--config``
(a YAML mapping of option names, ``-`` or ``_``) and the command line.
"""
import argparse
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoints import build_model, load_backbone_weights, load_file, load_weights
from .danet import BACKBONES
from .data import DATASETS, IGNORE_INDEX, TrainTransform, build_dataset, derive_seed
from .evaluate import evaluate, format_table, scores

PRESETS = {
    # CPU demo, trained from scratch on the synthetic scenes: the "mini" backbone (ResNet of 2
    # bottlenecks per stage at 1/8 width, output stride 8) with a deep stem. With no pretrained
    # backbone to protect, the head shares the backbone's (higher) learning rate.
    "demo": dict(dataset="synthetic", backbone="mini", deep_stem=True, stem_width=16, aux=True,
                 align_corners=False, crop_size=96, scale_range=(0.67, 1.5), batch_size=16, iters=1400,
                 lr=0.1, head_lr_mult=1.0, eval_scales=(1.0, 1.25, 1.5), eval_flip=True, out_dir="runs/demo",
                 num_vis=8),
    # The paper's Cityscapes recipe, per GPU (8 GPUs: global batch 16).
    "cityscapes": dict(dataset="cityscapes", backbone="resnet101", multi_grid=True, aux=True, crop_size=768,
                       batch_size=2, iters=40000, lr=0.01, workers=4, amp="bf16", sync_bn=True,
                       eval_mode="slide", out_dir="runs/cityscapes"),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--config", help="YAML file of options")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="synthetic")
    d.add_argument("--data-root", help="folder with the dataset's standard layout (not for synthetic)")
    d.add_argument("--synthetic-train-size", type=int, default=2000, help="synthetic images per epoch")
    d.add_argument("--synthetic-val-size", type=int, default=100)
    d.add_argument("--synthetic-size", type=int, default=160, help="synthetic image side in pixels")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic scenes")
    d.add_argument("--crop-size", type=int, default=96)
    d.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"))
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet50")
    m.add_argument("--deep-stem", action=argparse.BooleanOptionalAction, default=False)
    m.add_argument("--stem-width", type=int, default=64)
    m.add_argument("--multi-grid", action=argparse.BooleanOptionalAction, default=False,
                   help="layer4 dilations (4, 8, 16)")
    m.add_argument("--aux", action=argparse.BooleanOptionalAction, default=False, help="FCN head on layer3")
    m.add_argument("--aux-weight", type=float, default=0.4)
    m.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--attention-backend", default="auto", help="danet_ops backend of PAM/CAM")
    m.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False)
    m.add_argument("--pretrained-backbone", help="local torchvision-format ResNet ImageNet weights")
    m.add_argument("--weights", help="initial weights: released DANet, mmseg DANet or models.train checkpoint")
    o = p.add_argument_group("optimisation")
    o.add_argument("--iters", type=int, default=1000)
    o.add_argument("--batch-size", type=int, default=8, help="per process")
    o.add_argument("--lr", type=float, default=0.01, help="backbone LR; the head gets --head-lr-mult times it")
    o.add_argument("--head-lr-mult", type=float, default=10.0)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--power", type=float, default=0.9, help="poly LR power")
    o.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out-dir", default="runs/danet")
    r.add_argument("--ckpt-every", type=int, default=200, help="checkpoint every N iterations (and at the end)")
    r.add_argument("--resume", nargs="?", const="auto", help="checkpoint to resume (default <out-dir>/checkpoint.pth)")
    r.add_argument("--stop-after", type=int, help="checkpoint and exit after this iteration (a planned preemption)")
    r.add_argument("--device", help="default: cuda if available, else cpu")
    r.add_argument("--no-progress", action="store_true")
    e = p.add_argument_group("final evaluation")
    e.add_argument("--eval-mode", choices=("whole", "slide"), default="whole")
    e.add_argument("--eval-scales", type=float, nargs="+", default=[1.0])
    e.add_argument("--eval-flip", action="store_true")
    e.add_argument("--num-vis", type=int, default=0, help="prediction PNGs written to <out-dir>/vis")
    return p


def parse_config(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    defaults = dict(PRESETS[pre.preset]) if pre.preset else {}
    if pre.config:
        import yaml

        with open(pre.config) as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in p._actions}
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        bad = sorted(set(cfg) - known)
        if bad:
            p.error(f"{pre.config}: unknown options {bad}")
        defaults.update(cfg)
    p.set_defaults(**defaults)
    return p.parse_args(argv)


class IterationBatchSampler:
    """Keys ``(index, augmentation seed)`` of this rank's part of global batches ``start..iters-1``.

    Epoch ``e`` visits the dataset in a permutation drawn from ``(seed, e)``; a global batch is
    ``batch_size * world`` consecutive entries of it, split among ranks. Everything is a function
    of the iteration number, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n, batch_size, rank, world, seed, start, iters):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.start, self.iters = seed, start, iters
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the training set has {n} images, fewer than one global batch ({batch_size * world})")

    def __len__(self):
        return max(self.iters - self.start, 0)

    def __iter__(self):
        global_batch = self.batch_size * self.world
        epoch = None
        for it in range(self.start, self.iters):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
            first = (it % self.per_epoch) * global_batch + self.rank * self.batch_size
            yield [(int(perm[first + j]), derive_seed(self.seed, epoch, first + j)) for j in range(self.batch_size)]


def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, fsync, then rename over ``path`` (atomic)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _loss(outs, label, cfg):
    loss = sum(F.cross_entropy(o.float(), label, ignore_index=IGNORE_INDEX) for o in outs[:3])
    if len(outs) > 3:
        loss = loss + cfg.aux_weight * F.cross_entropy(outs[3].float(), label, ignore_index=IGNORE_INDEX)
    return loss


def train(cfg):
    """Run training (and the final evaluation) for a parsed config. Returns a dict with the loss
    of every iteration since iteration 0 (``losses``), ``miou`` (None when stopped early), the
    unwrapped ``model`` and ``iteration``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main = rank == 0
    try:
        return _train(cfg, device, rank, world, main)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(cfg, device, rank, world, main):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_set, val_set = build_dataset(vars(cfg), "train"), build_dataset(vars(cfg), "val")
    nclass = train_set.num_classes

    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    model = build_model(vars(cfg), nclass)
    if cfg.pretrained_backbone:
        load_backbone_weights(model.pretrained, cfg.pretrained_backbone)
    if cfg.weights:
        load_weights(model, cfg.weights)
    if cfg.sync_bn and world > 1:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU implementation")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    backbone_params, head_params = model.param_groups()
    optimizer = torch.optim.SGD([{"params": backbone_params, "lr": cfg.lr},
                                 {"params": head_params, "lr": cfg.lr * cfg.head_lr_mult}],
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - it / cfg.iters) ** cfg.power)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model

    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pth")
    start, losses = 0, []
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout streams, different per rank
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else cfg.resume
        ckpt = load_file(path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, losses = ckpt["iteration"], list(ckpt["losses"])
        if len(ckpt["rng"]) == world:
            _set_rng_state(ckpt["rng"][rank], device)
        elif main:
            print(f"warning: {path} was written by {len(ckpt['rng'])} processes, resuming with {world}: "
                  "data order and dropout differ from an uninterrupted run", file=sys.stderr)
        if main:
            print(f"resumed from {path} at iteration {start}")

    def checkpoint(iteration):
        rng = [_rng_state(device)]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state(device))
        if main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                "losses": losses, "rng": rng, "cfg": vars(cfg), "nclass": nclass})
            with open(os.path.join(cfg.out_dir, "losses.txt"), "w") as f:
                f.writelines(f"{i} {v:.6f}\n" for i, v in enumerate(losses))

    stop = min(cfg.iters, cfg.stop_after or cfg.iters)
    sampler = IterationBatchSampler(len(train_set), cfg.batch_size, rank, world, cfg.seed, start, stop)
    loader = torch.utils.data.DataLoader(
        TrainTransform(train_set, cfg.crop_size, tuple(cfg.scale_range)), batch_sampler=sampler,
        num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
        generator=torch.Generator())  # the loader must not draw from the global RNG
    global_batch = cfg.batch_size * world
    if main:
        print(f"DANet/{cfg.backbone} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
              f"{cfg.dataset}: {len(train_set)} train / {len(val_set)} val images, {nclass} classes; "
              f"{cfg.iters} iterations x {global_batch} crops of {cfg.crop_size}px on {world} x {device.type}"
              + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""), flush=True)
    bar = tqdm(total=cfg.iters, initial=start, disable=not main or cfg.no_progress, dynamic_ncols=True, desc="train")
    model.train()
    t0 = time.perf_counter()
    it = start
    for img, label in loader:
        img, label = img.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outs = net(img)
        loss = _loss(outs, label, cfg)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        it += 1
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}",
                        img_s=f"{(it - start) * global_batch / (time.perf_counter() - t0):.1f}",
                        mem=f"{_peak_memory_mb(device):.0f}MB", refresh=False)
        bar.update(1)
        if it % cfg.ckpt_every == 0 or it == stop:
            checkpoint(it)
    bar.close()
    result = {"losses": losses, "model": model, "iteration": it, "miou": None}
    if it < cfg.iters:
        if main:
            print(f"stopped after iteration {it}; continue with --resume")
        return result

    conf = evaluate(model, val_set, nclass, device, vis_dir=os.path.join(cfg.out_dir, "vis") if cfg.num_vis else None,
                    num_vis=cfg.num_vis, mode=cfg.eval_mode, crop_size=cfg.crop_size, scales=cfg.eval_scales,
                    flip=cfg.eval_flip, align_corners=cfg.align_corners)
    iou, miou, acc = scores(conf)
    if main:
        print(format_table(iou, list(getattr(train_set, "classes", ())) or None))
        print(f"val pixel accuracy: {acc:.4f}")
        how = f"{cfg.eval_mode} image" if cfg.eval_mode == "whole" else f"{cfg.crop_size}px windows"
        how += ", scales " + "/".join(f"{s:g}" for s in cfg.eval_scales) + (", flip" if cfg.eval_flip else "")
        print(f"val mIoU: {miou:.4f} ({len(val_set)} images, {how})")
    result["miou"] = miou
    return result


def main(argv=None):
    t = time.perf_counter()
    cfg = parse_config(argv)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"total time: {time.perf_counter() - t:.0f} s")
    return result


if __name__ == "__main__":
    main()
