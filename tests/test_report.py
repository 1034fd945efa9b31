"""benchmarks/report.py on tiny synthetic benchmark summaries (CPU and GPU): files, header,
OOM and skipped rows, derived numbers, the verdicts against the performance targets, and the raw
JSON kept in the dated folder. No benchmark is run."""
import csv
import json

import pytest

pytest.importorskip("matplotlib")
from benchmarks import report  # noqa: E402

MIB = 2 ** 20


def row(op, pas, backend, H, W, t, mem, device="cpu", dtype="float32", B=1, status="ok", **kw):
    N, C, Cq = H * W, 512, 64 if op == "pam" else 0
    flops = B * 2 * N * N * ((Cq + C) if pas == "fwd" else (4 * Cq + 3 * C)) if op == "pam" else \
        B * (4 if pas == "fwd" else 12) * C * C * N
    r = dict(op=op, backend=backend, device=device, dtype=dtype, B=B, C=C, Cq=Cq, H=H, W=W, N=N,
             flops=flops, peak_mem=mem, input_bytes=N * C * 8, status=status, **{"pass": pas}, **kw)
    if op == "cam":
        r["bytes"] = B * (2 if pas == "fwd" else 5) * C * N * (2 if dtype == "bfloat16" else 4)
    if status == "ok":
        r.update(median_s=t, iqr_s=t / 20, min_s=t * 0.95, max_s=t * 1.1, rounds=3)
    return r


CPU_ROWS = [
    row("pam", "fwdbwd", "reference", 96, 96, 4.0, 900 * MIB),
    row("pam", "fwdbwd", "sdpa", 96, 96, 4.4, 700 * MIB),
    row("pam", "fwdbwd", "cpu", 96, 96, 3.2, 40 * MIB),
    row("pam", "fwdbwd", "reference", 128, 128, None, None, status="OOM", note="can't allocate memory"),
    row("pam", "fwdbwd", "cpu", 128, 128, 9.0, 70 * MIB),
    row("pam", "fwd", "reference", 96, 96, 1.5, 500 * MIB),
    row("pam", "fwd", "cpu", 96, 96, 1.0, 20 * MIB),
    row("cam", "fwdbwd", "reference", 128, 128, 2.6, 300 * MIB),
    row("cam", "fwdbwd", "cpu", 128, 128, 2.0, 320 * MIB),
    dict(row("pam", "fwd", "reference", 512, 1024, 20.0, 3000 * MIB), op="model-infer", flops=None),
    dict(row("pam", "fwd", "cpu", 512, 1024, 16.0, 2000 * MIB), op="model-infer", flops=None),
]
GPU_ROWS = [
    row("pam", "fwdbwd", "reference", 128, 128, 0.020, 9000 * MIB, "cuda", "bfloat16", 2),
    row("pam", "fwdbwd", "sdpa", 128, 128, None, None, "cuda", "bfloat16", 2, status="unsupported"),
    row("pam", "fwdbwd", "triton", 128, 128, 0.003, 40 * MIB, "cuda", "bfloat16", 2),
    row("pam", "fwdbwd", "reference", 128, 256, None, None, "cuda", "bfloat16", 2, status="OOM"),
    row("pam", "fwdbwd", "triton", 128, 256, 0.011, 82 * MIB, "cuda", "bfloat16", 2),
    row("cam", "fwdbwd", "reference", 128, 256, 0.004, 300 * MIB, "cuda", "bfloat16", 2),
    row("cam", "fwdbwd", "triton", 128, 256, 0.0004, 100 * MIB, "cuda", "bfloat16", 2),
]
MACHINE = {"date": "2026-11-20", "python": "3.12.1", "torch": "2.11.0+cu130", "threads": 2,
           "cpu": "Test CPU 9000", "cpu_count": 2, "triton": "3.6.0"}


def write(path, machine, rows, matmul, copy):
    path.write_text(json.dumps({"machine": machine, "matmul_flops_per_s": matmul,
                                "copy_bytes_per_s": copy, "full": True, "rows": rows}))
    return str(path)


def test_report_files_header_oom_and_verdicts(tmp_path):
    cpu = write(tmp_path / "bench-cpu.json", MACHINE, CPU_ROWS, {"cpu": 100e9}, {"cpu": 10e9})
    gpu = write(tmp_path / "bench-gpu.json", dict(MACHINE, gpu="NVIDIA H100 80GB HBM3", cuda="13.0"),
                GPU_ROWS, {"cuda": 700e12}, {"cuda": 3e12})
    out = tmp_path / "results"
    assert report.main(["--json", cpu, gpu, "--out", str(out)]) == 0

    cpu_md = out / "cpu-test-cpu-9000-2026-11-20.md"
    gpu_md = out / "gpu-nvidia-h100-80gb-hbm3-2026-11-20.md"
    for md, pngs in [(cpu_md, ["pam-fwdbwd", "pam-fwd", "cam-fwdbwd", "model"]),
                     (gpu_md, ["pam-fwdbwd", "cam-fwdbwd"])]:
        text = md.read_text()
        for word in ["2.11.0+cu130", "triton", "3.6.0", "2026-11-20", "Performance targets"]:
            assert word in text
        for name in pngs:
            png = out / md.stem / f"{name}.png"
            assert png.read_bytes()[:4] == b"\x89PNG" and f"{md.stem}/{name}.png" in text
        rows = list(csv.DictReader(open(md.with_suffix(".csv"))))
        assert rows and all(r["torch"] == "2.11.0+cu130" and r["date"] == "2026-11-20" for r in rows)

    text = cpu_md.read_text()
    assert "cpu: Test CPU 9000" in text and "CUDA | none" in text
    assert "| float32 | 128×128 | 1 | reference | **OOM** |" in text
    assert "| float32 | 128×128 | 1 | cpu | 9000.00 | 450.00 | reference OOM |" in text
    verdict = {(t, b): (m, v) for t, b, m, v in report.verdicts(report.groups([report.load(cpu)])[
        ("cpu", "Test CPU 9000", "2026-11-20")])}
    assert verdict["PAM fwd+bwd peak memory ≤ 3% of reference at 128×128", "cpu"][1] == "pass"
    assert verdict["CAM fwd+bwd ≥ 1.5× faster than reference at 128×128", "cpu"] == ("1.30× vs reference", "FAIL")
    # 2·N²·(4·64+3·512) FLOPs at N = 128² in 9 s is 107 GFLOP/s: 107% of the 100 GFLOP/s matmul
    assert verdict["PAM fwd+bwd ≥ 90% of the sgemm rate at 128×128", "cpu"] == ("107% of matmul", "pass")
    assert verdict["bf16 PAM fwd ≥ 1.5× the bf16 reference at 96×96", "-"][1] == "not measured"
    model = "DANet-R50 inference 512×1024, fp32: fused"
    assert verdict[f"{model} ≥ 1.3× released", "cpu"] == ("1.25× vs reference", "FAIL")
    assert verdict[f"{model} uses less memory", "cpu"] == ("66.7% of reference", "pass")
    assert verdict["PAM fwd ≥ 50% of the bf16 matmul rate at 128×256", "-"][1] == "not measured"
    assert "| infer | 512×1024 | 1 | float32 | cpu | 16000 | 800 | 0.0625 | 1.25× |" in text

    text = gpu_md.read_text()
    assert "cuda: NVIDIA H100 80GB HBM3" in text and "| CUDA | 13.0 |" in text
    assert "% of BW bound" in text and "**unsupported**" in text
    g = report.groups([report.load(gpu)])[("cuda", "NVIDIA H100 80GB HBM3", "2026-11-20")]
    verdict = {t: (m, v) for t, b, m, v in report.verdicts(g) if b == "triton"}
    assert verdict["PAM fwd+bwd ≥ 5× faster than reference at 128×256"] == ("reference OOM, triton ran", "pass")
    assert verdict["PAM fwd+bwd ≥ 1.5× faster than SDPA (memory-efficient) at 128×256"][1] == "not measured"
    assert verdict["PAM fwd+bwd peak memory linear in N (log-log slope ≤ 1.2 up to 128×256)"][1] == "pass"
    # CAM fwd+bwd streams 5·C·N·2 bytes per image: 2·5·512·32768·2 B / 3 TB/s = 112 µs; 400 µs is 3.6x
    assert verdict["CAM fwd+bwd within 2× of the memory-bandwidth bound at 128×256"] == ("3.58× the bound", "FAIL")
    assert verdict["PAM fwd ≥ 50% of the bf16 matmul rate at 128×256"][1] == "not measured"


def test_derive_matches_spec_flops():
    r = report.derive([row("pam", "fwd", "reference", 64, 64, 2.0, 10), row("pam", "fwd", "cpu", 64, 64, 1.0, 1)],
                      {"cpu": 1e9}, {})
    assert r[1]["speedup_vs_reference"] == 2.0 and r[1]["mem_ratio_vs_reference"] == 0.1
    assert r[1]["gflops"] == pytest.approx(2 * 4096 ** 2 * (64 + 512) / 1e9)
    assert r[1]["frac_of_matmul"] == pytest.approx(r[1]["gflops"])
    assert r[1]["frac_of_bandwidth"] is None and r[1]["img_per_s"] is None


def test_raw_output_kept_in_the_dated_folder_and_sized_rows(tmp_path, monkeypatch):
    # A run on a CPU whose bf16 is emulated: the bf16 reference row skipped, the matmul shrunk.
    raw = tmp_path / "tmp"
    raw.mkdir()
    machine = dict(MACHINE, cpu_mm_gflops={"float32": 112.0, "bfloat16": 0.9, "float16": 0.8},
                   cpu_lowp_hardware={"bfloat16": False, "float16": False},
                   isa_caps={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    why = "skipped: bfloat16 is emulated on this CPU (0.9 GFLOP/s against fp32's 112): ~500 s a call"
    rows = CPU_ROWS + [
        row("pam", "fwd", "reference", 96, 96, None, None, dtype="bfloat16", status="skipped", note=why),
        row("pam", "fwd", "cpu", 96, 96, 1.0, 20 * MIB, dtype="bfloat16")]
    summary = raw / "bench-cpu.json"
    summary.write_text(json.dumps({
        "machine": machine, "matmul_flops_per_s": {"cpu": 100e9},
        "matmul_flops_per_s_by_dtype": {"cpu/float32": 100e9, "cpu/bfloat16": 0.9e9},
        "matmul_n_by_dtype": {"cpu/float32": 4096, "cpu/bfloat16": 768},
        "copy_bytes_per_s": {"cpu": 10e9}, "full": True, "rows": rows}))
    (raw / "pytest-benchmark-cpu.json").write_text('{"benchmarks": []}')
    monkeypatch.setenv("DANET_OPS_BENCH_OUT", str(raw))
    out = tmp_path / "results"
    assert report.main(["--out", str(out)]) == 0   # the newest bench-*.json of the suite's output

    md = out / "cpu-test-cpu-9000-2026-11-20.md"
    folder = out / md.stem
    assert (folder / "bench-cpu.json").read_text() == summary.read_text()
    assert (folder / "pytest-benchmark-cpu.json").read_text() == '{"benchmarks": []}'
    text = md.read_text()
    assert f"| raw output | {md.stem}/bench-cpu.json, {md.stem}/pytest-benchmark-cpu.json |" in text
    assert "bfloat16 0.9 (emulated: no hardware)" in text and "`ONEDNN_MAX_CPU_ISA=AVX2`" in text
    assert "bfloat16: 0.90 GFLOP/s (768² torch.mm)" in text
    assert f"- pam fwd bfloat16 96×96 reference: {why}" in text
    assert "| bfloat16 | 96×96 | 1 | reference | **skipped** |" in text
    g = report.groups([report.load(str(summary))])[("cpu", "Test CPU 9000", "2026-11-20")]
    verdict = {(t, b): (m, v) for t, b, m, v in report.verdicts(g)}
    assert verdict["bf16 PAM fwd ≥ 1.5× the bf16 reference at 96×96", "cpu"] == ("peer skipped", "not measured")
