"""models.train (config, trainer, checkpoints, logs) and models.evaluate: training, periodic
validation, checkpoints, logs, exact resume (also after SIGKILL), DDP on CPU, config, schedulers,
metrics, inference."""
import glob
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models import evaluate as ev
from models import train as tr
from models.checkpoints import build_model, build_model_from_checkpoint
from models.config import _NOT_SAVED
from models.logs import read_log
from models.trainer import build_scheduler
from models.data import SYNTHETIC_CLASSES

ROOT = Path(__file__).resolve().parents[1]

TINY = ("--backbone mini --aux --synthetic-size 48 --crop-size 48 --synthetic-train-size 16 "
        "--synthetic-val-size 4 --batch-size 4 --lr 0.05 --no-progress").split()


def run(out_dir, *extra):
    return tr.train(tr.parse_config([*TINY, "--out-dir", str(out_dir), *extra]))


def _majority_baseline(cfg):
    """(pixel share of the most frequent val class, mIoU of predicting it everywhere)."""
    from models.data import IGNORE_INDEX, build_dataset
    val = build_dataset(vars(cfg), "val")
    labels = torch.cat([val[i][1].flatten().long() for i in range(len(val))])
    counts = torch.bincount(labels[labels != IGNORE_INDEX], minlength=len(SYNTHETIC_CLASSES))
    p_major = (counts.max() / counts.sum()).item()
    return p_major, p_major / int((counts > 0).sum())   # IoU p for it, 0 for each other present class


def test_training_reduces_loss_and_reports_miou(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without tensorboard installed
    result = run(tmp_path, "--iters", "40", "--synthetic-train-size", "8", "--num-vis", "2", "--val-interval", "15",
                 "--log-interval", "10", "--ckpt-every", "10", "--keep-ckpts", "2")
    losses = result["losses"]
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    # It learned: at least the class prior. Predicting the most frequent class of the val labels
    # everywhere scores aAcc = its pixel share p and mIoU = p / (classes present); 40 steps on 8
    # images reach that (measured: exactly it, background everywhere), far above chance (uniform:
    # aAcc 1/6) and the untrained model (measured: mIoU 0.03, aAcc 0.11). Margin 10%: a few boundary
    # pixels may flip with another CPU's float summation order.
    p_major, prior_miou = _majority_baseline(tr.parse_config([*TINY, "--synthetic-train-size", "8"]))
    assert result["metrics"]["aAcc"] >= 0.9 * p_major, (result["metrics"]["aAcc"], p_major)
    assert result["miou"] >= 0.9 * prior_miou, (result["miou"], prior_miou)
    out = capsys.readouterr().out
    assert f"val mIoU: {result['miou']:.4f}" in out and f"val mAcc: {result['metrics']['mAcc']:.4f}" in out
    assert all(name in out for name in SYNTHETIC_CLASSES)  # the per-class table shows names
    assert sorted(os.listdir(tmp_path / "vis")) == ["00000.png", "00001.png"]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 40 and ckpt["losses"] == losses
    # the last --keep-ckpts checkpoints; checkpoint.pth is the newest; no tensorboard folder without tensorboard
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "checkpoint.pth", "config.yaml", "iter_30.pth", "iter_40.pth",
                                            "log.jsonl", "loss.png", "miou.png", "vis"]
    assert os.path.samefile(tmp_path / "checkpoint.pth", tmp_path / "iter_40.pth")

    records = read_log(tmp_path / "log.jsonl")
    train_recs = [r for r in records if r["type"] == "train"]
    val_recs = [r for r in records if r["type"] == "val"]
    assert [r["iter"] for r in train_recs] == [10, 20, 30, 40] and [r["iter"] for r in val_recs] == [15, 30, 40]
    for r in train_recs:
        assert {"lr", "loss", "loss_fused", "loss_pam", "loss_cam", "loss_aux", "data_time", "step_time",
                "memory_mb", "eta_s"} <= set(r)
        # the logged loss is the window mean of the weighted sum of the terms
        assert r["loss"] == pytest.approx(r["loss_fused"] + r["loss_pam"] + r["loss_cam"] + 0.4 * r["loss_aux"])
    assert train_recs[0]["loss"] == pytest.approx(sum(losses[:10]) / 10) and train_recs[-1]["eta_s"] == 0
    for r in val_recs:
        assert list(r["IoU"]) == list(SYNTHETIC_CLASSES) and all(0 <= r[k] <= 1 for k in ("mIoU", "mAcc", "aAcc"))
    best = max(val_recs, key=lambda r: r["mIoU"])
    assert result["best"] == {"mIoU": best["mIoU"], "iter": best["iter"]}
    best_ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    assert (best_ckpt["iteration"], best_ckpt["mIoU"]) == (best["iter"], best["mIoU"])
    # best.pth is an evaluator checkpoint; the whole-image protocol reproduces the logged validation
    assert ev.main(["--checkpoint", str(tmp_path / "best.pth")]) == best["mIoU"]
    # the final evaluation of the last weights (whole image here) equals the validation at the last iteration
    assert result["miou"] == val_recs[-1]["mIoU"]

    # config.yaml reproduces the run's options
    again = tr.parse_config(["--config", str(tmp_path / "config.yaml")])
    skip = set(_NOT_SAVED)
    assert {k: v for k, v in vars(again).items() if k not in skip} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in vars(tr.parse_config(
            [*TINY, "--out-dir", str(tmp_path), "--iters", "40", "--synthetic-train-size", "8", "--num-vis", "2",
             "--val-interval", "15", "--log-interval", "10", "--ckpt-every", "10", "--keep-ckpts", "2"])).items()
         if k not in skip}

    # the evaluator CLI on that checkpoint: same whole-image mIoU; slide/multi-scale/flip run
    assert ev.main(["--checkpoint", str(tmp_path / "checkpoint.pth")]) == pytest.approx(result["miou"])
    miou = ev.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--mode", "slide", "--crop-size", "32",
                    "--scales", "0.75", "1.0", "--flip", "--vis-dir", str(tmp_path / "ev"), "--num-vis", "1"])
    # slide / multi-scale / flip of the same weights: the same prior at least (10% margin as above)
    assert 0.9 * prior_miou <= miou <= 1.0 and os.listdir(tmp_path / "ev") == ["00000.png"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    opts = ("--iters", "6", "--warmup-iters", "2", "--val-interval", "2", "--log-interval", "1")
    full = run(tmp_path / "full", *opts)
    stopped = run(tmp_path / "cut", *opts, "--stop-after", "3", "--ckpt-every", "2")
    assert stopped["miou"] is None and stopped["losses"] == full["losses"][:3]
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["iteration"] == 3
    resumed = run(tmp_path / "cut", *opts, "--ckpt-every", "2", "--resume")
    # exact: same batches, augmentations, dropout, optimizer and scheduler (warm-up + poly) state
    assert resumed["losses"] == full["losses"] and resumed["miou"] == full["miou"]
    assert resumed["best"] == full["best"]
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, resumed["model"].state_dict()[k]), k
    strip = [{k: v for k, v in r.items() if k not in ("data_time", "step_time", "memory_mb", "eta_s", "time")}
             for r in read_log(tmp_path / "full" / "log.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in ("data_time", "step_time", "memory_mb", "eta_s", "time")}
                     for r in read_log(tmp_path / "cut" / "log.jsonl")]
    assert not glob.glob(str(tmp_path / "cut" / "*.tmp*"))
    with pytest.raises(FileNotFoundError, match="nowhere.*checkpoint.pth: checkpoint file not found"):
        run(tmp_path / "nowhere", "--iters", "6", "--resume")


def test_sigkill_between_checkpoints_then_resume(tmp_path):
    """An unplanned crash: SIGKILL a training process after its first checkpoint, restart with
    --resume: the final weights equal an uninterrupted run's and nothing half-written remains."""
    threads = str(torch.get_num_threads())  # the same float summation order in both processes
    opts = ("--iters", "12", "--ckpt-every", "4", "--val-interval", "4", "--log-interval", "1", "--keep-ckpts", "2",
            "--threads", threads)
    full = run(tmp_path / "full", *opts)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "models.train", *TINY, *opts, "--out-dir", str(cut)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": threads})
    try:  # kill it as soon as it has trained past its first checkpoint (iteration 4)
        while not any(r.get("iter", 0) > 4 for r in read_log(cut / "log.jsonl")):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(cut / "checkpoint.pth", weights_only=True)["iteration"]
    assert killed_at in (4, 8)  # it died between two checkpoints, before the end
    for path in cut.glob("*.pth"):  # every checkpoint on disk is whole (written to a temporary file, then renamed)
        torch.load(path, weights_only=True)

    resumed = run(cut, *opts, "--resume")
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, resumed["model"].state_dict()[k]), k
    assert resumed["losses"] == full["losses"] and resumed["miou"] == full["miou"]
    assert not [p for p in os.listdir(cut) if ".tmp" in p]
    with open(cut / "log.jsonl") as f:
        records = [json.loads(line) for line in f]  # every line whole
    assert [r["iter"] for r in records if r["type"] == "train"] == list(range(1, 13))
    assert [r["iter"] for r in records if r["type"] == "val"] == [4, 8, 12]
    assert sorted(p.name for p in cut.glob("iter_*.pth")) == ["iter_12.pth", "iter_8.pth"]


def test_poly_scheduler_with_warmup_and_its_state():
    cfg = tr.parse_config(["--iters", "10", "--warmup-iters", "3", "--warmup-ratio", "0.25", "--lr", "0.1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if len(lrs) == 5:  # a scheduler restored from a state dict continues identically
            opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            sched2 = build_scheduler(opt2, cfg)  # built as the trainer does, then both states loaded
            opt2.load_state_dict(opt.state_dict())
            sched2.load_state_dict(sched.state_dict())
    # warm-up 0.25 -> 1 over 3 iterations (LinearLR), then (1 - t/7)^0.9 over the remaining 7 (PolynomialLR)
    expect = [0.1 * (0.25 + 0.75 * t / 3) for t in range(3)] + [0.1 * (1 - t / 7) ** 0.9 for t in range(7)]
    assert lrs == pytest.approx(expect, rel=1e-12)  # chained products of the closed form: rounding only
    for t in range(5, 10):
        assert opt2.param_groups[0]["lr"] == lrs[t]
        opt2.step()
        sched2.step()
    plain = build_scheduler(opt, tr.parse_config(["--iters", "10"]))
    assert isinstance(plain, torch.optim.lr_scheduler.PolynomialLR)


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")  # optional dependency: absent in CI
    run(tmp_path, "--iters", "2", "--val-interval", "2", "--log-interval", "1", "--synthetic-val-size", "1")
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # fp16: the scaler skips a step
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs(tmp_path, amp):
    losses = run(tmp_path, "--iters", "2", "--amp", amp, "--synthetic-val-size", "1")["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = tr.train(tr.parse_config([*TINY, "--batch-size", "2", "--iters", "3", "--out-dir", out_dir,
                                       "--val-interval", "3"]))
    torch.save({"model": result["model"].state_dict(), "losses": result["losses"], "miou": result["miou"]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    init = build_model(vars(tr.parse_config(TINY)), 6).state_dict()
    for k, v in r0["model"].items():  # gradients were averaged: both ranks hold the same weights
        if "running" not in k and "num_batches" not in k:  # BN statistics are per process (no SyncBN on CPU)
            assert torch.equal(v, r1["model"][k]), k
    assert not torch.equal(r0["model"]["head.conv8.1.weight"], init["head.conv8.1.weight"])
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 3  # the logged loss is the mean over ranks
    assert r0["miou"] == r1["miou"]  # confusion matrices summed over ranks
    assert len(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["rng"]) == 2
    # the validation, sharded over the ranks with the confusion matrices summed, is exactly a
    # single-process evaluation of the model rank 0 checkpointed (BN statistics broadcast from rank 0)
    val = [r for r in read_log(tmp_path / "log.jsonl") if r["type"] == "val"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        model, cfg = build_model_from_checkpoint(str(tmp_path / "checkpoint.pth"))
        res = ev.metrics(ev.evaluate(model, ev.build_dataset(cfg, "val"), 6, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert len(val) == 1 and val[0]["mIoU"] == res["mIoU"] and val[0]["aAcc"] == res["aAcc"]
    assert r0["miou"] == res["mIoU"]


def test_config_precedence(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("crop-size: 64\nlr: 0.5\nbackbone: resnet101\n")
    cfg = tr.parse_config(["--preset", "demo", "--config", str(cfg_file), "--lr", "0.2"])
    assert (cfg.dataset, cfg.crop_size, cfg.lr, cfg.backbone) == ("synthetic", 64, 0.2, "resnet101")
    cfg_file.write_text("crop_sise: 64\n")
    with pytest.raises(SystemExit):
        tr.parse_config(["--config", str(cfg_file)])


def test_demo_preset_runs_as_configured(tmp_path, capsys):
    """The README's main job with its own model and evaluation options, on a few tiny images."""
    cfg = tr.parse_config(["--preset", "demo", "--synthetic-train-size", "4", "--synthetic-val-size", "2",
                           "--synthetic-size", "64", "--batch-size", "2", "--iters", "2", "--no-progress",
                           "--num-vis", "1", "--out-dir", str(tmp_path)])
    assert (cfg.backbone, cfg.deep_stem, cfg.aux, cfg.crop_size) == ("mini", True, True, 96)
    assert tuple(cfg.eval_scales) == (1.0, 1.25) and cfg.eval_flip
    result = tr.train(cfg)
    assert len(result["losses"]) == 2 and 0.0 <= result["miou"] <= 1.0
    assert f"val mIoU: {result['miou']:.4f}" in capsys.readouterr().out


def test_scale_attention_in_trainer_and_evaluator(tmp_path):
    result = run(tmp_path, "--iters", "2", "--scale-attention", "1", "0.75", "--log-interval", "1",
                 "--synthetic-val-size", "1")
    rec = read_log(tmp_path / "log.jsonl")[0]
    # the extra supervision: each scale's own logits get a loss (weight --scale-loss-weight, 1)
    assert rec["loss"] == pytest.approx(rec["loss_fused"] + rec["loss_pam"] + rec["loss_cam"] + 0.4 * rec["loss_aux"]
                                        + rec["loss_scale1"] + rec["loss_scale0.75"])
    assert result["model"].scale_attn is not None and 0.0 <= result["miou"] <= 1.0
    ckpt = str(tmp_path / "checkpoint.pth")
    assert ev.main(["--checkpoint", ckpt]) == result["miou"]  # the checkpoint rebuilds the scale-attention model
    assert 0.0 <= ev.main(["--checkpoint", ckpt, "--scale-attention", "1", "0.5"]) <= 1.0
    with pytest.raises(ValueError, match="built for 2 scales"):
        ev.main(["--checkpoint", ckpt, "--scale-attention", "1"])


def test_confusion_matrix_and_scores():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    conf = ev.confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    iou, miou, acc = ev.scores(conf)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and torch.isnan(iou[3])
    assert miou == pytest.approx(1 / 3) and acc == pytest.approx(3 / 5)
    m = ev.metrics(conf)  # Acc = tp / ground truth, NaN for a class absent from the ground truth
    assert m["Acc"][:3].tolist() == pytest.approx([1 / 2, 1.0, 0.0]) and torch.isnan(m["Acc"][3])
    assert m["mAcc"] == pytest.approx(1 / 2) and m["aAcc"] == pytest.approx(3 / 5) and m["mIoU"] == miou
    table = ev.format_table(m, ["road", "car", "sky", "bus"]).splitlines()
    assert table[0].split() == ["class", "IoU", "Acc"] and table[3].split() == ["sky", "0.0000", "0.0000"]
    assert table[4].split() == ["bus", "n/a", "n/a"]


class _Pointwise(nn.Module):
    """A per-pixel model: whole-image, sliding-window and flipped predictions must agree."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (self.conv(x),)


def test_inference_modes_agree_on_a_pointwise_model():
    torch.manual_seed(0)
    model, img = _Pointwise(), torch.randn(1, 3, 37, 50)
    whole = ev.predict(model, img, 4)
    torch.testing.assert_close(ev.predict(model, img, 4, mode="slide", crop_size=16), whole)
    for stride in (1, 5, 16):  # --slide-stride: any stride up to the crop covers the image
        torch.testing.assert_close(ev.predict(model, img, 4, mode="slide", crop_size=16, stride=stride), whole)
    with pytest.raises(ValueError, match="stride"):
        ev.predict(model, img, 4, mode="slide", crop_size=16, stride=17)
    torch.testing.assert_close(ev.predict(model, img, 4, mode="slide", crop_size=64), whole)  # padded
    torch.testing.assert_close(ev.predict(model, img, 4, flip=True), 2 * whole)
    multi = ev.predict(model, img, 4, scales=(0.5, 1.0, 2.0))
    assert multi.shape == whole.shape and torch.allclose(multi.sum(1), torch.full((1, 37, 50), 3.0))
    with pytest.raises(ValueError, match="crop_size"):
        ev.predict(model, img, 4, mode="slide")
