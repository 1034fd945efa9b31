"""``python -m models.train``: train DANet from the command line (``--help`` lists the options,
``models.config`` defines them and the presets; the loop is ``models.trainer.Trainer``).

    python -m models.train --preset demo        # synthetic scenes on CPU, prints val mIoU
    torchrun --nproc_per_node 8 -m models.train --preset cityscapes \\
        --data-root /data/cityscapes --pretrained-backbone resnet101-torchvision.pth
"""
import os
import time

import torch
import torch.distributed as dist

from .config import PRESETS, config_to_yaml, get_parser, parse_config  # noqa: F401 (the CLI's names)
from .logs import plot_log, read_log  # noqa: F401 (also importable from here)
from .trainer import Trainer


def train(cfg):
    """Run training (with periodic validation and the final evaluation) for a parsed config, on one
    process or, under torchrun (``RANK``/``WORLD_SIZE``), as one DDP rank. Returns
    ``Trainer.run()``'s dict: ``losses`` of every iteration since 0, ``miou`` and ``metrics`` of
    the final evaluation (None when stopped early), ``best``, the unwrapped ``model`` and
    ``iteration``."""
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
    try:
        return Trainer(cfg, device, rank, world).run()
    finally:
        if world > 1:
            dist.destroy_process_group()


def main(argv=None):
    t = time.perf_counter()
    cfg = parse_config(argv)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"total time: {time.perf_counter() - t:.0f} s")
    return result


if __name__ == "__main__":
    main()
