"""Readers for the standard folder layouts of Cityscapes, ADE20K and PASCAL VOC. Each returns
``(image uint8 [3, H, W], label int64 [H, W])`` with ``IGNORE_INDEX`` for unlabeled pixels, and
raises ``DatasetError`` naming the path and what was expected when a file is missing or corrupt.
"""
import os

import numpy as np
import torch

IGNORE_INDEX = 255


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


# Cityscapes' label ID (cityscapesScripts' labels.py: the IDs of the *_gtFine_labelIds.png files
# and of benchmark submissions) of each of the 19 train IDs, and their colours there.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_COLORS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                     (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                     (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                     (0, 80, 100), (0, 0, 230), (119, 11, 32))


def cityscapes_label_ids(train_ids):
    """Train IDs 0..18 -> Cityscapes label IDs (uint8); anything else (255: ignored) -> 0, "unlabeled"."""
    t = train_ids.long()
    valid = (t >= 0) & (t < len(CITYSCAPES_LABEL_IDS))
    ids = torch.tensor(CITYSCAPES_LABEL_IDS, dtype=torch.uint8, device=t.device)[t.clamp(0, len(CITYSCAPES_LABEL_IDS) - 1)]
    return torch.where(valid, ids, torch.zeros_like(ids))


def voc_colormap(nclass):
    """The PASCAL VOC colour map (bit-interleaved class index), extended to any number of classes."""
    cmap = torch.zeros(max(nclass, 1), 3, dtype=torch.uint8)
    for i in range(nclass):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = torch.tensor([r, g, b], dtype=torch.uint8)
    return cmap


def dataset_palette(dataset, nclass):
    """[nclass, 3] uint8 colours of a dataset's classes: Cityscapes' own colours, the PASCAL VOC
    colour map for VOC and for every other dataset (ADE20K's masks too: its own 150-colour table
    is not reproduced here)."""
    if dataset == "cityscapes" and nclass == len(CITYSCAPES_COLORS):
        return torch.tensor(CITYSCAPES_COLORS, dtype=torch.uint8)
    return voc_colormap(nclass)


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
    lut = _lut({label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS)})

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
