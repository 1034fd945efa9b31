"""The CPU kernels' dispatch: danet_ops::cpu_path / cpu_isa, and the ISA cap DANET_OPS_CPU_ISA.

The cap is read on every call, so one process can run the kernels as an AVX2-only CPU would
(no AVX512-BF16: bf16/fp16 default to fp32 tiles, brgemm never used) and check the results
against the float64 oracle there too.
"""
import pytest
import torch

from danet_ops import _compiled_ops, channel_attention, position_attention, testing

from conftest import cam_inputs, pam_inputs

pytestmark = pytest.mark.skipif(not _compiled_ops.load(build=False),
                                reason="no prebuilt danet_ops._C")

ops = torch.ops.danet_ops
LEVELS = ("default", "avx2", "avx512")
PATHS = {"fp64-tiles", "fp32-tiles", "bf16-brgemm", "fp16-brgemm", "bf16-cblas", "fp16-cblas"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.fixture
def uncapped(monkeypatch):
    monkeypatch.delenv("DANET_OPS_CPU_ISA", raising=False)
    monkeypatch.delenv("DANET_OPS_CPU_LOWP", raising=False)
    return ops.cpu_isa()


def test_isa_and_paths_are_named(uncapped):
    assert uncapped in LEVELS
    for op in ("pam", "cam"):
        assert ops.cpu_path(op, torch.float64) == "fp64-tiles"
        assert ops.cpu_path(op, torch.float32) == "fp32-tiles"
        for dt in DTYPES:
            assert ops.cpu_path(op, dt) in PATHS


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512", "AVX2"])
def test_cap_lowers_the_isa_and_never_raises_it(monkeypatch, uncapped, cap):
    monkeypatch.setenv("DANET_OPS_CPU_ISA", cap)
    want = LEVELS[min(LEVELS.index(cap.lower()), LEVELS.index(uncapped))]
    assert ops.cpu_isa() == want
    monkeypatch.delenv("DANET_OPS_CPU_ISA")
    assert ops.cpu_isa() == uncapped          # read per call


@pytest.mark.parametrize("cap", ["default", "avx2"])
@pytest.mark.parametrize("lowp", [None, "0", "1"])
def test_below_avx512_no_brgemm_and_fp32_tiles_by_default(monkeypatch, uncapped, cap, lowp):
    # As on a CPU without AVX512-BF16: bf16/fp16 take fp32 tiles unless forced, and even forced
    # never brgemm (MKL's CBLAS engine where this torch has it).
    monkeypatch.setenv("DANET_OPS_CPU_ISA", cap)
    if lowp is not None:
        monkeypatch.setenv("DANET_OPS_CPU_LOWP", lowp)
    for op in ("pam", "cam"):
        for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            path = ops.cpu_path(op, dt)
            if lowp == "1":
                assert path in (f"{name}-cblas", "fp32-tiles"), path
            else:
                assert path == "fp32-tiles", path


def test_lowp_switch_keeps_its_meaning(monkeypatch, uncapped):
    for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        monkeypatch.setenv("DANET_OPS_CPU_LOWP", "0")
        assert ops.cpu_path("pam", dt) == "fp32-tiles"
        monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
        assert ops.cpu_path("pam", dt) in (f"{name}-brgemm", f"{name}-cblas", "fp32-tiles")


@pytest.mark.parametrize("value", ["sse", "avx-512", "1", " avx2"])
def test_bad_cap_raises_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("DANET_OPS_CPU_ISA", value)
    with pytest.raises(RuntimeError, match="DANET_OPS_CPU_ISA"):
        ops.cpu_isa()
    q, k, v, x, g = pam_inputs(1, 4, 8, 6, 6)
    with pytest.raises(RuntimeError, match="DANET_OPS_CPU_ISA"):
        position_attention(q, k, v, x, g, backend="cpu")


def test_cpu_path_checks_its_arguments():
    with pytest.raises(RuntimeError, match="op must be"):
        ops.cpu_path("attention", torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be"):
        ops.cpu_path("pam", torch.int32)


@pytest.mark.parametrize("cap", ["avx2", "default"])
@pytest.mark.parametrize("lowp", ["0", "1"], ids=["lowp-off", "lowp-on"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_capped_results_match_the_oracle(monkeypatch, cap, lowp, dtype):
    monkeypatch.setenv("DANET_OPS_CPU_ISA", cap)
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", lowp)
    assert "brgemm" not in ops.cpu_path("pam", dtype)
    testing.compare_pam(lambda *t: position_attention(*t, backend="cpu"),
                        pam_inputs(2, 16, 40, 17, 19, dtype=dtype), testing.FLOOR[dtype])  # N = 323
    testing.compare_cam(lambda *t: channel_attention(*t, backend="cpu"),
                        cam_inputs(2, 40, 19, 23, dtype=dtype), "original", testing.FLOOR[dtype])


def test_cap_at_the_cpus_own_level_changes_nothing(monkeypatch, uncapped):
    # Capping at the level the CPU has selects the same kernels: the same bits.
    q, k, v, x, g = pam_inputs(1, 16, 24, 21, 23, dtype=torch.bfloat16)
    with torch.no_grad():
        a = position_attention(q, k, v, x, g, backend="cpu")
        monkeypatch.setenv("DANET_OPS_CPU_ISA", uncapped)
        b = position_attention(q, k, v, x, g, backend="cpu")
    assert torch.equal(a, b)
