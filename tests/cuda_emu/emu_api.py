"""Build + ctypes front end of the host-emulated CUDA kernels, and the float64 references.

build(out_dir) generates host copies of csrc/cuda (gen.py) into out_dir/gen, compiles them with
the emulator (emu.h, ptx_emu.inc, api.cpp) and returns the path of libemu.so; load(path) opens it.
The csrc/cuda sources are read from the repository each time (never stored copies).
"""
import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC_CUDA = ROOT / "csrc" / "cuda"
EMU_SOURCES = ("emu.h", "ptx_emu.inc", "api.cpp", "pam_tu.cpp", "cam_tu.cpp")
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
lib = None


def cuda_include_dir():
    """A directory with cuda_runtime.h / cuda_fp16.h / cuda_bf16.h (host parts are used), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file() \
                and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


def build(out_dir, cxx="g++", opt="-O1", extra_flags=(), jobs=2):
    spec = importlib.util.spec_from_file_location("danet_cuda_emu_gen", HERE / "gen.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen.generate(CSRC_CUDA, out / "gen")
    for f in EMU_SOURCES:  # compile in out_dir so that "gen/..." resolves to the fresh copies
        shutil.copyfile(HERE / f, out / f)
    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("CUDA headers (cuda_runtime.h, cuda_fp16.h) not found")
    flags = ["-std=c++20", opt, "-w", "-fPIC", "-pthread", f"-I{inc}", f"-I{out}", *extra_flags]

    def cc(name):
        obj = out / (Path(name).stem + ".o")
        r = subprocess.run([cxx, *flags, "-c", str(out / name), "-o", str(obj)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{cxx} {name} failed:\n{r.stderr[-6000:]}")
        return str(obj)

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        objs = list(ex.map(cc, ("pam_tu.cpp", "cam_tu.cpp", "api.cpp")))
    so = out / "libemu.so"
    r = subprocess.run([cxx, "-shared", "-pthread", *extra_flags, *objs, "-o", str(so)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"link failed:\n{r.stderr[-6000:]}")
    return so


def load(so_path):
    global lib
    lib = ctypes.CDLL(str(so_path))
    for f in ("emu_pam_ws", "emu_cam_fwd_ws", "emu_cam_bwd_ws"):
        getattr(lib, f).restype = ctypes.c_size_t
    lib.emu_collectives.restype = ctypes.c_long
    return lib


def I64(*v):
    return (ctypes.c_int64 * len(v))(*v)


def NAN(*shape, dtype=torch.float32):
    """Output buffers start as NaN (workspaces as 0xFF bytes): anything left unwritten shows."""
    return torch.full(shape, float("nan"), dtype=dtype)


def WS(nbytes):
    return torch.full((nbytes,), 0xFF, dtype=torch.uint8)


def P(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def S(t):
    return I64(*t.stride()) if t is not None else None


def pam_forward(q, k, v, x=None, gamma=None, tf32=False, scale=1.0, o_dtype=torch.float32):
    """q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk], x [B, Cv, Nq]; E = scale * q^T k.
    o_dtype: O's dtype, fp32 as the binding gives it (or v's dtype: the kernels take both)."""
    B, Cq, N = q.shape
    Nk = k.shape[2]
    Cv = v.shape[1]
    o = NAN(B, Cv, N, dtype=o_dtype)
    lse = NAN(B, N)
    y = None
    g = None
    if x is not None:
        ydt = torch.promote_types(torch.promote_types(v.dtype, x.dtype), gamma.dtype)
        y = NAN(B, Cv, N, dtype=ydt)
        g = gamma.float().reshape(1).contiguous()
    rc = lib.emu_pam_forward(I64(B, Cq, Cv, N, Nk), P(q), S(q), P(k), S(k), P(v), S(v), DT[v.dtype],
                             P(x), S(x), DT[x.dtype] if x is not None else 0,
                             P(g), P(o), DT[o.dtype], P(lse), P(y), DT[y.dtype] if y is not None else 0, int(tf32),
                             ctypes.c_double(scale))
    assert rc == 0, rc
    return o, lse, y


def pam_backward(dy, q, k, v, o, lse, gamma=None, tf32=False, scale=1.0):
    B, Cq, N = q.shape
    Nk = k.shape[2]
    Cv = v.shape[1]
    sz = I64(B, Cq, Cv, N, Nk)
    ws = WS(lib.emu_pam_ws(sz))
    dym = dy if dy.dtype == v.dtype else dy.to(v.dtype)
    dq, dk, dv = NAN(B, Cq, N, dtype=q.dtype), NAN(B, Cq, Nk, dtype=k.dtype), NAN(B, Cv, Nk, dtype=v.dtype)
    dg = NAN(1 if gamma is not None else 0)
    g = gamma.float().reshape(1).contiguous() if gamma is not None else None
    rc = lib.emu_pam_backward(sz, P(dy), S(dy), DT[dy.dtype], P(dym), S(dym), P(q), S(q), P(k), S(k),
                              P(v), S(v), P(o), S(o), DT[o.dtype], P(lse), P(g), P(dq), P(dk), P(dv),
                              P(dg), P(ws), DT[v.dtype], int(tf32), ctypes.c_double(scale))
    assert rc == 0, rc
    return dq, dk, dv, dg


def cam_forward(x, gamma=None, paper=False, tf32=False):
    B, C, N = x.shape
    sz = I64(B, C, N)
    ws = WS(lib.emu_cam_fwd_ws(sz, DT[x.dtype]))
    o = NAN(B, C, N, dtype=x.dtype)
    attn = NAN(B, C, C)
    y = g = None
    if gamma is not None:
        y = NAN(B, C, N, dtype=torch.promote_types(x.dtype, gamma.dtype))
        g = gamma.float().reshape(1).contiguous()
    rc = lib.emu_cam_forward(sz, P(x), S(x), DT[x.dtype], P(g), int(paper), P(o), P(attn), P(y),
                             DT[y.dtype] if y is not None else 0, P(ws), int(tf32))
    assert rc == 0, rc
    return o, attn, y


def cam_backward(dy, x, attn, o, gamma=None, paper=False, tf32=False):
    B, C, N = x.shape
    sz = I64(B, C, N)
    ws = WS(lib.emu_cam_bwd_ws(sz, DT[x.dtype]))
    dym = dy if dy.dtype == x.dtype else dy.to(x.dtype)
    dx = NAN(B, C, N, dtype=x.dtype)
    dg = NAN(1 if gamma is not None else 0)
    g = gamma.float().reshape(1).contiguous() if gamma is not None else None
    rc = lib.emu_cam_backward(sz, P(dy), S(dy), DT[dy.dtype], P(dym), S(dym), P(x), S(x), P(attn),
                              P(o), S(o), DT[o.dtype], P(g), int(paper), P(dx), P(dg), P(ws),
                              DT[x.dtype], int(tf32))
    assert rc == 0, rc
    return dx, dg


# ------------------------------------------------------------------ fp64 references
def ref_pam(q, k, v, x=None, gamma=None, scale=1.0):
    q, k, v = q.double(), k.double(), v.double()
    E = torch.bmm(q.transpose(1, 2), k) * scale
    A = torch.softmax(E, -1)
    O = torch.bmm(v, A.transpose(1, 2))
    lse = torch.logsumexp(E, -1)
    y = gamma.double() * O + x.double() if x is not None else None
    return O, lse, y


def ref_cam(x, gamma=None, paper=False):
    a = x.double()
    E = torch.bmm(a, a.transpose(1, 2))
    if paper:
        A = torch.softmax(E, -1)
    else:
        A = torch.softmax(E.max(-1, keepdim=True)[0].expand_as(E) - E, -1)
    O = torch.bmm(A, a)
    y = gamma.double() * O + a if gamma is not None else None
    return O, A, y


if __name__ == "__main__":  # python emu_api.py OUT_DIR [g++ flags...]: build only
    print(build(sys.argv[1], extra_flags=sys.argv[2:]))
