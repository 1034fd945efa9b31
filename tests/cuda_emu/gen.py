"""Rewrite csrc/cuda sources into host-compilable C++ for the CUDA emulator (see README.md).

The kernels' own logic is kept verbatim; only the CUDA-only surface is replaced:
  * the inline-PTX block of device_utils.cuh (between the "PTX" and "tile loads" markers) by
    ptx_emu.inc (emulated cp.async / ldmatrix / mma.sync / tf32 rounding),
  * dynamic / static __shared__ declarations by the emulator's per-block buffer / statics,
  * kernel<<<grid, block, smem, stream>>>(args) by emu::launch(grid, block, smem, stream, kernel, args),
  * the few runtime calls of the launchers by emu_rt:: fakes,
  * the relative include of the op contract (csrc/contract.h) by its absolute path in the
    repository (the copies live elsewhere; the header is read from its one place).
A marker or pattern that is no longer found is an error (the generated copy would silently
test something else).

Usage: python gen.py CSRC_CUDA_DIR OUT_DIR
"""
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("danet_cuda.cuh", "device_utils.cuh", "pam_kernels.cu", "cam_kernels.cu")
PTX_BEGIN = "// ----------------------------------------------------------------- PTX"
PTX_END = "// ------------------------------------------------------------- tile loads"
CONTRACT_INCLUDE = '#include "../contract.h"'


def fix_launches(s):
    res, i = [], 0
    while True:
        j = s.find("<<<", i)
        if j < 0:
            res.append(s[i:])
            break
        k, depth = j, 0  # callee: scan back over the identifier / template arguments
        while k > 0:
            c = s[k - 1]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
            elif depth == 0 and not (c.isalnum() or c in "_:"):
                break
            k -= 1
        callee = s[k:j]
        e = s.find(">>>", j)
        cfg = s[j + 3:e]
        if s[e + 3] != "(":
            raise ValueError(f"unexpected launch syntax: {s[e:e + 20]!r}")
        d, m = 0, e + 3
        while True:
            if s[m] == "(":
                d += 1
            elif s[m] == ")":
                d -= 1
                if d == 0:
                    break
            m += 1
        args = s[e + 4:m]
        res.append(s[i:k])
        res.append(f"emu::launch({cfg}, {callee}, {args})")
        i = m + 1
    return "".join(res)


def _replace(s, old, new, fname, required=True):
    if required and old not in s:
        raise ValueError(f"{fname}: pattern {old!r} not found; update tests/cuda_emu/gen.py")
    return s.replace(old, new)


def generate(src, out):
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ptx = (HERE / "ptx_emu.inc").read_text()
    launches = contract_includes = 0
    for f in FILES:
        s = (src / f).read_text()
        if f == "device_utils.cuh":
            a, b = s.find(PTX_BEGIN), s.find(PTX_END)
            if a < 0 or b < a:
                raise ValueError(f"{f}: PTX block markers not found; update tests/cuda_emu/gen.py")
            s = s[:a] + ptx + s[b:]
        if CONTRACT_INCLUDE in s:
            s = s.replace(CONTRACT_INCLUDE, f'#include "{(src.parent / "contract.h").resolve()}"')
            contract_includes += 1
        s = s.replace("extern __shared__ __align__(16) unsigned char smem[];",
                      "unsigned char* smem = emu::dyn_smem;")
        s = s.replace("extern __shared__ float row[];",
                      "float* row = reinterpret_cast<float*>(emu::dyn_smem);")
        if "extern __shared__" in s:
            raise ValueError(f"{f}: unhandled extern __shared__ declaration; update gen.py")
        s = re.sub(r"\b__shared__\b", "static", s)  # blocks run one after another
        for old, new in (("cudaGetDevice(", "emu_rt::get_device("),
                         ("cudaDeviceGetAttribute(", "emu_rt::device_get_attribute("),
                         ("cudaFuncSetAttribute(", "emu_rt::func_set_attribute("),
                         ("cudaMemsetAsync(", "emu_rt::memset_async("),
                         ("cudaGetLastError()", "emu_rt::get_last_error()")):
            s = s.replace(old, new)
        launches += s.count("<<<")
        s = fix_launches(s)
        (out / f).write_text(s)
    if not launches:
        raise ValueError("no kernel launches found in the sources")
    if not contract_includes:
        raise ValueError(f"{CONTRACT_INCLUDE} not found in the sources; update gen.py")
    return out


if __name__ == "__main__":
    generate(sys.argv[1], sys.argv[2])
    print("ok")
