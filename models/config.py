# The options, presets and config files of `python -m models.train`; this docstring is its --help text.
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

from .danet import BACKBONES
from .data import DATASETS

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
