"""python -m models.predict and models.evaluate --weights/--arch: every named arch (small backbone,
random weights in its published layout) on tiny Cityscapes / ADE20K / VOC trees and image folders,
and every bad input: grayscale, RGBA, 16-bit, unreadable files, outputs that would overwrite inputs."""
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import archs
from models import evaluate as ev
from models import predict as pr
from models.checkpoints import build_model, load_for_inference, load_weights
from models.data import normalize
from models.readers import cityscapes_label_ids, voc_colormap
from models.train import parse_config
from test_models import randomized
from test_models_archs import tiny_archs, write_weights  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64


def image(seed, h=H, w=W):
    """A smooth random RGB image (uint8 [h, w, 3])."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 4, 5, generator=g)
    big = torch.nn.functional.interpolate(small, (h, w), mode="bilinear", align_corners=False)[0]
    return (big.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def png16(path, arr):
    """Write a 16-bit PNG (uint16 [h, w] grayscale or [h, w, 3] RGB); Pillow cannot write 16-bit RGB."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    h, w, c = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))


def dataset_tree(root, dataset, n=2):
    """Images of a tiny val split in the dataset's folder layout: [(image path, id)]."""
    out = []
    for i in range(n):
        if dataset == "cityscapes":
            city = ("aachen", "bonn")[i % 2]
            p = root / "leftImg8bit" / "val" / city / f"{city}_00000{i}_000019_leftImg8bit.png"
        elif dataset == "ade20k":
            p = root / "images" / "validation" / f"ADE_val_0000000{i}.jpg"
        else:
            p = root / "VOC2012" / "JPEGImages" / f"2007_00000{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image(i)).save(p, quality=95)
        out.append((p, p.stem))
    if dataset == "voc":
        lst = root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
        lst.parent.mkdir(parents=True)
        lst.write_text("".join(f"{s}\n" for _, s in out))
    return out


def write_ground_truth(root, dataset, img_path, labels):
    """The dataset's label file of an image whose ground truth is ``labels`` (train IDs / indices)."""
    if dataset == "cityscapes":
        p = Path(str(img_path).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
        arr, mode = cityscapes_label_ids(labels).numpy(), "L"
    elif dataset == "ade20k":
        p = root / "annotations" / "validation" / (img_path.stem + ".png")
        arr, mode = (labels + 1).to(torch.uint8).numpy(), "L"  # 0 is "other", ignored
    else:
        p = root / "VOC2012" / "SegmentationClass" / (img_path.stem + ".png")
        arr, mode = labels.to(torch.uint8).numpy(), "P"
    p.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr, "L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette(voc_colormap(256).flatten().tolist())
    im.save(p)


def read_png(path):
    return torch.from_numpy(np.array(Image.open(path)))


@pytest.mark.parametrize("name", sorted(archs.ARCHS))
def test_predict_then_evaluate_each_arch(name, tiny_archs, tmp_path, capsys):  # noqa: F811
    """predict's label PNGs, written back as the dataset's ground truth, evaluate to mIoU 1: the
    two commands run one protocol, normalisation and label mapping for every entry."""
    a = tiny_archs[name + "_tiny"]
    weights = tmp_path / "w.pth"
    write_weights(a, weights)
    root = tmp_path / a.dataset
    images = dataset_tree(root, a.dataset)
    out = tmp_path / "pred"
    img_dir = images[0][0].parent.parent if a.dataset == "cityscapes" else images[0][0].parent
    assert pr.main(["--weights", str(weights), "--arch", a.name, "--input", str(img_dir), "--out", str(out),
                    "--no-progress"]) == 0
    model = load_weights(None, str(weights), arch=a.name).eval()
    colors = a.palette()
    for img_path, stem in images:
        sub = out / (img_path.parent.name if a.dataset == "cityscapes" else "")
        labels = read_png(sub / f"{stem}_labels.png").long()
        # the labels are the arch's protocol on the normalised image
        x = normalize(torch.from_numpy(np.array(Image.open(img_path).convert("RGB"))).permute(2, 0, 1),
                      **a.normalization())[None]
        t = a.test
        want = ev.predict(model, x, a.nclass, t.mode, t.crop, t.scales, t.flip, a.align_corners, t.stride, t.fit)
        assert torch.equal(labels, want.argmax(1)[0])
        color = read_png(sub / f"{stem}_color.png")
        assert torch.equal(color, colors[labels])
        rgb = torch.from_numpy(np.array(Image.open(img_path).convert("RGB"))).float()
        overlay = (0.5 * rgb + 0.5 * color.float()).round().to(torch.uint8)
        assert torch.equal(read_png(sub / f"{stem}_overlay.png"), overlay)
        write_ground_truth(root, a.dataset, img_path, labels)
    capsys.readouterr()
    miou = ev.main(["--weights", str(weights), "--arch", a.name, "--data-root", str(root)])
    printed = capsys.readouterr().out
    assert miou == 1.0 and "aAcc: 1.0000" in printed
    assert a.name in printed and all(c in printed for c in a.classes[:3])  # the table names the classes
    if a.dataset == "cityscapes":
        cs = tmp_path / "cs"
        assert pr.main(["--weights", str(weights), "--arch", a.name, "--input", str(img_dir), "--out", str(cs),
                        "--format", "cityscapes", "--no-progress"]) == 0
        got = sorted(str(p.relative_to(cs)) for p in cs.rglob("*.png"))
        assert got == ["aachen/aachen_000000_000019_labelIds.png", "bonn/bonn_000001_000019_labelIds.png"]
        for (img_path, stem), f in zip(images, got):
            train_ids = read_png(out / img_path.parent.name / f"{stem}_labels.png")
            assert torch.equal(read_png(cs / f), cityscapes_label_ids(train_ids))  # label IDs, not train IDs


def test_evaluate_weights_errors(tiny_archs, tmp_path):  # noqa: F811
    a = tiny_archs["mmseg_danet_r50_ade20k_tiny"]
    write_weights(a, tmp_path / "w.pth")
    with pytest.raises(SystemExit):  # --weights needs --data-root
        ev.main(["--weights", str(tmp_path / "w.pth"), "--arch", a.name])
    root = tmp_path / "city"
    for img_path, _ in dataset_tree(root, "cityscapes", 1):
        write_ground_truth(root, "cityscapes", img_path, torch.zeros(H, W, dtype=torch.long))
    with pytest.raises(SystemExit):  # 150-class weights on the 19-class Cityscapes
        ev.main(["--weights", str(tmp_path / "w.pth"), "--arch", a.name, "--data-root", str(root),
                 "--dataset", "cityscapes"])
    with pytest.raises(ValueError, match="name the architecture.*mmseg_danet_r50_ade20k_tiny"):
        ev.main(["--weights", str(tmp_path / "w.pth"), "--data-root", str(root)])


@pytest.fixture
def trainer_checkpoint(tmp_path):
    """A models.train checkpoint of a tiny untrained mini-DANet (6 synthetic classes)."""
    cfg = parse_config("--backbone mini --aux --synthetic-size 48 --crop-size 32".split())
    torch.manual_seed(0)
    model = build_model(vars(cfg), 6)
    model.load_state_dict(randomized(model.state_dict()))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "cfg": vars(cfg), "nclass": 6}, path)
    return path


def test_bad_inputs(trainer_checkpoint, tmp_path, capsys):
    """Grayscale, RGBA and 16-bit images are converted with a warning and segmented as their 8-bit
    RGB versions; unreadable files are skipped and counted; other files are ignored; an output
    that would overwrite an input is refused; sub-folders are kept; no temporary file remains."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rgb, gray = image(1), image(2)[..., 0]
    Image.fromarray(rgb).save(src / "rgb.png")
    Image.fromarray(image(3)).save(src / "photo.jpg", quality=90)
    Image.fromarray(image(4)).save(src / "sub" / "nested.png")
    Image.fromarray(gray, "L").save(src / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((H, W), 128, np.uint8)]), "RGBA").save(src / "rgba.png")
    png16(src / "gray16.png", gray.astype(np.uint16) * 257)
    png16(src / "rgb16.png", rgb.astype(np.uint16) * 257 + 100)  # low bytes are dropped
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "empty.jpg").write_bytes(b"")
    jpg = (src / "photo.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    capsys.readouterr()
    rc = pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(src), str(src / "rgb.png"),
                  "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    for name, note in [("gray.png", "grayscale converted to RGB"), ("rgba.png", "RGBA (alpha ignored) converted"),
                       ("gray16.png", "I;16 (16-bit grayscale) converted to 8-bit RGB"),
                       ("rgb16.png", "16-bit RGB reduced to 8 bits")]:
        assert f"warning: {src / name}: {note}" in err, name
    for name in ("broken.png", "empty.jpg", "truncated.jpg"):
        assert f"warning: {src / name}: skipped, cannot be read" in err
    assert "skipped 3 unreadable file(s)" in err and "notes" not in err
    assert "wrote 21 files for 7 of 10 images" in err  # rgb.png given twice counts once
    stems = {p.name.rsplit("_", 1)[0] for p in out.rglob("*_labels.png")}
    assert stems == {"rgb", "photo", "nested", "gray", "rgba", "gray16", "rgb16"}
    assert (out / "sub" / "nested_labels.png").exists() and not list(out.rglob("*.tmp*"))

    def labels(stem):
        return read_png(out / f"{stem}_labels.png")

    assert torch.equal(labels("rgba"), labels("rgb")) and torch.equal(labels("rgb16"), labels("rgb"))
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "gray_rgb.png")
    assert pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(tmp_path / "gray_rgb.png"),
                    "--out", str(out), "--no-progress"]) == 0
    assert torch.equal(labels("gray16"), labels("gray_rgb")) and torch.equal(labels("gray"), labels("gray_rgb"))


def test_never_overwrites_inputs(trainer_checkpoint, tmp_path, capsys):
    Image.fromarray(image(5)).save(tmp_path / "x.png")
    Image.fromarray(image(6)).save(tmp_path / "x_color.png")  # x.png's colour mask would overwrite it
    before = (tmp_path / "x_color.png").read_bytes()
    capsys.readouterr()
    assert pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(tmp_path / "x*.png"),
                    "--out", str(tmp_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'x.png'}: skipped, its output {tmp_path / 'x_color.png'} is an input image" in err
    assert "skipped 1 image(s) whose outputs would overwrite inputs" in err
    assert (tmp_path / "x_color.png").read_bytes() == before and not (tmp_path / "x_labels.png").exists()
    assert (tmp_path / "x_color_labels.png").exists()  # the other input is written beside it
    (tmp_path / "x_color.png").write_bytes(b"broken")  # now nothing can be written: exit status 1
    assert pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(tmp_path / "x.png"),
                    str(tmp_path / "x_color.png"), "--out", str(tmp_path), "--no-progress"]) == 1


def test_nothing_written_exits_non_zero(trainer_checkpoint, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 junk")
    args = ["--checkpoint", str(trainer_checkpoint), "--out", str(tmp_path / "out")]
    assert pr.main(args + ["--input", str(tmp_path / "nothing" / "*.png")]) == 1
    assert "no input images" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "models.predict", *args, "--input", str(tmp_path / "broken.jpg")],
                       cwd=ROOT, capture_output=True, text=True)  # the process's exit status
    assert r.returncode == 1 and "skipped 1 unreadable" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_options_reach_the_prediction(trainer_checkpoint, tmp_path, capsys):
    """--mode/--crop-size/--slide-stride/--scales/--flip/--fit/--opacity, a glob input, the progress
    bar with images/s, and --amp bf16."""
    for i in range(2):
        Image.fromarray(image(10 + i)).save(tmp_path / f"im{i}.jpg")
    out = tmp_path / "out"
    capsys.readouterr()
    assert pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(tmp_path / "im*.jpg"), "--out", str(out),
                    "--mode", "slide", "--crop-size", "32", "--slide-stride", "16", "--scales", "0.75", "1",
                    "--flip", "--fit", "80x40", "--opacity", "0.25"]) == 0
    err = capsys.readouterr().err
    assert "img/s" in err and "32px windows, stride 16, scales 0.75/1, flip, fitted to 80x40" in err
    model, arch, _ = load_for_inference(str(trainer_checkpoint))
    for i in range(2):
        img = torch.from_numpy(np.array(Image.open(tmp_path / f"im{i}.jpg").convert("RGB"))).permute(2, 0, 1)
        want = ev.predict(model, normalize(img)[None], 6, "slide", 32, (0.75, 1.0), True, model.align_corners, 16,
                          (80, 40)).argmax(1)[0]
        got = read_png(out / f"im{i}_labels.png")
        assert torch.equal(got.long(), want)
        color = arch.palette()[got.long()].float()
        assert torch.equal(read_png(out / f"im{i}_overlay.png"),
                           (0.75 * img.permute(1, 2, 0).float() + 0.25 * color).round().to(torch.uint8))
    assert pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(tmp_path / "im0.jpg"), "--out",
                    str(tmp_path / "amp"), "--amp", "bf16", "--no-progress"]) == 0
    assert read_png(tmp_path / "amp" / "im0_labels.png").max() < 6
    with pytest.raises(SystemExit):  # Cityscapes file names need a Cityscapes model
        pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(tmp_path), "--out", str(out),
                 "--format", "cityscapes"])
    with pytest.raises(SystemExit):
        pr.main(["--checkpoint", str(trainer_checkpoint), "--input", str(tmp_path), "--out", str(out),
                 "--opacity", "1.5"])


def test_readme_command_on_full_size_released_weights(tmp_path):
    """The README's command for the released DANet101.pth.tar (random weights of its exact layout:
    ResNet-101, under "state_dict" with "module." and the backbone's fc, a numpy best_pred), whole
    image so that the test stays small."""
    weights = tmp_path / "DANet101.pth.tar"
    write_weights(archs.ARCHS["danet101_cityscapes"], weights)
    (tmp_path / "photos").mkdir()
    Image.fromarray(image(7, 64, 96)).save(tmp_path / "photos" / "street.jpg")
    r = subprocess.run([sys.executable, "-m", "models.predict", "--weights", str(weights), "--arch",
                        "danet101_cityscapes", "--input", str(tmp_path / "photos"), "--out", str(tmp_path / "masks"),
                        "--mode", "whole", "--fit", "none", "--no-flip"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == \
        ["street_color.png", "street_labels.png", "street_overlay.png"]
    assert read_png(tmp_path / "masks" / "street_labels.png").shape == (64, 96)
