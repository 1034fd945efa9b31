"""Datasets: the procedural synthetic scenes (the default) and readers for Cityscapes, ADE20K and
PASCAL VOC. Every dataset returns ``(image uint8 [3, H, W], label int64 [H, W])`` with
``IGNORE_INDEX`` for unlabeled pixels; ``augment`` and ``normalize`` turn that into training input.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def derive_seed(*keys):
    """A well-mixed 32-bit generator seed from integers (torch's CPU generator uses 32 bits of a seed)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Synthetic scenes
# ----------------------------------------------------------------------------------------------
_SPLITS = ("train", "val", "test")
SYNTHETIC_CLASSES = ("background", "disk", "square", "triangle", "ring", "cross")
# Lengths are in pixels of a 160x160 image and scale with the image size.
# Per object class: radius range (classes differ in scale too) and texture family.
_RADIUS = {1: (11, 30), 2: (15, 39), 3: (18, 45), 4: (20, 45), 5: (16, 42)}
_STRIPES, _CHECKS, _DOTS, _GRAIN, _SHADED, _BLOBS = range(6)
_CLASS_TEXTURE = {1: _GRAIN, 2: _CHECKS, 3: _STRIPES, 4: _SHADED, 5: _DOTS}
_PERIOD = {_STRIPES: (4, 8), _CHECKS: (8, 13), _DOTS: (6, 11)}


def _grid(size):
    return torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")


def _texture(g, size, kind):
    """A texture [3, S, S] in [0, 1] of the given family, in two random colours that differ by at
    least 0.35 in every channel, at a random orientation and period."""
    c1 = torch.rand(3, 1, 1, generator=g)
    c2 = (c1 + 0.35 + 0.3 * torch.rand(3, 1, 1, generator=g)) % 1
    ys, xs = _grid(size)
    theta = float(torch.rand((), generator=g)) * math.pi
    u = xs * math.cos(theta) + ys * math.sin(theta)
    v = -xs * math.sin(theta) + ys * math.cos(theta)
    lo, hi = _PERIOD.get(kind, (1, 1))
    period = (lo + (hi - lo) * float(torch.rand((), generator=g))) * size / 160
    if kind == _STRIPES:
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * u / period)
    elif kind == _CHECKS:
        t = (torch.floor(u / period) + torch.floor(v / period)) % 2
    elif kind == _DOTS:
        t = ((torch.sin(math.pi * u / period) * torch.sin(math.pi * v / period)).abs() > 0.8).float()
    elif kind == _GRAIN:
        t = torch.rand(size, size, generator=g)
    elif kind == _SHADED:  # one colour under a linear light gradient
        return (c1 * (1 + 0.6 * (u / size - 0.5))).clamp(0, 1)
    else:  # smooth blobs
        k = int(torch.randint(3, 9, (1,), generator=g))
        t = F.interpolate(torch.rand(1, 1, k, k, generator=g), size=(size, size), mode="bicubic", align_corners=False)[0, 0]
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    return c1 * t + c2 * (1 - t)


def _shape_mask(cls, g, size, cy, cx, r):
    ys, xs = _grid(size)
    theta = float(torch.rand((), generator=g)) * 2 * math.pi
    dx, dy = xs - cx, ys - cy
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    d2 = u * u + v * v
    if cls == 1:  # disk
        return d2 <= r * r
    if cls == 2:  # square
        return torch.maximum(u.abs(), v.abs()) <= 0.8 * r
    if cls == 3:  # equilateral triangle inscribed in the circle of radius r
        m = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):
            a = theta + 2 * math.pi * k / 3
            m &= dx * math.cos(a) + dy * math.sin(a) <= r / 2
        return m
    if cls == 4:  # ring
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if cls == 5:  # cross
        w = r / 3
        return ((u.abs() <= w) & (v.abs() <= r)) | ((v.abs() <= w) & (u.abs() <= r))
    raise ValueError(cls)


class SyntheticScenes(torch.utils.data.Dataset):
    """Procedural scenes: a smooth two-colour background and 2-6 textured objects of five classes.

    Each class has its own shape (disk, square, triangle, ring, cross), size range and texture
    family (grain, checks, stripes, flat shading, dots); colours are random and independent of
    the class, objects are rotated and occlude each other. Image ``i`` is a pure function of
    ``(seed, split, i)``: nothing is stored on disk or downloaded. ``cache`` keeps generated
    images in memory (about 100 KB each at 160x160).
    """

    classes = SYNTHETIC_CLASSES

    def __init__(self, length=2000, size=160, seed=0, split="train", max_objects=6, cache=True):
        if split not in _SPLITS:
            raise ValueError(f"synthetic split must be one of {_SPLITS}, got {split!r}")
        self.length, self.size, self.seed, self.split, self.max_objects = length, size, seed, split, max_objects
        self.num_classes = len(self.classes)
        self._cache = {} if cache else None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        if self._cache is not None and i in self._cache:
            img, label = self._cache[i]
            return img, label.long()
        img, label = self._generate(i)
        if self._cache is not None:
            self._cache[i] = img, label.to(torch.uint8)
        return img, label

    def _generate(self, i):
        g = torch.Generator().manual_seed(derive_seed(self.seed, _SPLITS.index(self.split), i))
        S, scale = self.size, self.size / 160
        img = _texture(g, S, _BLOBS)
        label = torch.zeros(S, S, dtype=torch.int64)
        for _ in range(int(torch.randint(2, self.max_objects + 1, (1,), generator=g))):
            cls = int(torch.randint(1, self.num_classes, (1,), generator=g))
            lo, hi = _RADIUS[cls]
            r = scale * (lo + (hi - lo) * float(torch.rand((), generator=g)))
            cy, cx = (S * torch.rand(2, generator=g)).tolist()
            m = _shape_mask(cls, g, S, cy, cx, r)
            img = torch.where(m, _texture(g, S, _CLASS_TEXTURE[cls]), img)
            label[m] = cls
        img = (img + 0.04 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        return (img * 255).round().to(torch.uint8), label


# ----------------------------------------------------------------------------------------------
# Augmentation (torch ops; every random draw comes from the generator passed in)
# ----------------------------------------------------------------------------------------------
def normalize(img):
    """uint8 [..., 3, H, W] -> float, ImageNet mean/std normalised."""
    mean = torch.tensor(MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(STD, device=img.device).view(3, 1, 1)
    return (img.float() / 255 - mean) / std


def augment(img, label, g, crop_size, scale_range=(0.5, 2.0), flip=True):
    """Random scale, pad (image 0 before normalisation, label ignore) and crop to ``crop_size``,
    horizontal flip, normalise. Returns ``(float [3, c, c], int64 [c, c])``."""
    lo, hi = scale_range
    s = lo + (hi - lo) * float(torch.rand((), generator=g))
    H, W = img.shape[-2:]
    h, w = max(1, round(H * s)), max(1, round(W * s))
    img = F.interpolate(img[None].float(), (h, w), mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), (h, w), mode="nearest")[0, 0].long()
    ph, pw = max(crop_size - h, 0), max(crop_size - w, 0)
    img = F.pad(img, (0, pw, 0, ph), value=0.0)
    label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
    y0 = int(torch.randint(h + ph - crop_size + 1, (1,), generator=g))
    x0 = int(torch.randint(w + pw - crop_size + 1, (1,), generator=g))
    img = img[:, y0:y0 + crop_size, x0:x0 + crop_size]
    label = label[y0:y0 + crop_size, x0:x0 + crop_size]
    if flip and float(torch.rand((), generator=g)) < 0.5:
        img, label = img.flip(-1), label.flip(-1)
    return normalize(img), label


class TrainTransform(torch.utils.data.Dataset):
    """Wraps a dataset for training: item ``(index, seed)`` is sample ``index`` augmented with a
    generator seeded by ``seed``, so a batch is a function of its keys alone (worker count and
    resuming do not change it)."""

    def __init__(self, base, crop_size, scale_range=(0.5, 2.0), flip=True):
        self.base, self.crop_size, self.scale_range, self.flip = base, crop_size, scale_range, flip

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        img, label = self.base[index]
        return augment(img, label, torch.Generator().manual_seed(seed), self.crop_size, self.scale_range, self.flip)


class EvalTransform(torch.utils.data.Dataset):
    """Normalised full images with their labels, for evaluation."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        return normalize(img), label


# ----------------------------------------------------------------------------------------------
# Readers for the standard folder layouts
# ----------------------------------------------------------------------------------------------
class DatasetError(RuntimeError):
    """A dataset is missing, incomplete or corrupt; the message names the path and what was expected."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    pass


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{path}: directory not found; expected {what}")
    return path


def _read(path, label):
    """RGB image as uint8 [3, H, W], or a single-channel label PNG as int64 [H, W]."""
    from PIL import Image, UnidentifiedImageError

    what = "a single-channel label PNG of class ids" if label else "an RGB image (PNG/JPEG)"
    try:
        with Image.open(path) as im:
            if label and im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(f"{path}: expected {what}, got an image of mode {im.mode}")
            arr = np.array(im if label else im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: file not found; expected {what}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be decoded ({e}); expected {what}") from None
    t = torch.from_numpy(arr.astype(np.int64) if label else arr)
    return t if label else t.permute(2, 0, 1).contiguous()


class _PairedFiles(torch.utils.data.Dataset):
    """(image path, label path) pairs with a label lookup table (raw id -> train id)."""

    classes = ()
    lut = None

    def __init__(self, pairs, where):
        if not pairs:
            raise DatasetNotFoundError(f"{where}: no images found")
        for img, lbl in pairs:
            if not os.path.isfile(img):
                raise DatasetNotFoundError(f"{img}: image file not found (listed in {where})")
            if not os.path.isfile(lbl):
                raise DatasetNotFoundError(f"{lbl}: label file not found; expected one label PNG per image ({img})")
        self.pairs = pairs
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, lbl_path = self.pairs[i]
        img, label = _read(img_path, label=False), _read(lbl_path, label=True)
        if img.shape[1:] != label.shape:
            raise DatasetError(f"{lbl_path}: label is {tuple(label.shape)} but its image {img_path} is "
                               f"{tuple(img.shape[1:])}; expected the same height and width")
        if self.lut is not None:
            label = self.lut[label.clamp(0, len(self.lut) - 1)]
        return img, label


def _lut(mapping, size=256):
    lut = torch.full((size,), IGNORE_INDEX, dtype=torch.int64)
    for k, v in mapping.items():
        lut[k] = v
    return lut


class Cityscapes(_PairedFiles):
    """``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``root/gtFine/<split>/<city>/
    *_gtFine_labelIds.png``; label ids are mapped to the 19 train ids, all others to ignore."""

    classes = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
               "motorcycle", "bicycle")
    lut = _lut({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})

    def __init__(self, root, split="train"):
        img_root = _require_dir(os.path.join(root, "leftImg8bit", split),
                                f"the Cityscapes layout <root>/leftImg8bit/{split}/<city>/*_leftImg8bit.png")
        lbl_root = _require_dir(os.path.join(root, "gtFine", split),
                                f"the Cityscapes layout <root>/gtFine/{split}/<city>/*_gtFine_labelIds.png")
        pairs = []
        for city in sorted(os.listdir(img_root)):
            for f in sorted(os.listdir(os.path.join(img_root, city))):
                if f.endswith("_leftImg8bit.png"):
                    lbl = f[: -len("_leftImg8bit.png")] + "_gtFine_labelIds.png"
                    pairs.append((os.path.join(img_root, city, f), os.path.join(lbl_root, city, lbl)))
        super().__init__(pairs, f"{img_root}/<city>/*_leftImg8bit.png")


class ADE20K(_PairedFiles):
    """SceneParsing ``ADEChallengeData2016``: ``root/images/{training,validation}/*.jpg`` with
    ``root/annotations/.../*.png``; label 0 ("other") is ignored and 1..150 become 0..149."""

    # The 150 classes of SceneParsing's objectInfo150 (short names, as mmsegmentation prints them).
    classes = ('wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
               'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair',
               'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair',
               'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box',
               'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace',
               'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow',
               'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet',
               'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer',
               'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower',
               'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track',
               'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
               'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
               'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle',
               'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle',
               'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light',
               'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower',
               'radiator', 'glass', 'clock', 'flag')
    lut = _lut({i: i - 1 for i in range(1, 151)})

    def __init__(self, root, split="train"):
        sub = {"train": "training", "val": "validation"}.get(split, split)
        img_root = _require_dir(os.path.join(root, "images", sub),
                                f"the ADE20K layout <root>/images/{sub}/*.jpg (root = ADEChallengeData2016)")
        lbl_root = _require_dir(os.path.join(root, "annotations", sub),
                                f"the ADE20K layout <root>/annotations/{sub}/*.png")
        pairs = [(os.path.join(img_root, f), os.path.join(lbl_root, os.path.splitext(f)[0] + ".png"))
                 for f in sorted(os.listdir(img_root)) if f.lower().endswith((".jpg", ".jpeg", ".png"))]
        super().__init__(pairs, img_root)


class PascalVOC(_PairedFiles):
    """``VOC2012/ImageSets/Segmentation/<split>.txt`` listing ids of ``JPEGImages/<id>.jpg`` and
    ``SegmentationClass/<id>.png`` (palette PNG, 21 classes, 255 = ignore). ``root`` may be the
    VOC2012 folder or the VOCdevkit folder holding it."""

    classes = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

    def __init__(self, root, split="train"):
        if os.path.isdir(os.path.join(root, "VOC2012")):
            root = os.path.join(root, "VOC2012")
        _require_dir(root, "the PASCAL VOC layout VOCdevkit/VOC2012/{ImageSets/Segmentation,JPEGImages,SegmentationClass}")
        list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise DatasetNotFoundError(f"{list_file}: file not found; expected the list of {split} image ids")
        with open(list_file) as f:
            ids = [line.strip() for line in f if line.strip()]
        img_dir = _require_dir(os.path.join(root, "JPEGImages"), "the PASCAL VOC images <root>/JPEGImages/<id>.jpg")
        lbl_dir = _require_dir(os.path.join(root, "SegmentationClass"),
                               "the PASCAL VOC labels <root>/SegmentationClass/<id>.png")
        super().__init__([(os.path.join(img_dir, i + ".jpg"), os.path.join(lbl_dir, i + ".png")) for i in ids],
                         list_file)


READERS = {"cityscapes": Cityscapes, "ade20k": ADE20K, "voc": PascalVOC}
DATASETS = ("synthetic",) + tuple(READERS)


def build_dataset(cfg, split):
    """The dataset named by ``cfg["dataset"]`` (a training config dict) for ``split``."""
    name = cfg["dataset"]
    if name == "synthetic":
        length = cfg["synthetic_train_size"] if split == "train" else cfg["synthetic_val_size"]
        return SyntheticScenes(length, cfg["synthetic_size"], cfg["data_seed"], split)
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if not cfg.get("data_root"):
        raise DatasetNotFoundError(f"dataset {name!r} needs --data-root (the folder holding its standard layout)")
    return READERS[name](cfg["data_root"], split)
