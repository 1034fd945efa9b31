"""models.vis_attention: PAM attention rows of a DANet as heat maps (evaluate --vis-attention)."""
import torch

from models.danet import DANet
from models.data import SyntheticScenes
from models import vis_attention
from danet_ops.testing import max_err


def _model():
    torch.manual_seed(0)
    m = DANet(5, backbone="mini").eval()
    with torch.no_grad():
        m.head.sa.gamma.fill_(0.5)
    return m


def test_pam_rows_are_the_attention_of_the_query_pixel():
    model = _model()
    img = torch.randn(1, 3, 64, 48)
    rows, (Hq, Wq) = vis_attention.pam_rows(model, img, [(0, 0), (63, 47), (32, 24)])
    assert (Hq, Wq) == (8, 6) and rows.shape == (3, 8, 6)
    assert max_err(rows.flatten(1).sum(1), torch.ones(3)) < 1e-5
    # The same rows from the full N x N softmax of the head's own q and k.
    feats = {}
    model.head.sa.register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0]))
    with torch.no_grad():
        model(img)
        q = model.head.sa.query_conv(feats["x"]).flatten(2)[0].double()
        k = model.head.sa.key_conv(feats["x"]).flatten(2)[0].double()
    full = torch.softmax(q.t() @ k, dim=-1)
    assert max_err(rows.flatten(1), full[[0, 47, 4 * 6 + 3]]) < 1e-5


def test_visualise_writes_pngs(tmp_path):
    paths = vis_attention.visualise(_model(), SyntheticScenes(length=2, size=64, split="val"),
                                    str(tmp_path), num_images=2)
    assert len(paths) == 2
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_vis_attention_flag(tmp_path):
    from models import evaluate as ev
    from models import train as tr
    tr.train(tr.parse_config(("--backbone mini --synthetic-size 48 --crop-size 48 --synthetic-train-size 4 "
                              "--synthetic-val-size 2 --batch-size 2 --iters 2 --no-progress --out-dir").split()
                             + [str(tmp_path / "run")]))
    ev.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--vis-attention",
             str(tmp_path / "att"), "--num-vis", "2"])
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == ["attention_00000.png", "attention_00001.png"]
