"""The training loop: SGD with torch's poly LR schedule, cross-entropy summed over DANet's outputs,
periodic validation with a best checkpoint, rotating checkpoints and exact resume, single process
or DDP. ``Trainer(cfg, device, rank, world).run()``; the CLI is ``models.train``.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoints import (atomic_write, build_model, load_backbone_weights, load_file, load_weights,
                          remove_stale_tmp, save_checkpoint, save_rotating)
from .config import config_to_yaml
from .data import IGNORE_INDEX, IterationBatchSampler, TrainTransform, build_dataset
from .evaluate import evaluate, format_table, metrics
from .logs import LossWindow, RunLog, metrics_record, peak_memory_mb, plot_log, truncate_log


def build_scheduler(optimizer, cfg):
    """torch's PolynomialLR over ``iters - warmup_iters`` iterations, after a LinearLR warm-up from
    ``warmup_ratio`` when ``warmup_iters > 0`` (composed with SequentialLR). Stepped once per iteration."""
    sched = torch.optim.lr_scheduler
    poly = sched.PolynomialLR(optimizer, total_iters=max(cfg.iters - cfg.warmup_iters, 1), power=cfg.power)
    if cfg.warmup_iters <= 0:
        return poly
    warm = sched.LinearLR(optimizer, start_factor=cfg.warmup_ratio, end_factor=1.0, total_iters=cfg.warmup_iters)
    return sched.SequentialLR(optimizer, [warm, poly], milestones=[cfg.warmup_iters])


def output_names(cfg):
    """Names of the model's training-mode outputs, in order (see DANet.forward)."""
    names = ["fused", "pam", "cam"] + (["aux"] if cfg.aux else [])
    scales = cfg.scale_attention or ()
    return names + [f"scale{s:g}" for s in scales] if len(scales) > 1 else names


def compute_loss(outs, label, cfg):
    """(total loss, {term name: loss}) : CE of fused + PAM + CAM, ``aux_weight`` x the auxiliary
    head's and, with scale attention, ``scale_loss_weight`` x each scale's own."""
    weights = {"fused": 1.0, "pam": 1.0, "cam": 1.0, "aux": cfg.aux_weight}
    terms = {n: F.cross_entropy(o.float(), label, ignore_index=IGNORE_INDEX) for n, o in zip(output_names(cfg), outs)}
    total = sum(weights.get(n, cfg.scale_loss_weight) * v for n, v in terms.items())
    return total, terms


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """One training run of a parsed config (see ``models.train``) on this process.

    The constructor builds data, model, optimizer, scheduler and gradient scaler, and restores them
    from a checkpoint with ``--resume``; ``run()`` trains to ``--iters`` (or ``--stop-after``),
    validating and checkpointing on the way, then runs the final evaluation. The order of the
    random draws (initialisation under ``seed``, then dropout under ``seed * 1000 + rank``) is
    part of the exact-resume contract: keep it.
    """

    def __init__(self, cfg, device, rank=0, world=1):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.main = rank == 0
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.train_set, self.val_set = build_dataset(vars(cfg), "train"), build_dataset(vars(cfg), "val")
        self.nclass = self.train_set.num_classes
        self.class_names = list(getattr(self.train_set, "classes", ())) or [str(i) for i in range(self.nclass)]

        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        model = build_model(vars(cfg), self.nclass)
        if cfg.pretrained_backbone:
            load_backbone_weights(model.pretrained, cfg.pretrained_backbone)
        if cfg.weights:
            load_weights(model, cfg.weights)
        if cfg.sync_bn and world > 1:
            if device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU implementation")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        self.model = model
        backbone_params, head_params = model.param_groups()
        self.optimizer = torch.optim.SGD([{"params": backbone_params, "lr": cfg.lr},
                                          {"params": head_params, "lr": cfg.lr * cfg.head_lr_mult}],
                                         lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model

        self.out = cfg.out_dir
        self.log_path = os.path.join(self.out, "log.jsonl")
        if self.main:
            os.makedirs(self.out, exist_ok=True)
            remove_stale_tmp(self.out)
        self.start, self.losses, self.best = 0, [], None
        torch.manual_seed(cfg.seed * 1000 + rank)  # dropout streams, different per rank
        if cfg.resume:
            self._resume(os.path.join(self.out, "checkpoint.pth") if cfg.resume == "auto" else cfg.resume)
        elif self.main and os.path.exists(self.log_path):
            os.remove(self.log_path)  # a fresh run in a used folder: its log starts empty
        if self.main:
            atomic_write(os.path.join(self.out, "config.yaml"), lambda f: f.write(config_to_yaml(cfg).encode()))
        self.log = RunLog(self.out, enabled=self.main)

    def _resume(self, path):
        ckpt = load_file(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start, self.losses, self.best = ckpt["iteration"], list(ckpt["losses"]), ckpt.get("best")
        if len(ckpt["rng"]) == self.world:
            set_rng_state(ckpt["rng"][self.rank], self.device)
        elif self.main:
            print(f"warning: {path} was written by {len(ckpt['rng'])} processes, resuming with {self.world}: "
                  "data order and dropout differ from an uninterrupted run", file=sys.stderr)
        if self.main:
            truncate_log(self.log_path, self.start)
            print(f"resumed from {path} at iteration {self.start}")

    # ------------------------------------------------------------------------------------------
    def checkpoint(self, iteration):
        """Everything exact resume needs, as ``iter_<iteration>.pth`` (rotated) and ``checkpoint.pth``."""
        rng = [rng_state(self.device)]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state(self.device))
        if self.main:
            save_rotating(self.out, iteration, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "iteration": iteration,
                "losses": self.losses, "best": self.best, "rng": rng, "cfg": vars(self.cfg), "nclass": self.nclass},
                self.cfg.keep_ckpts)

    def evaluate(self, mode, scales, flip, vis=False):
        """metrics() of the current weights on the validation split (sharded over the ranks)."""
        cfg = self.cfg
        if self.world > 1:
            # Rank 0's BatchNorm statistics to every rank (without SyncBN they drift apart per
            # process), so that sharded validation evaluates exactly the model rank 0 checkpoints.
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        conf = evaluate(self.model, self.val_set, self.nclass, self.device,
                        vis_dir=os.path.join(self.out, "vis") if vis else None, num_vis=cfg.num_vis, mode=mode,
                        crop_size=cfg.crop_size, stride=cfg.slide_stride, scales=scales, flip=flip,
                        align_corners=cfg.align_corners)
        return metrics(conf)

    def validate(self, iteration):
        """Periodic validation (single scale, no flip): log it, keep best.pth."""
        cfg = self.cfg
        t = time.perf_counter()
        res = self.evaluate(cfg.val_mode, (1.0,), False)
        record = {**metrics_record("val", iteration, res, self.class_names), "time": time.perf_counter() - t}
        if self.best is None or res["mIoU"] > self.best["mIoU"]:
            self.best = {"mIoU": res["mIoU"], "iter": iteration}
            if self.main:
                save_checkpoint(os.path.join(self.out, "best.pth"),
                                {"model": self.model.state_dict(), "cfg": vars(cfg), "nclass": self.nclass,
                                 "iteration": iteration, "mIoU": res["mIoU"]})
        self.log.write(record)
        if self.main:
            tqdm.write(f"iter {iteration}: val mIoU {res['mIoU']:.4f}  mAcc {res['mAcc']:.4f}  aAcc {res['aAcc']:.4f}"
                       f"  (best {self.best['mIoU']:.4f} at {self.best['iter']}; {cfg.val_mode} image, "
                       f"{len(self.val_set)} images)")
        return res

    def step(self, img, label):
        """One optimisation step. Returns (the LR it ran at, [loss, *terms] as float64, averaged over ranks)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            outs = self.net(img)
        loss, terms = compute_loss(outs, label, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        values = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        return lr, values.cpu().double()

    # ------------------------------------------------------------------------------------------
    def run(self):
        """Train, validate, checkpoint, and evaluate at the end. Returns a dict with the loss of every
        iteration since iteration 0 (``losses``), ``miou`` and ``metrics`` of the final evaluation
        (None when stopped early), ``best`` (the best periodic validation: ``{"mIoU", "iter"}`` or
        None), the unwrapped ``model`` and ``iteration``."""
        cfg, device, start = self.cfg, self.device, self.start
        stop = min(cfg.iters, cfg.stop_after or cfg.iters)
        sampler = IterationBatchSampler(len(self.train_set), cfg.batch_size, self.rank, self.world, cfg.seed,
                                        start, stop)
        loader = torch.utils.data.DataLoader(
            TrainTransform(self.train_set, cfg.crop_size, tuple(cfg.scale_range)), batch_sampler=sampler,
            num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
            generator=torch.Generator())  # the loader must not draw from the global RNG
        global_batch = cfg.batch_size * self.world
        names = output_names(cfg)
        if self.main:
            self._print_header(global_batch)
        bar = tqdm(total=cfg.iters, initial=start, disable=not self.main or cfg.no_progress, dynamic_ncols=True,
                   desc="train")
        self.model.train()
        t0 = t_prev = time.perf_counter()
        window = LossWindow(len(names) + 1)
        it = start
        for img, label in loader:
            t_data = time.perf_counter()
            img, label = img.to(device, non_blocking=True), label.to(device, non_blocking=True)
            lr, values = self.step(img, label)
            self.losses.append(float(values[0]))
            it += 1
            t_now = time.perf_counter()
            window.add(values, t_data - t_prev, t_now - t_data)
            t_prev = t_now
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}", lr=f"{lr:.2e}",
                            img_s=f"{(it - start) * global_batch / (t_now - t0):.1f}",
                            mem=f"{peak_memory_mb(device):.0f}MB", refresh=False)
            bar.update(1)
            if it % cfg.log_interval == 0 or it == stop:
                mean, data_time, step_time = window.means()
                self.log.write({"type": "train", "iter": it, "lr": lr, "loss": mean[0],
                                **{f"loss_{k}": v for k, v in zip(names, mean[1:])},
                                "data_time": data_time, "step_time": step_time,
                                "memory_mb": round(peak_memory_mb(device), 1),
                                "eta_s": round((t_now - t0) / (it - start) * (cfg.iters - it), 1)})
                window.reset()
            if cfg.val_interval and (it % cfg.val_interval == 0 or it == cfg.iters):
                self.validate(it)
                t_prev = time.perf_counter()  # validation time is neither data nor step time
            if it % cfg.ckpt_every == 0 or it == stop:
                self.checkpoint(it)
        bar.close()
        result = {"losses": self.losses, "model": self.model, "iteration": it, "miou": None, "metrics": None,
                  "best": self.best}
        if it < cfg.iters:
            if self.main:
                print(f"stopped after iteration {it}; continue with --resume")
            self.log.close()
            return result
        res = self.evaluate(cfg.eval_mode, cfg.eval_scales, cfg.eval_flip, vis=bool(cfg.num_vis))
        if self.main:
            self.log.write(metrics_record("eval", it, res, self.class_names))
            self.log.close()
            self._print_summary(res)
        result["miou"], result["metrics"] = res["mIoU"], res
        return result

    def _print_header(self, global_batch):
        cfg, device = self.cfg, self.device
        print(f"DANet/{cfg.backbone} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters), "
              f"{cfg.dataset}: {len(self.train_set)} train / {len(self.val_set)} val images, {self.nclass} classes; "
              f"{cfg.iters} iterations x {global_batch} crops of {cfg.crop_size}px on {self.world} x {device.type}"
              + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
              + (", scale attention " + "/".join(f"{s:g}" for s in cfg.scale_attention)
                 if cfg.scale_attention else "") + f"; logs in {self.out}", flush=True)

    def _print_summary(self, res):
        cfg, out = self.cfg, self.out
        plots = plot_log(self.log_path, out)
        print(format_table(res, self.class_names))
        how = f"{cfg.eval_mode} image" if cfg.eval_mode == "whole" else f"{cfg.crop_size}px windows"
        how += ", scales " + "/".join(f"{s:g}" for s in cfg.eval_scales) + (", flip" if cfg.eval_flip else "")
        if self.best is not None:
            print(f"best periodic validation: mIoU {self.best['mIoU']:.4f} at iteration {self.best['iter']} "
                  f"({os.path.join(out, 'best.pth')})")
        print(f"wrote {self.log_path}, {os.path.join(out, 'config.yaml')}, {os.path.join(out, 'checkpoint.pth')}"
              + "".join(f", {p}" for p in plots))
        print(f"val mAcc: {res['mAcc']:.4f}  aAcc: {res['aAcc']:.4f}")
        print(f"val mIoU: {res['mIoU']:.4f} ({len(self.val_set)} images, {how})")
