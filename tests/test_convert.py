"""danet_ops.convert_attention: released DANet and mmseg attention modules, restated here from
their documented behaviour (no mmseg import), swapped in place for fused ones with the same
state-dict keys, outputs and gradients."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danet_ops
from conftest import max_err


# ----------------------------------------------------------------- released DANet (da_att.py)
from test_cam import CAM_Module  # noqa: E402  (restated there, with the released class names)
from test_pam import PAM_Module  # noqa: E402


# ----------------------------------------------------------------- mmseg / mmcv, restated
class Scale(nn.Module):                      # mmcv.cnn.Scale: a 0-dim learnable factor
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class ConvModule(nn.Module):                 # mmcv ConvModule: conv [+ bn] [+ activate]
    def __init__(self, cin, cout, k=1, norm=False, act=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU() if act else None

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return x if self.activate is None else self.activate(x)


class SelfAttentionBlock(nn.Module):         # mmseg.models.utils.SelfAttentionBlock
    def __init__(self, key_in_channels, query_in_channels, channels, out_channels,
                 share_key_query, query_downsample, key_downsample, key_query_num_convs,
                 value_out_num_convs, key_query_norm, value_out_norm, matmul_norm, with_out):
        super().__init__()
        self.key_in_channels, self.query_in_channels = key_in_channels, query_in_channels
        self.out_channels, self.channels = out_channels, channels
        self.share_key_query = share_key_query
        self.key_project = self.build_project(key_in_channels, channels, key_query_num_convs,
                                              key_query_norm)
        self.query_project = self.key_project if share_key_query else self.build_project(
            query_in_channels, channels, key_query_num_convs, key_query_norm)
        self.value_project = self.build_project(key_in_channels, channels if with_out else
                                                out_channels, value_out_num_convs, value_out_norm)
        self.out_project = self.build_project(channels, out_channels, value_out_num_convs,
                                              value_out_norm) if with_out else None
        self.query_downsample = query_downsample
        self.key_downsample = key_downsample
        self.matmul_norm = matmul_norm

    @staticmethod
    def build_project(cin, ch, num_convs, use_norm):
        convs = [ConvModule(cin, ch, 1, norm=use_norm, act=use_norm)]
        for _ in range(num_convs - 1):
            convs.append(ConvModule(ch, ch, 1, norm=use_norm, act=use_norm))
        return nn.Sequential(*convs) if num_convs > 1 else convs[0]

    def forward(self, query_feats, key_feats):
        batch_size = query_feats.size(0)
        query = self.query_project(query_feats)
        if self.query_downsample is not None:
            query = self.query_downsample(query)
        query = query.reshape(*query.shape[:2], -1).permute(0, 2, 1).contiguous()
        key = self.key_project(key_feats)
        value = self.value_project(key_feats)
        if self.key_downsample is not None:
            key = self.key_downsample(key)
            value = self.key_downsample(value)
        key = key.reshape(*key.shape[:2], -1)
        value = value.reshape(*value.shape[:2], -1).permute(0, 2, 1).contiguous()
        sim_map = torch.matmul(query, key)
        if self.matmul_norm:
            sim_map = (self.channels ** -.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        context = context.reshape(batch_size, -1, *query_feats.shape[2:])
        if self.out_project is not None:
            context = self.out_project(context)
        return context


class PAM(SelfAttentionBlock):               # mmseg da_head.PAM
    def __init__(self, in_channels, channels):
        super().__init__(in_channels, in_channels, channels, in_channels, False, None, None,
                         1, 1, False, False, False, False)
        self.gamma = Scale(0)

    def forward(self, x):
        return self.gamma(super().forward(x, x)) + x


class CAM(nn.Module):                        # mmseg da_head.CAM
    def __init__(self):
        super().__init__()
        self.gamma = Scale(0)

    def forward(self, x):
        b, c, h, w = x.size()
        proj_query = x.view(b, c, -1)
        energy = torch.bmm(proj_query, x.view(b, c, -1).permute(0, 2, 1))
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        out = torch.bmm(F.softmax(energy_new, dim=-1), x.view(b, c, -1)).view(b, c, h, w)
        return self.gamma(out) + x


class PPMConcat(nn.ModuleList):              # mmseg ann_head.PPMConcat: pooled, flattened, concatenated
    def __init__(self, pool_scales=(1, 3, 6, 8)):
        super().__init__([nn.AdaptiveAvgPool2d(s) for s in pool_scales])

    def forward(self, feats):
        return torch.cat([p(feats).view(*feats.shape[:2], -1) for p in self], dim=2)


class ANNSelfAttentionBlock(SelfAttentionBlock):  # ann_head.SelfAttentionBlock (forward inherited)
    def __init__(self, low_in, high_in, channels, out_channels):
        super().__init__(low_in, high_in, channels, out_channels, False, None, PPMConcat(),
                         1, 1, True, True, True, True)


ANNSelfAttentionBlock.__name__ = "SelfAttentionBlock"   # mmseg's own name for it


class ObjectAttentionBlock(SelfAttentionBlock):  # ocr_head.ObjectAttentionBlock, scale 1
    def __init__(self, in_channels, channels):
        super().__init__(in_channels, in_channels, channels, in_channels, False, None, None,
                         2, 1, True, True, True, True)
        self.bottleneck = ConvModule(in_channels * 2, in_channels, 1, norm=True, act=True)

    def forward(self, query_feats, key_feats):
        context = super().forward(query_feats, key_feats)
        return self.bottleneck(torch.cat([context, query_feats], dim=1))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.pam = PAM(16, 4)
        self.cam = CAM()
        self.sa = PAM_Module(16)
        self.sc = CAM_Module(16)
        self.ann = ANNSelfAttentionBlock(16, 16, 8, 16)
        self.ocr = ObjectAttentionBlock(16, 8)
        self.conv = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        regions = x.flatten(2)[:, :, :5].unsqueeze(-1)             # OCR: [B, C, K, 1] "class regions"
        y = self.pam(x) + self.cam(x) + self.sa(x) + self.sc(x) + self.ann(x, x)
        return self.conv(y) + self.ocr(x, regions)


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model


def test_convert_head_same_outputs_grads_and_keys():
    model = _randomise(Head()).double().eval()
    fused = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # nothing here is a look-alike
        names = danet_ops.convert_attention(fused, backend="reference")
    assert names == ["pam", "cam", "sa", "sc", "ann", "ocr"]
    assert type(fused.sa) is danet_ops.PositionAttention and type(fused.sc) is danet_ops.ChannelAttention
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 16, 9, 8, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), fused(xb)
    assert max_err(ya, yb) < 1e-12
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert max_err(xa.grad, xb.grad) < 1e-11
    for (n, p), q in zip(model.named_parameters(), fused.parameters()):
        assert max_err(p.grad, q.grad) < 1e-10, n


@pytest.mark.parametrize("backend", ["cpu"])
def test_converted_head_on_the_fused_backend(backend):
    model = _randomise(Head()).eval()
    fused = copy.deepcopy(model)
    danet_ops.convert_attention(fused, backend=backend)
    x = torch.randn(1, 16, 7, 6)
    with torch.no_grad():
        assert max_err(model(x), fused(x)) < 1e-4 * model(x).abs().max()


def test_look_alikes_are_left_alone_and_named():
    class PAM_Module(nn.Module):     # noqa: N801  the released name, another structure
        def __init__(self):
            super().__init__()
            self.query_conv = nn.Conv2d(8, 2, 3)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = PAM_Module()
            self.cam = CAM_Module(8)

    m = Wrapper()
    with pytest.warns(UserWarning, match=r"odd \(PAM_Module without the released structure"):
        names = danet_ops.convert_attention(m)
    assert names == ["cam"] and type(m.odd) is PAM_Module


def test_converted_released_danet_head_checkpoint_round_trip(tmp_path):
    # A released-style head converted, saved, and loaded back into an unconverted one.
    model = _randomise(nn.Sequential(PAM_Module(16), CAM_Module(16)))
    fused = copy.deepcopy(model)
    danet_ops.convert_attention(fused)
    torch.save(fused.state_dict(), tmp_path / "h.pth")
    back = nn.Sequential(PAM_Module(16), CAM_Module(16))
    back.load_state_dict(torch.load(tmp_path / "h.pth"), strict=True)
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        assert max_err(back(x), fused(x)) < 1e-4 * back(x).abs().max()
