"""models/train.py and models/evaluate.py: training, exact resume, DDP on CPU, config, metrics, inference."""
import glob
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models import evaluate as ev
from models import train as tr

TINY = ("--backbone mini --aux --synthetic-size 48 --crop-size 48 --synthetic-train-size 16 "
        "--synthetic-val-size 4 --batch-size 4 --lr 0.05 --no-progress").split()


def run(out_dir, *extra):
    return tr.train(tr.parse_config([*TINY, "--out-dir", str(out_dir), *extra]))


def test_training_reduces_loss_and_reports_miou(tmp_path, capsys):
    result = run(tmp_path, "--iters", "40", "--synthetic-train-size", "8", "--num-vis", "2")
    losses = result["losses"]
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert 0.0 <= result["miou"] <= 1.0
    out = capsys.readouterr().out
    assert f"val mIoU: {result['miou']:.4f}" in out and "background" in out
    assert sorted(os.listdir(tmp_path / "vis")) == ["00000.png", "00001.png"]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 40 and ckpt["losses"] == losses

    # the evaluator CLI on that checkpoint: same whole-image mIoU; slide/multi-scale/flip run
    assert ev.main(["--checkpoint", str(tmp_path / "checkpoint.pth")]) == pytest.approx(result["miou"])
    miou = ev.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--mode", "slide", "--crop-size", "32",
                    "--scales", "0.75", "1.0", "--flip", "--vis-dir", str(tmp_path / "ev"), "--num-vis", "1"])
    assert 0.0 <= miou <= 1.0 and os.listdir(tmp_path / "ev") == ["00000.png"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full", "--iters", "6")["losses"]
    stopped = run(tmp_path / "cut", "--iters", "6", "--stop-after", "3", "--ckpt-every", "2")
    assert stopped["miou"] is None and stopped["losses"] == full[:3]
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["iteration"] == 3
    resumed = run(tmp_path / "cut", "--iters", "6", "--ckpt-every", "2", "--resume")
    assert resumed["losses"] == full  # exact: same batches, augmentations, dropout and optimizer state
    assert not glob.glob(str(tmp_path / "cut" / "*.tmp*"))
    with pytest.raises(FileNotFoundError, match="nowhere.*checkpoint.pth: checkpoint file not found"):
        run(tmp_path / "nowhere", "--iters", "6", "--resume")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # fp16: the scaler skips a step
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs(tmp_path, amp):
    losses = run(tmp_path, "--iters", "2", "--amp", amp, "--synthetic-val-size", "1")["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = tr.train(tr.parse_config([*TINY, "--batch-size", "2", "--iters", "3", "--out-dir", out_dir]))
    torch.save({"model": result["model"].state_dict(), "losses": result["losses"], "miou": result["miou"]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    init = tr.build_model(vars(tr.parse_config(TINY)), 6).state_dict()
    for k, v in r0["model"].items():  # gradients were averaged: both ranks hold the same weights
        if "running" not in k and "num_batches" not in k:  # BN statistics are per process (no SyncBN on CPU)
            assert torch.equal(v, r1["model"][k]), k
    assert not torch.equal(r0["model"]["head.conv8.1.weight"], init["head.conv8.1.weight"])
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 3  # the logged loss is the mean over ranks
    assert r0["miou"] == r1["miou"]  # confusion matrices summed over ranks
    assert len(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["rng"]) == 2


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
    assert tuple(cfg.eval_scales) == (1.0, 1.25, 1.5) and cfg.eval_flip
    result = tr.train(cfg)
    assert len(result["losses"]) == 2 and 0.0 <= result["miou"] <= 1.0
    assert f"val mIoU: {result['miou']:.4f}" in capsys.readouterr().out


def test_confusion_matrix_and_scores():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    conf = ev.confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    iou, miou, acc = ev.scores(conf)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and torch.isnan(iou[3])
    assert miou == pytest.approx(1 / 3) and acc == pytest.approx(3 / 5)


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
    torch.testing.assert_close(ev.predict(model, img, 4, mode="slide", crop_size=64), whole)  # padded
    torch.testing.assert_close(ev.predict(model, img, 4, flip=True), 2 * whole)
    multi = ev.predict(model, img, 4, scales=(0.5, 1.0, 2.0))
    assert multi.shape == whole.shape and torch.allclose(multi.sum(1), torch.full((1, 37, 50), 3.0))
    with pytest.raises(ValueError, match="crop_size"):
        ev.predict(model, img, 4, mode="slide")
