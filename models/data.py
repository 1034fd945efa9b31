"""Datasets and training input: the procedural synthetic scenes (the default, ``models.synthetic``)
and readers for Cityscapes, ADE20K and PASCAL VOC (``models.readers``). Every dataset returns
``(image uint8 [3, H, W], label int64 [H, W])`` with ``IGNORE_INDEX`` for unlabeled pixels;
``augment`` and ``normalize`` turn that into training input, in the order ``IterationBatchSampler``
draws.
"""
import torch
import torch.nn.functional as F

from .readers import (ADE20K, IGNORE_INDEX, READERS, Cityscapes, DatasetError,  # noqa: F401 (re-exported)
                      DatasetNotFoundError, PascalVOC)
from .synthetic import SYNTHETIC_CLASSES, SyntheticScenes, derive_seed  # noqa: F401 (re-exported)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Augmentation (torch ops; every random draw comes from the generator passed in)
# ----------------------------------------------------------------------------------------------
def normalize(img, mean=MEAN, std=STD, bgr=False):
    """uint8 [..., 3, H, W] (RGB) -> float ``(x / 255 - mean) / std`` per channel: ImageNet's
    statistics by default; ``bgr``: for weights trained on BGR input, the channels reversed first."""
    if bgr:
        img = img.flip(-3)
    mean = torch.tensor(mean, device=img.device).view(3, 1, 1)
    std = torch.tensor(std, device=img.device).view(3, 1, 1)
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
    """Normalised full images with their labels, for evaluation (``norm``: normalize's keywords)."""

    def __init__(self, base, **norm):
        self.base, self.norm = base, norm

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        return normalize(img, **self.norm), label



# ----------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------
class IterationBatchSampler:
    """Keys ``(index, augmentation seed)`` of this rank's part of global batches ``start..iters-1``.

    Epoch ``e`` visits the dataset in a permutation drawn from ``(seed, e)``; a global batch is
    ``batch_size * world`` consecutive entries of it, split among ranks. Everything is a function
    of the iteration number, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n, batch_size, rank, world, seed, start, iters):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.start, self.iters = seed, start, iters
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the training set has {n} images, fewer than one global batch ({batch_size * world})")

    def __len__(self):
        return max(self.iters - self.start, 0)

    def __iter__(self):
        global_batch = self.batch_size * self.world
        epoch = None
        for it in range(self.start, self.iters):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
            first = (it % self.per_epoch) * global_batch + self.rank * self.batch_size
            yield [(int(perm[first + j]), derive_seed(self.seed, epoch, first + j)) for j in range(self.batch_size)]


# ----------------------------------------------------------------------------------------------
# Datasets by name
# ----------------------------------------------------------------------------------------------
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
