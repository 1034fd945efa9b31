"""models.archs and load_weights(arch=): the named published architectures, their detection from a
file's keys and shapes, mismatch errors, old checkpoints' numpy scalars, Cityscapes label IDs."""
import dataclasses
import io
import zipfile

import numpy as np
import pytest
import torch

from models import archs
from models.checkpoints import candidate_archs, load_file, load_weights
from models.readers import CITYSCAPES_COLORS, CITYSCAPES_LABEL_IDS, Cityscapes, cityscapes_label_ids
from test_models import randomized, released_to_mmseg

# cityscapesScripts' helpers/labels.py, written out: (name, id, trainId, color) of every label.
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255, (0, 0, 0)), ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)), ("out of roi", 3, 255, (0, 0, 0)), ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)), ("ground", 6, 255, (81, 0, 81)), ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)), ("parking", 9, 255, (250, 170, 160)), ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)), ("wall", 12, 3, (102, 102, 156)), ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)), ("bridge", 15, 255, (150, 100, 100)), ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)), ("polegroup", 18, 255, (153, 153, 153)), ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)), ("vegetation", 21, 8, (107, 142, 35)), ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)), ("person", 24, 11, (220, 20, 60)), ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)), ("truck", 27, 14, (0, 0, 70)), ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)), ("trailer", 30, 255, (0, 0, 110)), ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)), ("bicycle", 33, 18, (119, 11, 32)),
]


def test_cityscapes_train_ids_to_label_ids_against_the_official_table():
    trained = sorted((t, name, i, c) for name, i, t, c in CITYSCAPES_LABELS if t != 255)
    assert [t for t, *_ in trained] == list(range(19))
    assert Cityscapes.classes == tuple(name for _, name, _, _ in trained)
    assert CITYSCAPES_LABEL_IDS == tuple(i for _, _, i, _ in trained)
    assert CITYSCAPES_COLORS == tuple(c for *_, c in trained)
    train_ids = torch.tensor([[t for t, *_ in trained] + [255, 19, -1]])
    assert cityscapes_label_ids(train_ids).tolist() == [[i for _, _, i, _ in trained] + [0, 0, 0]]
    for name, i, t, _ in CITYSCAPES_LABELS:  # the reader maps the files' label IDs back (others: ignored)
        assert Cityscapes.lut[i] == t, name
    assert archs.ARCHS["danet101_cityscapes"].palette().tolist() == [list(c) for c in CITYSCAPES_COLORS]


def _dilations(model):
    return [b.conv2.dilation[0] for b in model.pretrained.layer4]


def test_entries_hold_the_published_configurations():
    rel = archs.ARCHS["danet101_cityscapes"]
    with torch.device("meta"):
        model = rel.build()
    shapes = archs.expected_shapes(rel)
    # released DANet101.pth.tar: ResNet-101 with the 7x7 stem, multi-grid (4, 8, 16), no auxiliary head
    assert shapes["pretrained.conv1.weight"] == (64, 3, 7, 7) and len(model.pretrained.layer3) == 23
    assert _dilations(model) == [4, 8, 16] and not any(k.startswith("auxlayer.") for k in shapes)
    assert shapes["head.conv8.1.weight"] == (19, 512, 1, 1) and rel.align_corners and rel.test.flip
    assert (rel.test.mode, rel.test.crop, rel.test.stride, rel.test.fit) == ("slide", 768, 512, (2048, None))
    for name, a in archs.ARCHS.items():
        assert a.mean == (123.675, 116.28, 103.53) and a.std == (58.395, 57.12, 57.375) and a.channel_order == "RGB"
        assert archs.candidates(archs.expected_shapes(a))[0:0] == [] and name in archs.candidates(archs.expected_shapes(a))
        if a.layout != "mmseg":
            continue
        with torch.device("meta"):
            m = a.build()
        s = archs.expected_shapes(a)
        # mmseg ResNetV1c: stem 32-32-64, dilations (1, 1, 2, 4) with contract_dilation; DAHead 512 /
        # pam_channels 64; FCNHead on stage 3 with 256 channels
        assert s["pretrained.conv1.0.weight"] == (32, 3, 3, 3) and s["pretrained.conv1.6.weight"] == (64, 32, 3, 3)
        assert _dilations(m) == [2, 4, 4] and s["head.sa.query_conv.weight"] == (64, 512, 1, 1)
        assert s["auxlayer.conv5.0.weight"] == (256, 1024, 3, 3)
        assert len(m.pretrained.layer3) == {"resnet50": 6, "resnet101": 23}[a.backbone]
        assert a.nclass == {"cityscapes": 19, "ade20k": 150, "voc": 21}[a.dataset]
        assert a.align_corners == ("769x769" in name) and (a.test.mode == "slide") == ("769x769" in name)
        assert a.test.fit == {"cityscapes": (2049, 1025) if "769" in name else (2048, 1024)}.get(a.dataset, (2048, 512))
    # mmseg file names name their config
    for f, want in [("danet_r50-d8_512x1024_40k_cityscapes_20200605_191324-c0dbfa5f.pth",
                     "mmseg_danet_r50_cityscapes_512x1024"),
                    ("danet_r101-d8_769x769_80k_cityscapes_20200607_132918-f3a929e7.pth",
                     "mmseg_danet_r101_cityscapes_769x769"),
                    ("danet_r50-d8_4xb4-160k_ade20k-512x512.pth", "mmseg_danet_r50_ade20k"),
                    ("danet_r101-d8_512x512_20k_voc12aug_20200618_070026-d48d23b2.pth", "mmseg_danet_r101_voc12aug")]:
        assert archs.get_arch(f).name == want
    with pytest.raises(ValueError, match="unknown arch 'danet50_citys'"):
        archs.get_arch("danet50_citys")


def tiny(name):
    """The entry with the demo's small backbone: same stem, multi-grid, aux, classes, layout,
    align_corners and protocol kind, windows and resize scaled down for 48x64 images."""
    a = archs.ARCHS[name]
    t = a.test
    fit = None if t.fit is None else (80, 40 if t.fit[1] else None)  # 48x64 -> 40x53 / 60x80
    return dataclasses.replace(a, name=name + "_tiny", backbone="mini",
                               test=dataclasses.replace(t, crop=t.crop and 32, stride=t.stride and 21, fit=fit))


@pytest.fixture
def tiny_archs(monkeypatch):
    """Every entry's small version, registered under <name>_tiny."""
    table = {**archs.ARCHS}
    for name in archs.ARCHS:
        table[name + "_tiny"] = tiny(name)
    monkeypatch.setattr(archs, "ARCHS", table)
    monkeypatch.setattr(archs, "_SHAPES", {})
    return table


def write_weights(arch, path, seed=0):
    """Random weights of ``arch`` saved in its published layout. Released: under "state_dict",
    DataParallel's "module." prefix, the backbone's fc and a numpy best_pred as the release's files
    hold them; mmseg: its key names under "state_dict" beside "meta". Returns the released-layout
    state dict."""
    torch.manual_seed(seed)
    sd = randomized(arch.build().state_dict(), seed)
    if arch.layout == "released":
        obj = {"epoch": 240, "best_pred": np.float64(0.87),
               "state_dict": {"module." + k: v for k, v in {**sd, "pretrained.fc.weight": torch.randn(1000, 2048),
                                                            "pretrained.fc.bias": torch.randn(1000)}.items()}}
    else:
        mm = {released_to_mmseg(k): v for k, v in sd.items()}
        for g in ("pam", "cam"):  # mmcv's Scale: a 0-dim tensor
            mm[f"decode_head.{g}.gamma.scale"] = mm[f"decode_head.{g}.gamma.scale"].reshape(())
        obj = {"meta": {"CLASSES": list(arch.classes), "iter": 40000}, "state_dict": mm}
    torch.save(obj, path)
    return sd


@pytest.mark.parametrize("name", sorted(archs.ARCHS))
def test_each_entry_loads_its_layout_and_is_detected(name, tiny_archs, tmp_path):
    a = tiny_archs[name + "_tiny"]
    path = tmp_path / "weights.pth"
    sd = write_weights(a, path)
    model = load_weights(None, str(path), arch=a.name)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert model.align_corners == a.align_corners and model.nclass == a.nclass
    found = candidate_archs(str(path))
    # every entry with these keys and shapes is named (the mini backbone makes alike;
    # mmseg's two Cityscapes crops differ only in align_corners and protocol); none is picked silently
    same = [n for n, b in tiny_archs.items() if n.endswith("_tiny") and archs.expected_shapes(b) ==
            archs.expected_shapes(a)]
    assert sorted(found) == sorted(same) and a.name in found
    if len(found) == 1:
        assert load_weights(None, str(path)).state_dict().keys() == model.state_dict().keys()
    else:
        with pytest.raises(ValueError, match="name the architecture.*" + ", ".join(found)):
            load_weights(None, str(path))


def test_full_size_entries_detected_from_files(tmp_path):
    """The released DANet-101 layout at full size: detected alone (not an mmseg entry), and an mmseg
    R-50 Cityscapes file resolves by its file name."""
    rel = archs.ARCHS["danet101_cityscapes"]
    path = tmp_path / "DANet101.pth.tar"
    write_weights(rel, path)
    assert candidate_archs(str(path)) == ["danet101_cityscapes"]
    model = load_weights(None, str(path))  # unique: no arch needed
    assert model.nclass == 19 and model.auxlayer is None
    mm = archs.ARCHS["mmseg_danet_r50_cityscapes_512x1024"]
    named = tmp_path / "danet_r50-d8_769x769_40k_cityscapes_20200530_025703-76681c60.pth"
    write_weights(mm, named)
    assert candidate_archs(str(named)) == ["mmseg_danet_r50_cityscapes_769x769", "mmseg_danet_r50_cityscapes_512x1024"]
    assert load_weights(None, str(named)).align_corners  # the 769x769 config, by its name
    plain = tmp_path / "weights.pth"
    named.rename(plain)
    with pytest.raises(ValueError, match="mmseg_danet_r50_cityscapes_512x1024, mmseg_danet_r50_cityscapes_769x769"):
        load_weights(None, str(plain))


def test_mismatch_names_the_first_differing_keys_and_loads_nothing(tiny_archs, tmp_path):
    ade, voc = tiny_archs["mmseg_danet_r50_ade20k_tiny"], tiny_archs["mmseg_danet_r50_voc12aug_tiny"]
    path = tmp_path / "ade.pth"
    write_weights(ade, path)
    model = voc.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as e:
        load_weights(model, str(path))
    assert str(e.value) == (
        f"{path}: does not match this DANet (backbone, deep stem, aux head, classes?):\n"
        "  8 of another shape: head.conv6.1.weight: model [21, 64, 1, 1], file [150, 64, 1, 1]; "
        "head.conv6.1.bias: model [21], file [150]; head.conv7.1.weight: model [21, 64, 1, 1], file [150, 64, 1, 1]; "
        "head.conv7.1.bias: model [21], file [150]; head.conv8.1.weight: model [21, 64, 1, 1], file [150, 64, 1, 1]"
        " (and 3 more)\n"
        "  the file matches the archs mmseg_danet_r50_ade20k_tiny, mmseg_danet_r101_ade20k_tiny")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    # another stem and no auxiliary head: missing and unexpected keys
    with pytest.raises(RuntimeError) as e:
        load_weights(None, str(path), arch="danet101_cityscapes_tiny")
    msg = str(e.value)
    assert "does not match arch danet101_cityscapes_tiny" in msg
    assert "1 missing from the file: pretrained.conv1.weight [8, 3, 7, 7]\n" in msg
    assert "not in the model: pretrained.conv1.0.weight [32, 3, 3, 3]; pretrained.conv1.1.weight [32]" in msg
    assert "auxlayer" not in msg.split("not in the model")[0]
    with pytest.raises(TypeError):
        load_weights(model, str(path), arch=ade.name)


def test_old_checkpoints_with_numpy_scalars_load(tmp_path):
    """Files pickled with numpy 1.x scalars beside the weights (the release's best_pred), in torch's
    legacy and zip formats, load with weights_only; code in a pickle still does not."""
    for legacy in (True, False):
        buf = io.BytesIO()
        torch.save({"best_pred": np.float64(0.8), "state_dict": {"a": torch.ones(2)}}, buf,
                   _use_new_zipfile_serialization=not legacy)
        data = buf.getvalue()
        if legacy:
            data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        else:  # rename inside the zip's pickle
            zin, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
            with zipfile.ZipFile(out, "w") as zout:
                for n in zin.namelist():
                    b = zin.read(n)
                    zout.writestr(n, b.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                                  if n.endswith("data.pkl") else b)
            data = out.getvalue()
        path = tmp_path / f"old{legacy}.pth.tar"
        path.write_bytes(data)
        got = load_file(str(path))
        assert float(got["best_pred"]) == 0.8 and torch.equal(got["state_dict"]["a"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(RuntimeError, match="evil.pth: cannot be read"):
        load_file(str(tmp_path / "evil.pth"))

