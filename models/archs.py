"""Named DANet architectures: the published configurations whose weights this repository loads.

An entry holds what the weights need besides themselves: the ``DANet`` options (backbone, stem,
multi-grid, auxiliary head), the dataset (class names, palette), the input normalisation,
``align_corners`` and the test-time defaults. ``models.evaluate --weights FILE --arch NAME`` and
``models.predict`` use them; ``python -m models.archs`` lists them.

Published weights of DANet:

- The authors' release (github.com/junfu1115/DANet) names one model, ``DANet101.pth.tar``
  (Cityscapes, ResNet-101); its README and ``experiments/segmentation/test_danet.sh`` name no
  DANet weights for another dataset (the paper's PASCAL Context and COCO-Stuff models were not
  released), so there is no released DANet-50 entry.
- mmsegmentation (``configs/danet``) publishes R-50-D8 and R-101-D8 DANets for Cityscapes (crops
  512x1024 and 769x769), ADE20K and PASCAL VOC 2012 + aug; the schedules (20k...160k iterations)
  change the weights, not the architecture, so one entry covers all schedules of a crop.
"""
import os
from dataclasses import dataclass, field

import torch

from .danet import DANet
from .readers import ADE20K, Cityscapes, PascalVOC, dataset_palette
from .synthetic import SYNTHETIC_CLASSES

CLASSES = {"cityscapes": Cityscapes.classes, "ade20k": ADE20K.classes, "voc": PascalVOC.classes,
           "synthetic": SYNTHETIC_CLASSES}

# ImageNet statistics in 0..255 pixel units. mmseg's configs state them so ([123.675, 116.28,
# 103.53] / [58.395, 57.12, 57.375], bgr_to_rgb / to_rgb: RGB input); the released code applies
# torchvision's Normalize([.485, .456, .406], [.229, .224, .225]) to 0..1 RGB: the same numbers.
MEAN_255 = (123.675, 116.28, 103.53)
STD_255 = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class TestConfig:
    """How the published numbers were measured (``models.evaluate.predict``'s options).

    ``fit = (long, short)``: before inference the image is resized, keeping its aspect ratio, by
    ``min(long / its long side, short / its short side)`` (``short=None``: the long side alone),
    and the scores are resized back to it (mmseg's ``Resize(scale, keep_ratio=True)``; the
    released code's ``base_size``)."""

    mode: str = "whole"
    crop: int = None
    stride: int = None
    scales: tuple = (1.0,)
    flip: bool = False
    fit: tuple = None


@dataclass(frozen=True)
class Arch:
    name: str
    layout: str           # key layout of the published weights: "released" or "mmseg" (converted on load)
    dataset: str          # "cityscapes", "ade20k" or "voc"
    backbone: str
    deep_stem: bool
    stem_width: int
    multi_grid: bool
    aux: bool
    align_corners: bool
    test: TestConfig
    mean: tuple = MEAN_255  # of 0..255 pixel values, in channel_order
    std: tuple = STD_255
    channel_order: str = "RGB"
    configs: tuple = field(default=())  # public config names this entry reproduces (mmseg: any schedule)
    source: str = ""

    @property
    def classes(self):
        return CLASSES[self.dataset]

    def normalization(self):
        """``models.data.normalize``'s keywords for this entry's input (mean/std of 0..1 values)."""
        return {"mean": tuple(m / 255 for m in self.mean), "std": tuple(s / 255 for s in self.std),
                "bgr": self.channel_order == "BGR"}

    @property
    def nclass(self):
        return len(self.classes)

    def palette(self):
        """[nclass, 3] uint8 colours of the classes."""
        return dataset_palette(self.dataset, self.nclass)

    def build(self, attention_backend="auto"):
        """The DANet these weights belong to (untrained)."""
        return DANet(self.nclass, backbone=self.backbone, aux=self.aux, deep_stem=self.deep_stem,
                     stem_width=self.stem_width, multi_grid=self.multi_grid, align_corners=self.align_corners,
                     attention_backend=attention_backend)


def _mmseg(depth, dataset, crop, test):
    """An mmseg ``danet_r{depth}-d8`` entry. configs/_base_/models/danet_r50-d8.py: ResNetV1c
    (deep stem 32-32-64, dilations (1, 1, 2, 4) with contract_dilation, no multi-grid), DAHead
    (channels 512, pam_channels 64), FCNHead on stage 3 (channels 256), align_corners=False."""
    short = {"cityscapes": "cityscapes", "ade20k": "ade20k", "voc": "voc12aug"}[dataset]
    schedules = {"cityscapes": ("40k", "80k"), "ade20k": ("80k", "160k"), "voc": ("20k", "40k")}[dataset]
    gpus = "4xb2" if dataset == "cityscapes" else "4xb4"
    configs = tuple(f"danet_r{depth}-d8_{crop}_{s}_{short}" for s in schedules) + \
        tuple(f"danet_r{depth}-d8_{gpus}-{s}_{short}-{crop}" for s in schedules)  # 0.x and 1.x names
    name = f"mmseg_danet_r{depth}_{short}" + (f"_{crop}" if dataset == "cityscapes" else "")
    return Arch(name, "mmseg", dataset, f"resnet{depth}", deep_stem=True, stem_width=32, multi_grid=False,
                aux=True, align_corners=test.mode == "slide", test=test, configs=configs,
                source=f"open-mmlab/mmsegmentation configs/danet/{configs[0]}.py")


# mmseg test pipelines: configs/_base_/datasets/cityscapes.py (Resize (2048, 1024), keep_ratio),
# cityscapes_769x769.py (Resize (2049, 1025)), ade20k.py and pascal_voc12.py (Resize (2048, 512));
# the 769x769 configs (configs/danet/danet_r50-d8_769x769_40k_cityscapes.py) add
# align_corners=True and test_cfg slide, crop (769, 769), stride (513, 513). No flip, one scale
# (the "ms+flip" numbers: scales 0.5..1.75 with flip).
_CITY_WHOLE = TestConfig("whole", fit=(2048, 1024))
_CITY_SLIDE = TestConfig("slide", crop=769, stride=513, fit=(2049, 1025))
_ADE_VOC = TestConfig("whole", fit=(2048, 512))

ARCHS = {a.name: a for a in [
    # The released DANet-101. experiments/segmentation/test_danet.sh: --backbone resnet101
    # --multi-grid --multi-dilation 4 8 16 --os 8 --no-deepstem --base-size 2048 --crop-size 768
    # (its --aux builds nothing: encoding/models/sseg/danet.py has no auxiliary head, so the file
    # has none). encoding/models/sseg/base.py: bilinear with align_corners=True; MultiEvalModule
    # resizes the long side to base_size x scale, runs 768-pixel windows at stride 2/3 of the crop
    # (512) with flip; experiments/segmentation/test.py: scales [1.0] for Cityscapes (its
    # README: 79.93 mIoU on val). Its windows are not edge-aligned and it sums exp(logits);
    # models.evaluate aligns the last window with the edge and averages softmax.
    Arch("danet101_cityscapes", "released", "cityscapes", "resnet101", deep_stem=False, stem_width=64,
         multi_grid=True, aux=False, align_corners=True,
         test=TestConfig("slide", crop=768, stride=512, scales=(1.0,), flip=True, fit=(2048, None)),
         configs=("DANet101",), source="junfu1115/DANet experiments/segmentation/test_danet.sh"),
    *(_mmseg(d, "cityscapes", "512x1024", _CITY_WHOLE) for d in (50, 101)),
    *(_mmseg(d, "cityscapes", "769x769", _CITY_SLIDE) for d in (50, 101)),
    *(_mmseg(d, "ade20k", "512x512", _ADE_VOC) for d in (50, 101)),
    *(_mmseg(d, "voc", "512x512", _ADE_VOC) for d in (50, 101)),
]}


def arch_of_checkpoint(cfg):
    """A ``models.train`` checkpoint's config described as an entry (its own training dataset, and
    the evaluator's defaults: whole image, one scale, no flip, slide windows of the training crop)."""
    return Arch("checkpoint", "trainer", cfg["dataset"], cfg["backbone"], cfg["deep_stem"], cfg["stem_width"],
                cfg["multi_grid"], cfg["aux"], cfg["align_corners"], TestConfig("whole", crop=cfg["crop_size"]))


def get_arch(name):
    """The entry named ``name``: an entry name, or one of its config names, or a file name that
    starts with one (``danet_r50-d8_512x1024_40k_cityscapes_20200605_191324-c0dbfa5f.pth``)."""
    if isinstance(name, Arch):
        return name
    if name in ARCHS:
        return ARCHS[name]
    found = arch_for_filename(name)
    if found is None:
        raise ValueError(f"unknown arch {name!r}; choose one of {sorted(ARCHS)} (python -m models.archs)")
    return found


def arch_for_filename(path):
    """The entry whose config name starts the file name of ``path`` (mmseg names its weights so), or None."""
    stem = os.path.basename(str(path))
    hits = {a.name: a for a in ARCHS.values() for c in a.configs if stem.startswith(c)}
    return next(iter(hits.values())) if len(hits) == 1 else None


_SHAPES = {}


def expected_shapes(arch):
    """{key: shape} of the state dict of ``arch``'s model (built on the meta device: no memory)."""
    arch = get_arch(arch)
    if arch.name not in _SHAPES:
        with torch.device("meta"):
            model = arch.build(attention_backend="reference")
        _SHAPES[arch.name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPES[arch.name]


def candidates(shapes, path=None):
    """Names of the entries whose keys and shapes are exactly ``shapes`` ({key: shape}, released
    layout). With several, the one whose config name starts the file name of ``path`` comes first."""
    def core(d):  # BatchNorm's num_batches_tracked may be absent from old files (torch fills it in)
        return {k: v for k, v in d.items() if not k.endswith(".num_batches_tracked")}

    names = [a.name for a in ARCHS.values() if core(expected_shapes(a)) == core(shapes)]
    by_name = arch_for_filename(path) if path else None
    if by_name is not None and by_name.name in names:
        names.remove(by_name.name)
        names.insert(0, by_name.name)
    return names


def describe(arch):
    a, t = get_arch(arch), get_arch(arch).test
    how = f"{t.mode}" + (f" {t.crop}px windows, stride {t.stride}" if t.mode == "slide" else "")
    how += ", scales " + "/".join(f"{s:g}" for s in t.scales) + (", flip" if t.flip else "")
    if t.fit:
        how += f", resized to fit {t.fit[0]}" + (f"x{t.fit[1]}" if t.fit[1] else " (long side)")
    return (f"{a.name}: {a.layout} weights, {a.dataset} ({a.nclass} classes), {a.backbone}"
            f"{', deep stem ' + str(a.stem_width) if a.deep_stem else ''}{', multi-grid' if a.multi_grid else ''}"
            f"{', aux head' if a.aux else ''}, align_corners={a.align_corners}; test: {how}")


def main():
    for name in ARCHS:
        print(describe(name))


if __name__ == "__main__":
    main()
