"""Train DANet (SGD, poly LR, CE summed over the three outputs), single process or torchrun + DDP,
with periodic validation, a best checkpoint, a JSON-lines log, optional TensorBoard and plots.

    python -m models.train --preset demo        # synthetic scenes on CPU, prints val mIoU
    torchrun --nproc_per_node 8 -m models.train --preset cityscapes \\
        --data-root /data/cityscapes --pretrained-backbone resnet101-torchvision.pth

Options come from, lowest priority first: the built-in defaults, ``--preset``, ``--config``
(a YAML mapping of option names, ``-`` or ``_``; ``<out-dir>/config.yaml`` of a run is one) and
the command line.

Files in ``--out-dir``: ``config.yaml`` (the resolved options, written at start),
``log.jsonl`` (one JSON object per ``--log-interval`` iterations and per validation),
``iter_<N>.pth`` (the last ``--keep-ckpts``) with ``checkpoint.pth`` the newest of them,
``best.pth`` (the weights with the best validation mIoU), ``loss.png`` and ``miou.png`` (at the
end), ``tb/`` (TensorBoard scalars, when tensorboard is installed) and ``vis/`` (``--num-vis``).
"""
import argparse
import glob
import json
import math
import os
import re
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
from .evaluate import evaluate, format_table, metrics

PRESETS = {
    # CPU demo, trained from scratch on the synthetic scenes: the "mini" backbone (ResNet of 2
    # bottlenecks per stage at 1/8 width, output stride 8) with a deep stem. With no pretrained
    # backbone to protect, the head shares the backbone's (higher) learning rate. Validation
    # (whole image, single scale) every 200 iterations; the final evaluation at scales 1 and 1.25
    # with flip (adding 1.5 made it swing 0.026 between thread counts, see docs/models.md).
    "demo": dict(dataset="synthetic", backbone="mini", deep_stem=True, stem_width=16, aux=True,
                 align_corners=False, crop_size=96, scale_range=(0.67, 1.5), batch_size=16, iters=1400,
                 lr=0.1, head_lr_mult=1.0, eval_scales=(1.0, 1.25), eval_flip=True, out_dir="runs/demo",
                 num_vis=8, val_interval=200, log_interval=50, ckpt_every=200),
    # The paper's Cityscapes recipe, per GPU (8 GPUs: global batch 16).
    "cityscapes": dict(dataset="cityscapes", backbone="resnet101", multi_grid=True, aux=True, crop_size=768,
                       batch_size=2, iters=40000, lr=0.01, workers=4, amp="bf16", sync_bn=True,
                       eval_mode="slide", out_dir="runs/cityscapes", val_interval=4000, ckpt_every=4000),
}

# Options that describe how a run was started rather than what it computes: not written to config.yaml.
_NOT_SAVED = ("preset", "config", "resume", "stop_after")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--config", help="YAML file of options (e.g. the config.yaml of an earlier run)")
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
    m.add_argument("--scale-attention", type=float, nargs="+", metavar="SCALE",
                   help="Attention to Scale (Chen et al. 2016): run the network at these input scales "
                        "(e.g. 1 0.75 0.5) and merge the logits with learned per-pixel weights")
    m.add_argument("--scale-loss-weight", type=float, default=1.0,
                   help="weight of the loss on each scale's own logits (--scale-attention)")
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
    o.add_argument("--power", type=float, default=0.9, help="poly LR power (torch's PolynomialLR)")
    o.add_argument("--warmup-iters", type=int, default=0,
                   help="linear warm-up iterations (torch's LinearLR) before the poly decay (SequentialLR)")
    o.add_argument("--warmup-ratio", type=float, default=0.1, help="LR factor at the first warm-up iteration")
    o.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out-dir", default="runs/danet")
    r.add_argument("--ckpt-every", type=int, default=200, help="checkpoint every N iterations (and at the end)")
    r.add_argument("--keep-ckpts", type=int, default=3, help="iter_<N>.pth checkpoints kept (the newest)")
    r.add_argument("--log-interval", type=int, default=50, help="a log.jsonl line every N iterations")
    r.add_argument("--resume", nargs="?", const="auto", help="checkpoint to resume (default <out-dir>/checkpoint.pth)")
    r.add_argument("--stop-after", type=int, help="checkpoint and exit after this iteration (a planned preemption)")
    r.add_argument("--device", help="default: cuda if available, else cpu")
    r.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    r.add_argument("--no-progress", action="store_true")
    v = p.add_argument_group("validation during training")
    v.add_argument("--val-interval", type=int, default=0,
                   help="validate every N iterations (and at the end); keeps best.pth by mIoU. 0: off")
    v.add_argument("--val-mode", choices=("whole", "slide"), default="whole",
                   help="inference of the periodic validation (single scale, no flip)")
    e = p.add_argument_group("final evaluation")
    e.add_argument("--eval-mode", choices=("whole", "slide"), default="whole")
    e.add_argument("--eval-scales", type=float, nargs="+", default=[1.0])
    e.add_argument("--eval-flip", action="store_true")
    e.add_argument("--slide-stride", type=int, help="window stride of slide inference (default 2/3 of the crop)")
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


def config_to_yaml(cfg):
    """The resolved options as YAML that ``--config`` reads back (run-control options left out)."""
    import yaml

    d = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items() if k not in _NOT_SAVED}
    return yaml.safe_dump(d, sort_keys=False)


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


def build_scheduler(optimizer, cfg):
    """torch's PolynomialLR over ``iters - warmup_iters`` iterations, after a LinearLR warm-up from
    ``warmup_ratio`` when ``warmup_iters > 0`` (composed with SequentialLR). Stepped once per iteration."""
    sched = torch.optim.lr_scheduler
    poly = sched.PolynomialLR(optimizer, total_iters=max(cfg.iters - cfg.warmup_iters, 1), power=cfg.power)
    if cfg.warmup_iters <= 0:
        return poly
    warm = sched.LinearLR(optimizer, start_factor=cfg.warmup_ratio, end_factor=1.0, total_iters=cfg.warmup_iters)
    return sched.SequentialLR(optimizer, [warm, poly], milestones=[cfg.warmup_iters])


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


def _atomic_write(path, write):
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
    _atomic_write(path, lambda f: torch.save(state, f))


def _link_atomic(src, dst):
    """Make ``dst`` the same file as ``src`` (a hard link, or a copy where links are not supported), atomically."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fi:
                _atomic_write(tmp, lambda fo: fo.write(fi.read()))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _iter_ckpts(out_dir):
    """[(iteration, path)] of the iter_<N>.pth files in out_dir, oldest first."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "iter_*.pth")):
        m = re.fullmatch(r"iter_(\d+)\.pth", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _remove_stale_tmp(out_dir):
    """Temporary files left by a process killed while writing (only ever ours: ``<name>.tmp<pid>``)."""
    for path in glob.glob(os.path.join(out_dir, "*.tmp[0-9]*")):
        if re.fullmatch(r".+\.tmp\d+", os.path.basename(path)):
            os.remove(path)


def read_log(path):
    """The records of a log.jsonl (a final line cut short by a crash is skipped)."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def _truncate_log(path, iteration):
    """On resume: keep the records up to ``iteration`` (a killed run may have logged beyond its checkpoint)."""
    if os.path.exists(path):
        keep = [r for r in read_log(path) if r.get("iter", 0) <= iteration]
        _atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))


def plot_log(log_path, out_dir):
    """loss.png (each loss term and the LR against the iteration) and miou.png (validation mIoU,
    mAcc, aAcc, and the final evaluation's mIoU) from a log.jsonl. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        its = [r["iter"] for r in train]
        for key in [k for k in train[-1] if k.startswith("loss")]:
            ax.plot(its, [r.get(key, math.nan) for r in train], label=key)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (mean over the log interval)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(its, [r["lr"] for r in train], color="0.6", linestyle="--", label="lr")
        lr_ax.set_ylabel("learning rate")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = lr_ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "loss.png"))
        _atomic_write(written[-1], lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        its = [r["iter"] for r in val]
        for key in ("mIoU", "mAcc", "aAcc"):
            ax.plot(its, [r[key] for r in val], marker="o", label=key)
        final = [r for r in records if r.get("type") == "eval"]
        if final:
            ax.plot([final[-1]["iter"]], [final[-1]["mIoU"]], marker="*", markersize=12, linestyle="none",
                    color="C3", label=f"final evaluation mIoU {final[-1]['mIoU']:.4f}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out_dir, "miou.png"))
        _atomic_write(written[-1], lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
    return written


def _tensorboard(out_dir):
    """A SummaryWriter under <out-dir>/tb, or None when tensorboard is not installed (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


def output_names(cfg):
    """Names of the model's training-mode outputs, in order (see DANet.forward)."""
    names = ["fused", "pam", "cam"] + (["aux"] if cfg.aux else [])
    scales = cfg.scale_attention or ()
    return names + [f"scale{s:g}" for s in scales] if len(scales) > 1 else names


def _loss(outs, label, cfg):
    """(total loss, {term name: loss}) : CE of fused + PAM + CAM, ``aux_weight`` x the auxiliary
    head's and, with scale attention, ``scale_loss_weight`` x each scale's own."""
    weights = {"fused": 1.0, "pam": 1.0, "cam": 1.0, "aux": cfg.aux_weight}
    terms = {n: F.cross_entropy(o.float(), label, ignore_index=IGNORE_INDEX) for n, o in zip(output_names(cfg), outs)}
    total = sum(weights.get(n, cfg.scale_loss_weight) * v for n, v in terms.items())
    return total, terms


def _broadcast_buffers(model):
    """Rank 0's BatchNorm statistics to every rank (without SyncBN they drift apart per process), so
    that sharded validation evaluates exactly the model that rank 0 checkpoints."""
    for b in model.buffers():
        dist.broadcast(b, 0)


def train(cfg):
    """Run training (with periodic validation and the final evaluation) for a parsed config.
    Returns a dict with the loss of every iteration since iteration 0 (``losses``), ``miou`` and
    ``metrics`` of the final evaluation (None when stopped early), ``best`` (the best periodic
    validation: ``{"mIoU", "iter"}`` or None), the unwrapped ``model`` and ``iteration``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
    class_names = list(getattr(train_set, "classes", ())) or [str(i) for i in range(nclass)]

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
    scheduler = build_scheduler(optimizer, cfg)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model

    out = cfg.out_dir
    ckpt_path, best_path, log_path = (os.path.join(out, n) for n in ("checkpoint.pth", "best.pth", "log.jsonl"))
    if main:
        os.makedirs(out, exist_ok=True)
        _remove_stale_tmp(out)
    start, losses, best = 0, [], None
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout streams, different per rank
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else cfg.resume
        ckpt = load_file(path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, losses, best = ckpt["iteration"], list(ckpt["losses"]), ckpt.get("best")
        if len(ckpt["rng"]) == world:
            _set_rng_state(ckpt["rng"][rank], device)
        elif main:
            print(f"warning: {path} was written by {len(ckpt['rng'])} processes, resuming with {world}: "
                  "data order and dropout differ from an uninterrupted run", file=sys.stderr)
        if main:
            _truncate_log(log_path, start)
            print(f"resumed from {path} at iteration {start}")
    elif main and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run in a used folder: its log starts empty
    if main:
        _atomic_write(os.path.join(out, "config.yaml"), lambda f: f.write(config_to_yaml(cfg).encode()))
    tb = _tensorboard(out) if main else None

    def checkpoint(iteration):
        rng = [_rng_state(device)]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state(device))
        if main:
            path = os.path.join(out, f"iter_{iteration}.pth")
            save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                "losses": losses, "best": best, "rng": rng, "cfg": vars(cfg), "nclass": nclass})
            _link_atomic(path, ckpt_path)
            for _, old in _iter_ckpts(out)[:-max(cfg.keep_ckpts, 1)]:
                os.remove(old)

    def log(record):
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if tb is not None:
                kind = record["type"]
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "iter":
                        tb.add_scalar(f"{kind}/{k}", v, record["iter"])
                for name, v in record.get("IoU", {}).items():
                    if v is not None:
                        tb.add_scalar(f"val_IoU/{name}", v, record["iter"])

    def run_eval(mode, scales, flip, vis=False):
        if world > 1:
            _broadcast_buffers(model)
        conf = evaluate(model, val_set, nclass, device, vis_dir=os.path.join(out, "vis") if vis else None,
                        num_vis=cfg.num_vis, mode=mode, crop_size=cfg.crop_size, stride=cfg.slide_stride,
                        scales=scales, flip=flip, align_corners=cfg.align_corners)
        return metrics(conf)

    def validate(iteration):
        nonlocal best
        t = time.perf_counter()
        res = run_eval(cfg.val_mode, (1.0,), False)
        record = {"type": "val", "iter": iteration, "mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"],
                  "IoU": {n: None if math.isnan(v) else v for n, v in zip(class_names, res["IoU"].tolist())},
                  "time": time.perf_counter() - t}
        if best is None or res["mIoU"] > best["mIoU"]:
            best = {"mIoU": res["mIoU"], "iter": iteration}
            if main:
                save_checkpoint(best_path, {"model": model.state_dict(), "cfg": vars(cfg), "nclass": nclass,
                                            "iteration": iteration, "mIoU": res["mIoU"]})
        log(record)
        if main:
            tqdm.write(f"iter {iteration}: val mIoU {res['mIoU']:.4f}  mAcc {res['mAcc']:.4f}  aAcc {res['aAcc']:.4f}"
                       f"  (best {best['mIoU']:.4f} at {best['iter']}; {cfg.val_mode} image, {len(val_set)} images)")
        return res

    stop = min(cfg.iters, cfg.stop_after or cfg.iters)
    sampler = IterationBatchSampler(len(train_set), cfg.batch_size, rank, world, cfg.seed, start, stop)
    loader = torch.utils.data.DataLoader(
        TrainTransform(train_set, cfg.crop_size, tuple(cfg.scale_range)), batch_sampler=sampler,
        num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
        generator=torch.Generator())  # the loader must not draw from the global RNG
    global_batch = cfg.batch_size * world
    names = output_names(cfg)
    if main:
        print(f"DANet/{cfg.backbone} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
              f"{cfg.dataset}: {len(train_set)} train / {len(val_set)} val images, {nclass} classes; "
              f"{cfg.iters} iterations x {global_batch} crops of {cfg.crop_size}px on {world} x {device.type}"
              + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
              + (", scale attention " + "/".join(f"{s:g}" for s in cfg.scale_attention)
                 if cfg.scale_attention else "") + f"; logs in {out}", flush=True)
    bar = tqdm(total=cfg.iters, initial=start, disable=not main or cfg.no_progress, dynamic_ncols=True, desc="train")
    model.train()
    t0 = t_prev = time.perf_counter()
    window = {"n": 0, "data": 0.0, "step": 0.0, "terms": torch.zeros(len(names) + 1, dtype=torch.float64)}
    it = start
    for img, label in loader:
        t_data = time.perf_counter()
        img, label = img.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outs = net(img)
        loss, terms = _loss(outs, label, cfg)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        values = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        values = values.cpu().double()
        losses.append(float(values[0]))
        it += 1
        t_now = time.perf_counter()
        window["n"] += 1
        window["data"] += t_data - t_prev
        window["step"] += t_now - t_data
        window["terms"] += values
        t_prev = t_now
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}",
                        img_s=f"{(it - start) * global_batch / (t_now - t0):.1f}",
                        mem=f"{_peak_memory_mb(device):.0f}MB", refresh=False)
        bar.update(1)
        if it % cfg.log_interval == 0 or it == stop:
            n = window["n"]
            mean = (window["terms"] / n).tolist()
            log({"type": "train", "iter": it, "lr": lr, "loss": mean[0],
                 **{f"loss_{k}": v for k, v in zip(names, mean[1:])},
                 "data_time": window["data"] / n, "step_time": window["step"] / n,
                 "memory_mb": round(_peak_memory_mb(device), 1),
                 "eta_s": round((t_now - t0) / (it - start) * (cfg.iters - it), 1)})
            window = {"n": 0, "data": 0.0, "step": 0.0, "terms": torch.zeros_like(window["terms"])}
        if cfg.val_interval and (it % cfg.val_interval == 0 or it == cfg.iters):
            validate(it)
            t_prev = time.perf_counter()  # validation time is neither data nor step time
        if it % cfg.ckpt_every == 0 or it == stop:
            checkpoint(it)
    bar.close()
    result = {"losses": losses, "model": model, "iteration": it, "miou": None, "metrics": None, "best": best}
    if it < cfg.iters:
        if main:
            print(f"stopped after iteration {it}; continue with --resume")
        if tb is not None:
            tb.close()
        return result

    res = run_eval(cfg.eval_mode, cfg.eval_scales, cfg.eval_flip, vis=bool(cfg.num_vis))
    if main:
        log({"type": "eval", "iter": it, "mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"],
             "IoU": {n: None if math.isnan(v) else v for n, v in zip(class_names, res["IoU"].tolist())}})
        if tb is not None:
            tb.close()
        plots = plot_log(log_path, out)
        print(format_table(res, class_names))
        how = f"{cfg.eval_mode} image" if cfg.eval_mode == "whole" else f"{cfg.crop_size}px windows"
        how += ", scales " + "/".join(f"{s:g}" for s in cfg.eval_scales) + (", flip" if cfg.eval_flip else "")
        if best is not None:
            print(f"best periodic validation: mIoU {best['mIoU']:.4f} at iteration {best['iter']} "
                  f"({os.path.join(out, 'best.pth')})")
        print(f"wrote {log_path}, {os.path.join(out, 'config.yaml')}, {ckpt_path}"
              + "".join(f", {p}" for p in plots))
        print(f"val mAcc: {res['mAcc']:.4f}  aAcc: {res['aAcc']:.4f}")
        print(f"val mIoU: {res['mIoU']:.4f} ({len(val_set)} images, {how})")
    result["miou"], result["metrics"] = res["mIoU"], res
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
