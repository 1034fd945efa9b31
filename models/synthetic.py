"""The procedural synthetic scenes, the default dataset: image ``i`` is a pure function of
``(seed, split, i)``, nothing stored or downloaded (see ``SyntheticScenes``).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def derive_seed(*keys):
    """A well-mixed 32-bit generator seed from integers (torch's CPU generator uses 32 bits of a seed)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


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

