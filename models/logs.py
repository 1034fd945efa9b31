"""The run's log: ``log.jsonl`` (one JSON object a line), optional TensorBoard scalars, the
training window's means, and the ``loss.png`` / ``miou.png`` plots drawn from the log.
"""
import json
import math
import os
import resource

import torch

from .checkpoints import atomic_write


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


def truncate_log(path, iteration):
    """On resume: keep the records up to ``iteration`` (a killed run may have logged beyond its checkpoint)."""
    if os.path.exists(path):
        keep = [r for r in read_log(path) if r.get("iter", 0) <= iteration]
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))


def peak_memory_mb(device):
    """Peak memory of this process: GPU allocated on CUDA, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def _tensorboard(out_dir):
    """A SummaryWriter under <out-dir>/tb, or None when tensorboard is not installed (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


class RunLog:
    """Appends records to ``<out_dir>/log.jsonl`` and, when tensorboard is installed, their numbers
    to ``<out_dir>/tb`` (``<type>/<key>``, per-class IoU as ``val_IoU/<name>``). Off (writes
    nothing) on the processes other than rank 0."""

    def __init__(self, out_dir, enabled=True):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.enabled = enabled
        self.tb = _tensorboard(out_dir) if enabled else None

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind = record["type"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iter":
                    self.tb.add_scalar(f"{kind}/{k}", v, record["iter"])
            for name, v in record.get("IoU", {}).items():
                if v is not None:
                    self.tb.add_scalar(f"val_IoU/{name}", v, record["iter"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


class LossWindow:
    """Sums over the iterations since the last ``--log-interval`` record: the loss and its terms,
    the time waiting for data and the time of the step."""

    def __init__(self, n_values):
        self.n_values = n_values
        self.reset()

    def reset(self):
        self.n, self.data, self.step = 0, 0.0, 0.0
        self.terms = torch.zeros(self.n_values, dtype=torch.float64)

    def add(self, values, data_time, step_time):
        self.n += 1
        self.data += data_time
        self.step += step_time
        self.terms += values

    def means(self):
        """(mean of each value, mean data time, mean step time) over the window."""
        return (self.terms / self.n).tolist(), self.data / self.n, self.step / self.n


def metrics_record(kind, iteration, res, class_names):
    """A log record of ``evaluate.metrics()``'s result (per-class IoU by name, NaN as null)."""
    return {"type": kind, "iter": iteration, "mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"],
            "IoU": {n: None if math.isnan(v) else v for n, v in zip(class_names, res["IoU"].tolist())}}


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
        atomic_write(written[-1], lambda f: fig.savefig(f, format="png", dpi=100))
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
        atomic_write(written[-1], lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
    return written
