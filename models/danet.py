"""DANet (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019).

Dilated ResNet backbone at output stride 8 and the released DANetHead, with the released code's
module names so its checkpoints load with ``strict=True``: the backbone lives under
``pretrained.*`` and the head under ``head.*`` (``head.conv5a.0.weight``, ``head.sa.gamma``, ...);
the optional FCN auxiliary head is ``auxlayer.*``. The attention blocks are danet_ops' fused
``PositionAttention`` / ``ChannelAttention(mode="original")``.
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from danet_ops import ChannelAttention, PositionAttention

# name -> (blocks per stage, width of the first stage). "mini" is the CPU demo's: the same
# bottleneck ResNet at output stride 8 with two blocks per stage at 1/8 of the width.
BACKBONES = {
    "mini": ((2, 2, 2, 2), 8),
    "resnet50": ((3, 4, 6, 3), 64),
    "resnet101": ((3, 4, 23, 3), 64),
    "resnet152": ((3, 8, 36, 3), 64),
}


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), with a dilation."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """ResNet with layer3/layer4 dilated (2, 4) instead of strided: output stride 8.

    Key names follow torchvision (``conv1``, ``bn1``, ``layerK.i.convJ``, ``downsample.0/1``), so its
    ImageNet weights load. ``deep_stem`` replaces the 7x7 conv by three 3x3 convs
    (``conv1.0/1/3/4/6``: stem_width, stem_width, 2*stem_width channels) as in the released DANet
    ResNets (stem_width 64) and mmseg's ResNetV1c (stem_width 32). As in both, the first block of a
    dilated stage uses half the stage's dilation; ``multi_grid`` gives layer4's blocks the
    dilations ``multi_dilation`` (cycled) instead.
    """

    def __init__(self, layers=(3, 4, 6, 3), width=64, deep_stem=False, stem_width=64,
                 multi_grid=False, multi_dilation=(4, 8, 16), norm_layer=nn.BatchNorm2d):
        super().__init__()
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, 2, 1, bias=False), norm_layer(stem_width), nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False), norm_layer(stem_width), nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, 2 * stem_width, 3, 1, 1, bias=False),
            )
            self.inplanes = 2 * stem_width
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.inplanes = width
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        mk = partial(self._make_layer, norm_layer=norm_layer)
        self.layer1 = mk(width, layers[0], 1, [1] * layers[0])
        self.layer2 = mk(width * 2, layers[1], 2, [1] * layers[1])
        self.layer3 = mk(width * 4, layers[2], 1, [1] + [2] * (layers[2] - 1))
        l4 = ([multi_dilation[i % len(multi_dilation)] for i in range(layers[3])] if multi_grid
              else [2] + [4] * (layers[3] - 1))
        self.layer4 = mk(width * 8, layers[3], 1, l4)
        self.out_channels = (width * 4, width * 8, width * 16, width * 32)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, blocks, stride, dilations, norm_layer):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                norm_layer(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, dilations[0], downsample, norm_layer)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, 1, d, None, norm_layer) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


def _conv_bn_relu(cin, cout, norm_layer):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU())


def _classifier(cin, nclass):
    return nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(cin, nclass, 1))


class DANetHead(nn.Module):
    """The released DANetHead: a PAM branch and a CAM branch, each with three logits' worth of convs."""

    def __init__(self, in_channels, nclass, norm_layer=nn.BatchNorm2d, reduction=8, backend="auto"):
        super().__init__()
        inter = in_channels // 4
        self.conv5a = _conv_bn_relu(in_channels, inter, norm_layer)
        self.conv5c = _conv_bn_relu(in_channels, inter, norm_layer)
        self.sa = PositionAttention(inter, reduction=reduction, backend=backend)
        self.sc = ChannelAttention(mode="original", backend=backend)
        self.conv51 = _conv_bn_relu(inter, inter, norm_layer)
        self.conv52 = _conv_bn_relu(inter, inter, norm_layer)
        self.conv6 = _classifier(inter, nclass)
        self.conv7 = _classifier(inter, nclass)
        self.conv8 = _classifier(inter, nclass)

    def forward(self, x, return_features=False):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        feat = sa_conv + sc_conv
        outs = self.conv8(feat), self.conv6(sa_conv), self.conv7(sc_conv)
        return (*outs, feat) if return_features else outs


class FCNHead(nn.Module):
    """The released auxiliary head on layer3 (``auxlayer.conv5.0/1/4``)."""

    def __init__(self, in_channels, nclass, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inter = in_channels // 4
        self.conv5 = nn.Sequential(*_conv_bn_relu(in_channels, inter, norm_layer), *_classifier(inter, nclass))

    def forward(self, x):
        return self.conv5(x)


class DANet(nn.Module):
    """DANet on a dilated ResNet (output stride 8).

    ``forward(x)`` returns the logits ``(fused, pam_only, cam_only)``, each ``[B, nclass, H, W]``
    (bilinearly upsampled to the input size); with ``aux=True`` and in training mode the FCN
    auxiliary logits on layer3 are appended as a fourth output.

    ``scale_attention=(1.0, 0.75, 0.5)`` adds Attention to Scale (Chen et al., CVPR 2016): the
    shared network runs on the input resized by each scale; a small head (``scale_attn``: 3x3
    conv, ReLU, 1x1 conv to one channel per scale) on the concatenated last head features
    (``conv51 + conv52``), all resized to the largest scale's feature map, gives per-pixel softmax
    weights over the scales; every output above is then the weighted sum of the scales' logits
    (resized to that same map, then upsampled to the input size). In training mode each scale's
    own fused logits follow as extra outputs (for the extra supervision of the paper), in the
    order of the scales. A single scale of 1 is plain DANet.
    """

    def __init__(self, nclass, backbone="resnet50", aux=False, deep_stem=False, stem_width=64,
                 multi_grid=False, multi_dilation=(4, 8, 16), norm_layer=nn.BatchNorm2d,
                 align_corners=True, attention_backend="auto", scale_attention=None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        layers, width = BACKBONES[backbone]
        self.nclass = nclass
        self.align_corners = align_corners
        self.pretrained = DilatedResNet(layers, width, deep_stem, stem_width, multi_grid, multi_dilation, norm_layer)
        c3, c4 = self.pretrained.out_channels[2:]
        self.head = DANetHead(c4, nclass, norm_layer, backend=attention_backend)
        self.auxlayer = FCNHead(c3, nclass, norm_layer) if aux else None
        self.scales = (1.0,)
        self.scale_attn = None
        if scale_attention is not None:
            self.set_scales(scale_attention, _init=True)
            if len(self.scales) > 1:
                inter = c4 // 4  # the head's feature width (512 for ResNet-50/101, as in the paper's head)
                self.scale_attn = nn.Sequential(
                    nn.Conv2d(len(self.scales) * inter, inter, 3, padding=1), nn.ReLU(inplace=True),
                    nn.Conv2d(inter, len(self.scales), 1))

    def set_scales(self, scales, _init=False):
        """Change the input scales of scale attention (as many as the model was built with)."""
        scales = tuple(float(s) for s in scales)
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scale_attention needs positive scales, got {scales}")
        if not _init and len(scales) != len(self.scales):
            raise ValueError(f"this model was built for {len(self.scales)} scales {self.scales}, got {scales}")
        self.scales = scales

    def _up(self, t, size):
        return t if t.shape[-2:] == tuple(size) else \
            F.interpolate(t, size, mode="bilinear", align_corners=self.align_corners)

    def _single(self, x, features=False):
        """Logits at feature resolution [fused, pam, cam(, aux in training)] (and the last head features)."""
        _, _, c3, c4 = self.pretrained(x)
        *outs, feat = self.head(c4, return_features=True)
        if self.auxlayer is not None and self.training:
            outs.append(self.auxlayer(c3))
        return (outs, feat) if features else outs

    def scale_forward(self, x):
        """Attention to Scale at feature resolution: ``{"outputs": merged logits [fused, pam, cam(,
        aux)], "weights": [B, S, h, w] softmax over the scales, "scale_logits": each scale's fused
        logits}``, all at the largest scale's feature size ``h x w``."""
        H, W = x.shape[-2:]
        runs = []
        for s in self.scales:
            xs = x if s == 1 else F.interpolate(x, (max(1, round(H * s)), max(1, round(W * s))),
                                                mode="bilinear", align_corners=self.align_corners)
            runs.append(self._single(xs, features=True))
        ref = runs[max(range(len(self.scales)), key=lambda i: self.scales[i])][1].shape[-2:]
        if self.scale_attn is None:  # one scale: weight 1
            weights = x.new_ones(x.shape[0], 1, *ref)
        else:
            feats = torch.cat([self._up(feat, ref) for _, feat in runs], 1)
            weights = self.scale_attn(feats).float().softmax(1)
        merged = [sum(weights[:, i:i + 1] * self._up(outs[k], ref) for i, (outs, _) in enumerate(runs))
                  for k in range(len(runs[0][0]))]
        return {"outputs": merged, "weights": weights, "scale_logits": [self._up(outs[0], ref) for outs, _ in runs]}

    def forward(self, x):
        size = x.shape[-2:]
        if self.scales == (1.0,):
            outs = self._single(x)
        else:
            r = self.scale_forward(x)
            outs = r["outputs"] + (r["scale_logits"] if self.training and len(self.scales) > 1 else [])
        return tuple(F.interpolate(o, size, mode="bilinear", align_corners=self.align_corners) for o in outs)

    def param_groups(self):
        """(backbone params, head params): the trainer gives the head 10x the learning rate."""
        backbone = list(self.pretrained.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]
