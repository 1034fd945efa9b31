"""Compile proof of the torch-free CUDA kernels (csrc/**/*.cu) with the machine's nvcc alone.

No torch include path is given, so any torch/ATen/c10 dependency fails the build. Every .cu is
compiled for sm_80 and sm_90a with `-Xptxas -v` (the flags of setup.py's CUDA build), the
ptxas report is parsed, and any register spill in a kernel fails the test. The objects' SASS
(cuobjdump: the CUDA toolkit's, else the one Triton bundles) shows the matrix instruction of
every instance of the matrix kernels: mma.sync, i.e. HMMA, on both architectures (fp16/bf16:
HMMA.16816.F32[.BF16]; fp32 with TF32 allowed: HMMA.1688.F32.TF32; fp32 without: FFMA, no
matrix instruction). Skips only when nvcc (or, for the SASS, cuobjdump) is absent. Two files
compile in parallel at most (CI machines have few cores).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = tuple(f"sm_{a}" for a in json.loads(
    (Path(__file__).resolve().parent.parent / "csrc" / "build_flags.json").read_text())["cuda_archs"])
# The kernels whose spill-freedom is the point of the test; each must appear for every arch.
MAIN_KERNELS = ("pam_pv_kernel", "pam_dqk_kernel", "cam_gram_kernel", "cam_mix_kernel")
# The build recipe of setup.py / the JIT build / CMake (csrc/build_flags.json), plus ptxas -v.
_FLAGS = json.loads((Path(__file__).resolve().parent.parent / "csrc" / "build_flags.json").read_text())
NVCC_FLAGS = _FLAGS["nvcc"] + ["-Xptxas", "-v"]
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.M)


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cuda_sources():
    return sorted(CSRC.rglob("*.cu")), sorted(CSRC.rglob("*.cuh"))


def test_kernel_sources_are_torch_free():
    cu, cuh = _cuda_sources()
    assert cu, "no .cu sources under csrc/"
    offenders = [str(p.relative_to(ROOT)) for p in cu + cuh if TORCH_INCLUDE.search(p.read_text())]
    assert not offenders, f"torch/ATen/c10 included by kernel sources: {offenders}"


def _parse_ptxas(text):
    """{(arch, mangled kernel): {"regs": int, "stack": int, "spill_st": int, "spill_ld": int}}"""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = (m.group(2), m.group(1))
            out[cur] = {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                            spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            cur = None
    return out


def _demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


@pytest.fixture(scope="module")
def ptxas(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    cu, _ = _cuda_sources()
    tmp = tmp_path_factory.mktemp("nvcc")

    def build(job):  # one (source, arch) per nvcc process keeps the two workers balanced
        src, arch = job
        cmd = [nvcc, *NVCC_FLAGS, "-gencode", f"arch=compute_{arch[3:]},code={arch}",
               "-I", str(src.parent), "-c", str(src), "-o", str(tmp / f"{src.stem}.{arch}.o")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        return src, cmd, res

    jobs = sorted(((src, arch) for src in cu for arch in ARCHS),
                  key=lambda j: -j[0].stat().st_size)  # biggest first
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(build, jobs))
    failures = [f"{' '.join(cmd)}\n{res.stdout}{res.stderr}" for _, cmd, res in results
                if res.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n\n".join(failures)
    report, objects = {}, {}
    for (src, arch), (_, _, res) in zip(jobs, results):
        objects[(src.name, arch)] = tmp / f"{src.stem}.{arch}.o"
        for key, info in _parse_ptxas(res.stdout + res.stderr).items():
            report[key] = dict(info, file=src.name)
    names = _demangle(sorted({k for _, k in report}))
    lines = [f"{'arch':7} {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel"]
    for (arch, k), info in sorted(report.items(), key=lambda kv: (kv[0][0], names[kv[0][1]])):
        pretty = re.sub(r"danet_cuda::(\(anonymous namespace\)::)?(dev::)?", "", names[k])
        lines.append(f"{arch:7} {info.get('regs', -1):>4} {info.get('stack', -1):>5} "
                     f"{info.get('spill_st', -1):>5}/{info.get('spill_ld', -1):<5}  {pretty}")
    print("\nptxas summary:\n" + "\n".join(lines))
    return report, names, objects


def test_every_arch_builds_the_main_kernels(ptxas):
    report, _, _ = ptxas
    for arch in ARCHS:
        kernels = [k for a, k in report if a == arch]
        for name in MAIN_KERNELS:
            assert any(name in k for k in kernels), f"{name} not compiled for {arch}"


def test_no_register_spills(ptxas):
    report, names, _ = ptxas
    spilled = [f"{arch} {names[k]} ({info['file']}): {info.get('spill_st')} B spill stores, "
               f"{info.get('spill_ld')} B spill loads"
               for (arch, k), info in report.items()
               if info.get("spill_st", 0) or info.get("spill_ld", 0)]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    missing = [f"{arch} {names[k]}" for (arch, k), info in report.items() if "spill_st" not in info]
    assert not missing, f"no ptxas spill report parsed for: {missing}"


def _cuobjdump():
    """The CUDA toolkit's cuobjdump (next to nvcc), else the one Triton bundles."""
    nvcc = _nvcc()
    for cand in ([shutil.which("cuobjdump")]
                 + ([os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump")] if nvcc else [])
                 + [os.path.join(h, "bin", "cuobjdump") for h in
                    (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if h]):
        if cand and os.access(cand, os.X_OK):
            return cand
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cand = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(cand, os.X_OK):
            return cand
    return None


# A matrix kernel instance by its mangled name: kernel<T, TF32, ...> with T = float / __half /
# __nv_bfloat16 (every matrix kernel's first two template arguments).
_INSTANCE = re.compile(r"(%s)I(f|6__half|13__nv_bfloat16)Lb([01])E" % "|".join(MAIN_KERNELS))
_DTYPE = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}
_MMA = re.compile(r"\b([A-Z]*MMA(?:\.[0-9A-Zx_]+)*)")
# The matrix instruction each instance must use (mma.sync on sm_80 and sm_90a alike).
EXPECTED_MMA = {("fp16", False): "HMMA.16816.F32", ("bf16", False): "HMMA.16816.F32.BF16",
                ("fp32", True): "HMMA.1688.F32.TF32", ("fp32", False): None}


def _parse_sass(text):
    """{mangled function: {opcode with modifiers: count}} of the matrix and FFMA instructions."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        for op in _MMA.findall(line) + re.findall(r"\b(FFMA)\b", line):
            cur[op] = cur.get(op, 0) + 1
    return out


@pytest.fixture(scope="module")
def sass(ptxas):
    _, _, objects = ptxas
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled copy)")
    table = {}  # (arch, kernel, dtype, tf32) -> {matrix instruction: count}, FFMA count
    for (src, arch), obj in sorted(objects.items()):
        res = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{tool} -sass {obj} failed:\n{res.stderr}"
        for fn, ops in _parse_sass(res.stdout).items():
            m = _INSTANCE.search(fn)
            if m:
                key = (arch, m.group(1), _DTYPE[m.group(2)], m.group(3) == "1")
                entry = table.setdefault(key, {"mma": {}, "ffma": 0})
                for op, n in ops.items():
                    if op == "FFMA":
                        entry["ffma"] += n
                    else:
                        entry["mma"][op] = entry["mma"].get(op, 0) + n
    lines = [f"{'arch':7} {'kernel':16} {'dtype':5} {'tf32':5} matrix instruction (count)"]
    for (arch, kern, dt, tf), e in sorted(table.items()):
        mma = ", ".join(f"{op} ({n})" for op, n in sorted(e["mma"].items())) or f"none (FFMA: {e['ffma']})"
        lines.append(f"{arch:7} {kern:16} {dt:5} {str(tf):5} {mma}")
    print(f"\nSASS matrix instructions ({tool}):\n" + "\n".join(lines))
    return table


def test_matrix_kernels_use_mma_sync_on_every_arch(sass):
    for arch in ARCHS:
        for kern in MAIN_KERNELS:
            for (dt, tf), want in EXPECTED_MMA.items():
                found = {k: v for k, v in sass.items() if k[:3] == (arch, kern, dt) and k[3] == tf}
                assert found, f"no {kern} instance for {dt} (tf32={tf}) in the {arch} SASS"
                for key, e in found.items():
                    ops = set(e["mma"])
                    if want is None:
                        assert not ops and e["ffma"], f"{key}: expected FFMA only, got {ops}"
                    else:
                        assert ops == {want}, f"{key}: expected {want} (mma.sync), got {ops or 'none'}"


def _cuda_include(nvcc):
    homes = [Path(nvcc).resolve().parent.parent, Path(nvcc).parent.parent]
    homes += [Path(h) for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    homes.append(Path("/usr/local/cuda"))
    for home in homes:
        if (home / "include" / "cuda_runtime_api.h").is_file():
            return home / "include"
    return None


def test_api_header_is_host_only():
    """danet_cuda.cuh is what the torch binding includes: plain C++ against the CUDA runtime API."""
    nvcc = _nvcc()
    cxx = shutil.which("c++") or shutil.which("g++")
    include = _cuda_include(nvcc) if nvcc else None
    if include is None or cxx is None:
        pytest.skip("CUDA headers or a host C++ compiler not found")
    res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-x", "c++",
                          "-I", str(include), "-I", str(CSRC / "cuda"), "-"],
                         input='#include "danet_cuda.cuh"\n', capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
