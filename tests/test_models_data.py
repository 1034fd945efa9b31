"""models/data.py: synthetic scenes, augmentation, batch order, dataset readers and their errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from models.data import (IGNORE_INDEX, ADE20K, Cityscapes, DatasetError, DatasetNotFoundError, PascalVOC,
                         SyntheticScenes, augment, build_dataset, normalize)
from models.data import IterationBatchSampler


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticScenes(8, size=64, seed=3), SyntheticScenes(8, size=64, seed=3)
    for i in range(8):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    img, label = a[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and label.shape == (64, 64)
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticScenes(8, size=64, seed=4)[0][0])
    assert not torch.equal(a[0][0], SyntheticScenes(8, size=64, seed=3, split="val")[0][0])
    with pytest.raises(IndexError):
        a[8]
    uncached = SyntheticScenes(8, size=64, seed=3, cache=False)
    for i in (0, 0, 5):  # a cache hit returns the same tensors, labels as int64
        img, label = a[i]
        assert label.dtype == torch.int64
        assert torch.equal(img, uncached[i][0]) and torch.equal(label, uncached[i][1])


def test_synthetic_classes_are_not_told_apart_by_colour():
    def pixels(split):
        ds = SyntheticScenes(100, size=64, seed=0, split=split)
        imgs = torch.stack([ds[i][0] for i in range(len(ds))]).permute(0, 2, 3, 1).reshape(-1, 3).float()
        labels = torch.stack([ds[i][1] for i in range(len(ds))]).flatten()
        return imgs[labels > 0], labels[labels > 0]

    x, y = pixels("train")
    assert torch.equal(torch.unique(y), torch.arange(1, 6))  # every object class appears
    means = torch.stack([x[y == c].mean(0) for c in range(1, 6)])
    x, y = pixels("val")
    nearest_mean = torch.cdist(x, means).argmin(1) + 1
    assert (nearest_mean == y).float().mean() < 0.35  # chance is 0.2; colour-coded classes would give ~1


def test_augment_shapes_padding_and_determinism():
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    label = torch.randint(0, 5, (20, 30))
    x, y = augment(img, label, torch.Generator().manual_seed(0), crop_size=16, scale_range=(1.0, 1.0), flip=False)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.shape == (16, 16)
    # scale 1, no flip: the crop is a window of the normalised input
    n = normalize(img)
    hits = [(i, j) for i in range(5) for j in range(15) if torch.equal(y, label[i:i + 16, j:j + 16])
            and torch.allclose(x, n[:, i:i + 16, j:j + 16])]
    assert hits
    # too small after scaling: padded with ignore
    x, y = augment(img, label, torch.Generator().manual_seed(0), crop_size=40, scale_range=(1.0, 1.0))
    assert x.shape == (3, 40, 40) and (y == IGNORE_INDEX).sum() == 40 * 40 - 20 * 30
    a = augment(img, label, torch.Generator().manual_seed(5), 24)
    b = augment(img, label, torch.Generator().manual_seed(5), 24)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    flips = set()
    for s in range(20):  # the flip is applied to image and label together
        x, y = augment(img, label, torch.Generator().manual_seed(s), 30, scale_range=(1.0, 1.0))
        flips.add(torch.equal(y[:20], label.flip(-1)))
        if torch.equal(y[:20], label.flip(-1)):
            assert torch.allclose(x[:, :20], n.flip(-1))
    assert flips == {True, False}


def test_batch_sampler_resumes_and_splits_ranks():
    full = list(IterationBatchSampler(10, 2, 0, 1, seed=1, start=0, iters=12))
    assert list(IterationBatchSampler(10, 2, 0, 1, seed=1, start=7, iters=12)) == full[7:]
    assert sorted(k[0] for b in full[:5] for k in b) == list(range(10))  # one epoch = a permutation
    assert [k[0] for b in full[:5] for k in b] != [k[0] for b in full[5:10] for k in b]  # reshuffled
    assert len({k[1] for b in full for k in b}) == 24  # every draw has its own augmentation seed
    r0 = list(IterationBatchSampler(10, 1, 0, 2, seed=1, start=0, iters=12))
    r1 = list(IterationBatchSampler(10, 1, 1, 2, seed=1, start=0, iters=12))
    assert [a + b for a, b in zip(r0, r1)] == full
    with pytest.raises(ValueError, match="fewer than one global batch"):
        IterationBatchSampler(3, 2, 0, 2, seed=0, start=0, iters=1)


# --- readers on fake folder trees -------------------------------------------------------------
def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def _rgb(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_cityscapes(root):
    ids = np.array([[7, 26, 0, 33], [24, 11, 255, 1]], dtype=np.uint8).repeat(3, 0).repeat(2, 1)
    for city, name in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        _png(root / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png", _rgb())
        _png(root / "gtFine" / "train" / city / f"{name}_gtFine_labelIds.png", ids)
        (root / "gtFine" / "train" / city / f"{name}_gtFine_color.png").write_bytes(b"ignored")
    return root


def make_ade20k(root):
    for sub in ("training", "validation"):
        _png(root / "images" / sub / f"ADE_{sub}_00000001.jpg", _rgb())
        _png(root / "annotations" / sub / f"ADE_{sub}_00000001.png", np.array([[0, 1, 150, 3]] * 6).repeat(2, 1))
    return root


def make_voc(root):
    voc = root / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
    (voc / "SegmentationClass").mkdir()
    for i in ("2007_000032", "2007_000039"):
        _png(voc / "JPEGImages" / f"{i}.jpg", _rgb())
        lbl = Image.fromarray(np.array([[0, 15, 255, 20]] * 6, dtype=np.uint8).repeat(2, 1), "P")
        lbl.putpalette([v for c in range(256) for v in (c, 0, 255 - c)])
        lbl.save(voc / "SegmentationClass" / f"{i}.png")
    return root


def test_cityscapes_reader(tmp_path):
    ds = Cityscapes(str(make_cityscapes(tmp_path)), "train")
    assert len(ds) == 2 and ds.num_classes == 19
    img, label = ds[1]
    assert img.shape == (3, 6, 8) and img.dtype == torch.uint8 and label.shape == (6, 8)
    expected = torch.tensor([[0, 13, 255, 18], [11, 2, 255, 255]]).repeat_interleave(3, 0).repeat_interleave(2, 1)
    assert torch.equal(label, expected)


def test_ade20k_reader(tmp_path):
    ds = ADE20K(str(make_ade20k(tmp_path)), "val")
    img, label = ds[0]
    assert len(ds) == 1 and ds.num_classes == 150 and img.shape == (3, 6, 8)
    assert label[0].tolist() == [IGNORE_INDEX] * 2 + [0] * 2 + [149] * 2 + [2] * 2


def test_voc_reader(tmp_path):
    root = make_voc(tmp_path)
    for r in (root, root / "VOC2012"):  # VOCdevkit or VOC2012
        ds = PascalVOC(str(r), "train")
        img, label = ds[0]
        assert len(ds) == 2 and ds.num_classes == 21
        assert label[0].tolist() == [0, 0, 15, 15, 255, 255, 20, 20]  # palette indices, not colours


def test_build_dataset(tmp_path):
    cfg = dict(dataset="synthetic", synthetic_train_size=5, synthetic_val_size=3, synthetic_size=32, data_seed=0)
    assert len(build_dataset(cfg, "train")) == 5 and len(build_dataset(cfg, "val")) == 3
    cs = build_dataset(dict(dataset="cityscapes", data_root=str(make_cityscapes(tmp_path))), "train")
    assert isinstance(cs, Cityscapes)
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        build_dataset(dict(dataset="voc", data_root=None), "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset(dict(dataset="coco", data_root="x"), "train")


# --- every bad path ---------------------------------------------------------------------------
def test_missing_roots_and_layouts(tmp_path):
    nowhere = tmp_path / "nowhere"
    for cls, expected in ((Cityscapes, "leftImg8bit"), (ADE20K, "images"), (PascalVOC, "VOC")):
        with pytest.raises(DatasetNotFoundError, match=f"nowhere.*{expected}") as e:
            cls(str(nowhere), "train")
        assert isinstance(e.value, FileNotFoundError)
    cs = make_cityscapes(tmp_path / "cs")
    with pytest.raises(DatasetNotFoundError, match=r"gtFine[/\\]val.*directory not found"):
        (cs / "leftImg8bit" / "val").mkdir()
        Cityscapes(str(cs), "val")
    with pytest.raises(DatasetNotFoundError, match="no images found"):
        (cs / "gtFine" / "val").mkdir()
        Cityscapes(str(cs), "val")
    (cs / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="aachen_000000_000019_gtFine_labelIds.png: label file not found"):
        Cityscapes(str(cs), "train")
    voc = make_voc(tmp_path / "voc")
    with pytest.raises(DatasetNotFoundError, match=r"val.txt: file not found"):
        PascalVOC(str(voc), "val")
    (voc / "VOC2012" / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"2007_000039.jpg: image file not found"):
        PascalVOC(str(voc), "train")
    ade = make_ade20k(tmp_path / "ade")
    (ade / "annotations" / "training" / "ADE_training_00000001.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="ADE_training_00000001.png: label file not found"):
        ADE20K(str(ade), "train")


def test_corrupt_files(tmp_path):
    cs = make_cityscapes(tmp_path)
    img_path = cs / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    img_path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = Cityscapes(str(cs), "train")
    with pytest.raises(DatasetError, match="aachen_000000_000019_leftImg8bit.png: cannot be decoded.*RGB image"):
        ds[0]
    lbl_path = cs / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png"
    _png(lbl_path, _rgb())  # a colour image where class ids are expected
    with pytest.raises(DatasetError, match="bremen_000001_000019_gtFine_labelIds.png: expected a single-channel"):
        ds[1]
    _png(lbl_path, np.zeros((5, 8)))
    with pytest.raises(DatasetError, match="bremen_000001_000019_gtFine_labelIds.png: label is \\(5, 8\\).*\\(6, 8\\)"):
        ds[1]
