"""models/: DANet shapes, released key names, loading released / torchvision / mmseg weights."""
import pytest
import torch
import torch.nn.functional as F

from models.checkpoints import build_model_from_checkpoint, convert_mmseg, load_backbone_weights, load_weights
from models.danet import DANet

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# The released DANetHead's parameters (in_channels 2048 -> inter 512, Cq 64), 19 classes.
RELEASED_HEAD = {
    "head.conv5a.0.weight": (512, 2048, 3, 3), "head.conv5c.0.weight": (512, 2048, 3, 3),
    "head.sa.query_conv.weight": (64, 512, 1, 1), "head.sa.query_conv.bias": (64,),
    "head.sa.key_conv.weight": (64, 512, 1, 1), "head.sa.key_conv.bias": (64,),
    "head.sa.value_conv.weight": (512, 512, 1, 1), "head.sa.value_conv.bias": (512,),
    "head.sa.gamma": (1,), "head.sc.gamma": (1,),
    "head.conv51.0.weight": (512, 512, 3, 3), "head.conv52.0.weight": (512, 512, 3, 3),
    "head.conv6.1.weight": (19, 512, 1, 1), "head.conv6.1.bias": (19,),
    "head.conv7.1.weight": (19, 512, 1, 1), "head.conv7.1.bias": (19,),
    "head.conv8.1.weight": (19, 512, 1, 1), "head.conv8.1.bias": (19,),
}


def released_keys(blocks, deep_stem, aux):
    """State-dict names of the released DANet (torchvision-style ResNet under ``pretrained.``)."""
    keys = ["pretrained.conv1.0.weight", "pretrained.conv1.3.weight", "pretrained.conv1.6.weight"] if deep_stem \
        else ["pretrained.conv1.weight"]
    bns = ["pretrained.conv1.1", "pretrained.conv1.4", "pretrained.bn1"] if deep_stem else ["pretrained.bn1"]
    for i, n in enumerate(blocks, 1):
        for j in range(n):
            p = f"pretrained.layer{i}.{j}"
            keys += [f"{p}.conv{c}.weight" for c in (1, 2, 3)]
            bns += [f"{p}.bn{c}" for c in (1, 2, 3)]
            if j == 0:
                keys.append(f"{p}.downsample.0.weight")
                bns.append(f"{p}.downsample.1")
    for h in ("conv5a", "conv5c", "conv51", "conv52"):
        keys.append(f"head.{h}.0.weight")
        bns.append(f"head.{h}.1")
    keys += [k for k in RELEASED_HEAD if ".sa." in k or ".sc." in k or k.split(".")[1] in ("conv6", "conv7", "conv8")]
    if aux:
        keys += ["auxlayer.conv5.0.weight", "auxlayer.conv5.4.weight", "auxlayer.conv5.4.bias"]
        bns.append("auxlayer.conv5.1")
    return set(keys) | {f"{b}.{s}" for b in bns for s in BN}


def randomized(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(1, 9, v.shape, generator=g) if not v.is_floating_point() else
                torch.rand(v.shape, generator=g) + (0.5 if "running_var" in k else -0.5)) for k, v in sd.items()}


def test_output_shapes_and_aux():
    torch.manual_seed(0)
    model = DANet(5, "mini", aux=True)
    x = torch.randn(2, 3, 40, 56)
    outs = model(x)
    assert len(outs) == 4 and all(o.shape == (2, 5, 40, 56) for o in outs)
    model.eval()
    assert len(model(x)) == 3
    c1, c2, c3, c4 = model.pretrained(x)
    assert c4.shape[-2:] == c3.shape[-2:] == (5, 7)  # output stride 8


def test_released_key_names_and_shapes():
    model = DANet(19, "resnet50")
    sd = model.state_dict()
    assert set(sd) == released_keys((3, 4, 6, 3), deep_stem=False, aux=False)
    for k, shape in RELEASED_HEAD.items():
        assert tuple(sd[k].shape) == shape, k
    assert set(DANet(19, "mini", deep_stem=True, aux=True).state_dict()) == released_keys((2, 2, 2, 2), True, True)


def test_dilations_and_multi_grid():
    def dilations(layer):
        return [b.conv2.dilation[0] for b in layer]

    net = DANet(2, "resnet101").pretrained
    assert dilations(net.layer3) == [1] + [2] * 22 and dilations(net.layer4) == [2, 4, 4]
    assert all(b.conv2.stride == (1, 1) for b in list(net.layer3) + list(net.layer4))
    assert dilations(DANet(2, "resnet50", multi_grid=True).pretrained.layer4) == [4, 8, 16]


def test_load_released_layout(tmp_path):
    torch.manual_seed(0)
    ref = DANet(4, "mini", deep_stem=True, stem_width=8, aux=True)
    released = randomized(ref.state_dict())
    released["pretrained.fc.weight"], released["pretrained.fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "danet_released.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in released.items()}}, path)  # DataParallel-saved
    model = DANet(4, "mini", deep_stem=True, stem_width=8, aux=True)
    load_weights(model, str(path))
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in released.items() if not k.startswith("pretrained.fc."))
    assert model.head.sa.gamma.item() == released["head.sa.gamma"].item()


def test_torchvision_backbone_weights(tmp_path):
    model = DANet(3, "mini")
    tv = randomized({k.removeprefix("pretrained."): v for k, v in model.state_dict().items()
                     if k.startswith("pretrained.")})
    tv["fc.weight"], tv["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    torch.save(tv, tmp_path / "resnet.pth")
    load_backbone_weights(model.pretrained, str(tmp_path / "resnet.pth"))
    assert torch.equal(model.pretrained.layer4[0].conv2.weight, tv["layer4.0.conv2.weight"])
    assert torch.equal(model.pretrained.bn1.running_var, tv["bn1.running_var"])
    deep = DANet(3, "mini", deep_stem=True).pretrained  # a 7x7-stem file does not fit a deep stem
    with pytest.raises(RuntimeError, match="resnet.pth"):
        load_backbone_weights(deep, str(tmp_path / "resnet.pth"))


# --- mmsegmentation -------------------------------------------------------------------------
def released_to_mmseg(key):
    """The mmseg DANet (ResNetV1c + DAHead + FCNHead) name of a released DANet key."""
    stem = {"pretrained.conv1.0": "backbone.stem.0", "pretrained.conv1.1": "backbone.stem.1",
            "pretrained.conv1.3": "backbone.stem.3", "pretrained.conv1.4": "backbone.stem.4",
            "pretrained.conv1.6": "backbone.stem.6", "pretrained.bn1": "backbone.stem.7"}
    head = {"conv5a.0": "pam_in_conv.conv", "conv5a.1": "pam_in_conv.bn", "sa.query_conv": "pam.query_project",
            "sa.key_conv": "pam.key_project", "sa.value_conv": "pam.value_project", "sa.gamma": "pam.gamma.scale",
            "conv51.0": "pam_out_conv.conv", "conv51.1": "pam_out_conv.bn", "conv6.1": "pam_conv_seg",
            "conv5c.0": "cam_in_conv.conv", "conv5c.1": "cam_in_conv.bn", "sc.gamma": "cam.gamma.scale",
            "conv52.0": "cam_out_conv.conv", "conv52.1": "cam_out_conv.bn", "conv7.1": "cam_conv_seg",
            "conv8.1": "conv_seg"}
    aux = {"conv5.0": "convs.0.conv", "conv5.1": "convs.0.bn", "conv5.4": "conv_seg"}
    for old, new in stem.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if key.startswith("pretrained."):
        return "backbone." + key[len("pretrained."):]
    prefix, table = ("head.", head) if key.startswith("head.") else ("auxlayer.", aux)
    rest = key[len(prefix):]
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return ("decode_head." if prefix == "head." else "auxiliary_head.") + new + rest[len(old):]
    raise KeyError(key)


def mmseg_head_forward(sd, x):
    """mmseg's DAHead.forward (eval mode), written from its definition with plain torch ops."""
    def conv_module(name, t):
        t = F.conv2d(t, sd[f"decode_head.{name}.conv.weight"], padding=1)
        bn = {s: sd[f"decode_head.{name}.bn.{s}"] for s in ("weight", "bias", "running_mean", "running_var")}
        return F.relu(F.batch_norm(t, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, 1e-5))

    def conv1x1(name, t):
        return F.conv2d(t, sd[f"decode_head.{name}.weight"], sd[f"decode_head.{name}.bias"])

    p = conv_module("pam_in_conv", x)
    q = conv1x1("pam.query_project", p).flatten(2).transpose(1, 2)
    k = conv1x1("pam.key_project", p).flatten(2)
    v = conv1x1("pam.value_project", p).flatten(2).transpose(1, 2)
    ctx = ((q @ k).softmax(-1) @ v).transpose(1, 2).reshape(p.shape)
    p = conv_module("pam_out_conv", sd["decode_head.pam.gamma.scale"] * ctx + p)
    c = conv_module("cam_in_conv", x)
    a = c.flatten(2)
    e = a @ a.transpose(1, 2)
    c = conv_module("cam_out_conv", sd["decode_head.cam.gamma.scale"] * ((e.amax(-1, keepdim=True) - e).softmax(-1) @ a).reshape(c.shape) + c)
    return conv1x1("conv_seg", p + c), conv1x1("pam_conv_seg", p), conv1x1("cam_conv_seg", c)


def test_mmseg_converter(tmp_path):
    torch.manual_seed(0)
    template = DANet(3, "mini", deep_stem=True, stem_width=8, aux=True, align_corners=False)
    released = randomized(template.state_dict())
    mmseg = {released_to_mmseg(k): v for k, v in released.items()}
    mmseg["decode_head.pam.gamma.scale"] = torch.tensor(0.7)  # mmcv Scale: 0-dim
    mmseg["decode_head.cam.gamma.scale"] = torch.tensor(0.05)
    released["head.sa.gamma"], released["head.sc.gamma"] = torch.tensor([0.7]), torch.tensor([0.05])

    converted = convert_mmseg({"meta": {}, "state_dict": mmseg})
    assert converted.keys() == released.keys()
    assert all(torch.equal(converted[k], v) for k, v in released.items())

    torch.save({"meta": {}, "state_dict": mmseg}, tmp_path / "mmseg.pth")
    model = DANet(3, "mini", deep_stem=True, stem_width=8, aux=True, align_corners=False, attention_backend="reference")
    load_weights(model, str(tmp_path / "mmseg.pth"))
    model.eval()
    x = torch.randn(2, model.pretrained.out_channels[3], 6, 5) * 0.05
    with torch.no_grad():
        for ours, theirs in zip(model.head(x), mmseg_head_forward(mmseg, x)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="decode_head.psp"):
        convert_mmseg({**mmseg, "decode_head.psp.0.weight": torch.zeros(1)})


def test_checkpoint_errors(tmp_path):
    model = DANet(3, "mini")
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(model, str(missing))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(model.pretrained, str(missing))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pth"):
        load_weights(model, str(corrupt))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth.*state dict"):
        load_weights(model, str(tmp_path / "list.pth"))
    torch.save(DANet(5, "mini").state_dict(), tmp_path / "other.pth")  # 5 classes, not 3
    with pytest.raises(RuntimeError, match="other.pth"):
        load_weights(model, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="other.pth.*models.train"):
        build_model_from_checkpoint(str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="unknown backbone"):
        DANet(3, "resnet18")


def test_scale_attention_weights_merge_and_gradients():
    """Attention to Scale: per-pixel softmax weights over the scales, fused logits = their weighted
    sum of the scales' logits, and the attention head is trained through the fused loss."""
    torch.manual_seed(0)
    model = DANet(6, "mini", aux=True, scale_attention=(1.0, 0.75, 0.5)).train()
    x = torch.randn(2, 3, 40, 40)
    r = model.scale_forward(x)
    w = r["weights"]
    assert w.shape == (2, 3, 5, 5) and (w > 0).all()  # at the largest scale's feature size (40 / 8)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 5, 5), rtol=0, atol=1e-6)  # fp32 softmax: rounding only
    merged = sum(w[:, i:i + 1] * r["scale_logits"][i] for i in range(3))
    torch.testing.assert_close(r["outputs"][0], merged, rtol=0, atol=0)
    assert len(r["outputs"]) == 4  # fused, PAM, CAM, aux: all merged with the same weights

    outs = model(x)  # training: fused, PAM, CAM, aux, then each scale's own logits
    assert len(outs) == 7 and all(o.shape == (2, 6, 40, 40) for o in outs)
    label = torch.randint(0, 6, (2, 40, 40))
    F.cross_entropy(outs[0], label).backward()
    for p in model.scale_attn.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.head.conv8[1].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert len(model(x)) == 3
    with pytest.raises(ValueError, match="built for 3 scales"):
        model.set_scales((1.0, 0.5))
    model.set_scales((1.0, 0.5, 0.25))  # other test-time scales, as many as trained
    with torch.no_grad():
        assert model(x)[0].shape == (2, 6, 40, 40)


def test_single_scale_attention_is_plain_danet():
    torch.manual_seed(0)
    plain = DANet(6, "mini", aux=True).eval()
    single = DANet(6, "mini", aux=True, scale_attention=(1.0,)).eval()
    single.load_state_dict(plain.state_dict())  # strict: one scale adds no parameters
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        for a, b in zip(plain(x), single(x), strict=True):
            assert torch.equal(a, b)
        # and a weight of exactly 1 on the one scale
        assert torch.equal(single.scale_forward(x)["weights"], torch.ones(1, 1, 6, 5))
