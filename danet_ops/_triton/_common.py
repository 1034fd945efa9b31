"""Host helpers of backend "triton": the Triton import and its mode, dot precision, launch configs.

Nothing here imports triton at module import; `load_triton()` does it once and caches.

Interpreter or compiled is a property of the process, not of a call: triton's own `tl.*`
helpers (tl.zeros, tl.sum, ...) are built as interpreted or compiled functions when triton is
first imported, according to TRITON_INTERPRET at that moment. `interpreting()` reports it.
"""
import functools
import os
import sys
from typing import NamedTuple

import torch

MIN_TRITON = (3, 0)          # tl.dot(input_precision=...), used by every kernel
_state = {}


def load_triton():
    """(triton module or None, reason). Imports triton once (cached, also when it fails)."""
    if "result" not in _state:
        try:
            import triton
            import triton.language  # noqa: F401

            version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
            if version < MIN_TRITON:
                _state["result"] = (None, f"triton {triton.__version__} is too old; "
                                          f"need >= {'.'.join(map(str, MIN_TRITON))}")
            else:
                _state["result"] = (triton, "")
        except Exception as exc:  # not installed, or broken
            _state["result"] = (None, f"Triton could not be imported ({type(exc).__name__}: {exc})")
    return _state["result"]


def interpreting():
    """Whether Triton kernels run in the interpreter in this process.

    Before triton is imported this is what TRITON_INTERPRET says now; afterwards it is what it
    said at import time (read from the type of one of triton's own jit helpers).
    """
    triton = sys.modules.get("triton")
    lang = getattr(triton, "language", None) if triton is not None else None
    if lang is None:
        return os.environ.get("TRITON_INTERPRET") == "1"
    helper = getattr(getattr(lang, "standard", None), "cdiv", None)
    return type(helper).__name__ == "InterpretedFunction"


def check_device(t):
    """Raise (before any kernel) when this process's Triton cannot run kernels on t's device."""
    if t.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                "danet_ops triton ops on CPU tensors need the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported in this process (it was "
                "imported without it), or use CUDA tensors")
    elif t.device.type != "cuda":
        raise RuntimeError(f"danet_ops triton ops run on CUDA tensors (or CPU tensors under "
                           f"TRITON_INTERPRET=1); got a tensor on {t.device}")


def check_dtypes(names_tensors):
    for name, t in names_tensors:
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"danet_ops triton ops support float32, float16 and bfloat16; "
                             f"{name} is {t.dtype} (use backend 'cpu' or 'reference' for float64)")


# ----------------------------------------------------------------------------- numerics
def dot_precision(dtype):
    """tl.dot input_precision for operands of `dtype`: fp32 uses TF32 only where PyTorch's own
    matmul would (torch.backends.cuda.matmul.allow_tf32, or a float32 matmul precision other
    than "highest"), else exact IEEE fp32. Ignored for fp16/bf16 operands."""
    if dtype != torch.float32:
        return "tf32"
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def f32_dot(dtype):
    """Upcast dot operands to fp32: the interpreter's tl.dot is wrong on bf16 (triton 3.9)."""
    return dtype == torch.bfloat16 and interpreting()


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def n_key(n):
    """Autotune bucket for a length: its next power of two (avoids re-tuning for every N)."""
    return next_pow2(max(int(n), 1))


# ----------------------------------------------------------------------------- host helpers
def strides(t):
    return tuple(t.stride())


def on_device(t):
    """Context for launches on t's CUDA device (Triton launches on the current device and
    stream); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device_of(t)


def rowdot(kernels, dy, o, round_like=None):
    """R[b, i] = sum_c dy[b, c, i] o[b, c, i] in fp32: [B, N] (round_like: a tensor whose dtype dy
    is rounded to first). kernels: the caller's kernel module (its rowdot_kernel, _common_kernels)."""
    import triton

    B, Cc, N = o.shape
    r = torch.empty((B, N), dtype=torch.float32, device=o.device)
    if B == 0 or N == 0:
        return r
    meta, warps = fixed("rowdot", o.device)
    with on_device(o):
        kernels.rowdot_kernel[(triton.cdiv(N, meta["BLOCK_M"]), B)](
            dy, o, o if round_like is None else round_like, r, N, Cc,
            *strides(dy), *strides(o), *strides(r),
            ROUND_DY=round_like is not None, num_warps=warps, **meta)
    return r


# ----------------------------------------------------------------------------- device facts
@functools.lru_cache(maxsize=None)
def _props(index):
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or 99 * 1024
    return (p.major, p.minor), p.multi_processor_count, smem


def device_props(device):
    """(capability, SM count, max shared memory per block) of a CUDA device, queried on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _props(index)


def sm_count(device):
    return device_props(device)[1]


# ----------------------------------------------------------------------------- configs
# Interpreter: one small config per kernel (autotuning in the interpreter only costs time).
INTERP = {
    "pam_fwd": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_CV=16),
    "pam_dkdv": dict(BLOCK_M=16, BLOCK_N=16),
    "pam_dq": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_CV=16),
    "rowdot": dict(BLOCK_M=16, BLOCK_C=16),
    "cam_mm": dict(BLOCK_C=16, BLOCK_K=16),
    "cam_rows": dict(BLOCK_R=16, BLOCK_J=16),
    "cam_apply": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    "cam_dx": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
}
# Fixed GPU launch parameters of the small kernels (no autotuning: cheap, row-wise).
GPU_FIXED = {
    "rowdot": (dict(BLOCK_M=128, BLOCK_C=32), 4),
    "cam_rows": (dict(BLOCK_R=16, BLOCK_J=128), 4),
}
# The backward's value-channel chunk (dK partials are per chunk, so it is chosen before launch).
PAM_BWD_BLOCK_CV = {"gpu": 128, "interp": 16}

# Autotune candidates per kernel, for sm90 (H100/H200) and sm80 (A100; also used for other GPUs,
# pruned by their shared memory), each a Tile(group, meta, num_warps, num_stages). "dims" names
# the size each meta-parameter tiles (a tile larger than that size, rounded up to a power of two,
# is pruned); "operand" is the argument whose element size the shared-memory estimate uses.
# Group IEEE: the candidates for fp32 operands with exact IEEE dots (TF32 not allowed): those
# dots run on FMA units, whose operand layouts replicate tiles per thread, and the tensor-core
# sized tiles of the arch groups spill heavily there (ptxas, offline compile); these small tiles
# do not. A kernel with an IEEE group runs exactly one of the two groups per call (the pruner
# selects by Tile.group); a kernel without one runs its arch group for every dtype.
IEEE = "ieee"


class Tile(NamedTuple):
    group: str          # "sm90", "sm80" or IEEE
    meta: tuple         # values of the table's "names", in order
    num_warps: int
    num_stages: int


def _tiles(group, rows):
    return [Tile(group, meta, warps, stages) for meta, warps, stages in rows]


_TABLE = {
    "pam_fwd": {
        "tiles": _tiles("sm90", [((128, 64, 128), 8, 3), ((128, 128, 128), 8, 2),
                                 ((128, 128, 64), 8, 3), ((64, 64, 128), 4, 3),
                                 ((64, 128, 64), 4, 4), ((128, 32, 128), 8, 4)])
        + _tiles("sm80", [((128, 64, 128), 8, 2), ((128, 32, 128), 8, 3), ((64, 64, 128), 4, 3),
                          ((64, 64, 64), 4, 4), ((128, 64, 64), 4, 3)])
        + _tiles(IEEE, [((32, 32, 64), 4, 2), ((32, 32, 64), 4, 3)]),
        "names": ("BLOCK_M", "BLOCK_N", "BLOCK_CV"), "dims": ("NQ", "NK", "CV"), "operand": "Q",
    },
    "pam_dkdv": {
        "tiles": _tiles("sm90", [((64, 128), 8, 2), ((64, 64), 8, 3), ((32, 128), 8, 3),
                                 ((32, 64), 4, 3)])
        + _tiles("sm80", [((64, 64), 4, 2), ((32, 128), 8, 2), ((32, 64), 4, 3)])
        + _tiles(IEEE, [((16, 16), 4, 2)]),
        "names": ("BLOCK_M", "BLOCK_N"), "dims": ("NQ", "NK"), "operand": "Q",
    },
    "pam_dq": {
        "tiles": _tiles("sm90", [((128, 64, 64), 8, 2), ((64, 64, 64), 4, 3),
                                 ((128, 32, 128), 8, 2), ((64, 128, 64), 8, 2)])
        + _tiles("sm80", [((64, 64, 64), 4, 2), ((128, 32, 64), 8, 2), ((64, 32, 128), 4, 3)])
        + _tiles(IEEE, [((32, 32, 32), 4, 2)]),
        "names": ("BLOCK_M", "BLOCK_N", "BLOCK_CV"), "dims": ("NQ", "NK", "CV"), "operand": "Q",
    },
    "cam_mm": {
        "tiles": _tiles("sm90", [((64, 128), 4, 4), ((128, 64), 8, 3), ((64, 64), 4, 4),
                                 ((128, 128), 8, 3)])
        + _tiles("sm80", [((64, 64), 4, 4), ((128, 32), 4, 4), ((128, 64), 8, 3)])
        + _tiles(IEEE, [((64, 32), 4, 2), ((32, 64), 4, 3), ((128, 32), 8, 2)]),
        "names": ("BLOCK_C", "BLOCK_K"), "dims": ("C", "N"), "operand": "Y",
    },
    "cam_apply": {
        "tiles": _tiles("sm90", [((64, 128, 64), 4, 3), ((128, 128, 64), 8, 3),
                                 ((128, 64, 64), 4, 4), ((64, 256, 32), 8, 3)])
        + _tiles("sm80", [((64, 128, 32), 4, 3), ((128, 128, 32), 8, 3), ((64, 64, 64), 4, 4)]),
        "names": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "dims": ("C", "N", "C"), "operand": "X",
    },
    "cam_dx": {  # three fp32 [M, K] tiles (A^T, G, G^T) per step: smaller K than cam_apply
        "tiles": _tiles("sm90", [((64, 128, 32), 4, 3), ((128, 128, 32), 8, 3),
                                 ((64, 64, 32), 4, 4), ((128, 64, 32), 4, 3)])
        + _tiles("sm80", [((64, 128, 32), 8, 2), ((128, 64, 32), 8, 2), ((64, 64, 32), 4, 3)]),
        "names": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "dims": ("C", "N", "C"), "operand": "X",
    },
}


def _arch_name(capability):
    return "sm90" if capability[0] >= 9 else "sm80"


def _smem_estimate(name, meta, stages, args):
    """Rough shared-memory bytes of a config (pipelined operand tiles), to prune the impossible."""
    es = args["elt"]
    if name == "pam_fwd":
        cq = args["CQ_P"]
        return es * (meta["BLOCK_M"] * cq + stages * meta["BLOCK_N"] * (cq + meta["BLOCK_CV"]))
    if name == "pam_dkdv":  # + an fp32 [BLOCK_M, BLOCK_N] layout-conversion buffer
        cq, cv = args["CQ_P"], args["BLOCK_CV"]
        return (es * (meta["BLOCK_N"] * (cq + cv) + stages * meta["BLOCK_M"] * (cq + cv))
                + 4 * meta["BLOCK_M"] * meta["BLOCK_N"])
    if name == "pam_dq":
        cq = args["CQ_P"]
        return es * (meta["BLOCK_M"] * cq + stages * (meta["BLOCK_N"] * cq
                     + meta["BLOCK_CV"] * (meta["BLOCK_M"] + meta["BLOCK_N"])))
    if name == "cam_mm":
        return es * stages * 2 * meta["BLOCK_C"] * meta["BLOCK_K"]
    k = meta["BLOCK_K"]
    if name == "cam_apply":  # fp32 A tile + a tile
        return stages * k * (4 * meta["BLOCK_M"] + es * meta["BLOCK_N"])
    # cam_dx: fp32 A^T, G, G^T tiles + a and dy tiles
    return stages * k * (3 * 4 * meta["BLOCK_M"] + 2 * es * meta["BLOCK_N"])


def _launch_key(meta, num_warps, num_stages):
    return tuple(sorted(meta.items())), num_warps, num_stages


def candidates(name, capability):
    """triton.Config candidates for a kernel on a device: its arch group plus, when it has one,
    its IEEE group (the pruner keeps exactly one of the two groups per call)."""
    import triton

    table = _TABLE[name]
    groups = (_arch_name(capability), IEEE)
    return [triton.Config(dict(zip(table["names"], t.meta)), num_warps=t.num_warps,
                          num_stages=t.num_stages)
            for t in table["tiles"] if t.group in groups]


def _prune(name, smem_limit):
    table = _TABLE[name]
    tiled = dict(zip(table["names"], table["dims"]))
    # The groups each launch configuration is listed in (a config is matched to its Tile by its
    # launch parameters: triton passes the pruner the Config objects, which carry no group).
    groups_of = {}
    for t in table["tiles"]:
        key = _launch_key(dict(zip(table["names"], t.meta)), t.num_warps, t.num_stages)
        groups_of.setdefault(key, set()).add(t.group)
    has_ieee = any(t.group == IEEE for t in table["tiles"])

    def _in_group(cfg, ieee):
        groups = groups_of.get(_launch_key(cfg.kwargs, cfg.num_warps, cfg.num_stages), set())
        return IEEE in groups if ieee else bool(groups - {IEEE})

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        operand = named_args[table["operand"]]
        args["elt"] = operand.element_size()
        if has_ieee:  # the IEEE group for exact fp32 dots, the arch group otherwise
            ieee = operand.dtype == torch.float32 and args.get("PREC") == "ieee"
            configs = [c for c in configs if _in_group(c, ieee)]

        def fits(cfg):
            for meta_name, size in cfg.kwargs.items():
                dim = args.get(tiled.get(meta_name))
                if dim is not None and size > max(16, next_pow2(dim)):
                    return False
            return _smem_estimate(name, cfg.kwargs, cfg.num_stages, args) <= smem_limit

        kept = [cfg for cfg in configs if fits(cfg)]
        if not kept:  # keep the candidate with the least shared memory
            kept = [min(configs, key=lambda c: _smem_estimate(name, c.kwargs, c.num_stages, args))]
        return kept
    return prune


_tuned = {}


def launcher(kernels_module, name, kernel_name, key, device):
    """The kernel to launch as kernel[grid](..., **meta): under the interpreter the raw kernel
    (the caller passes INTERP[name]); on a GPU an autotuned wrapper over the sm90/sm80 table,
    built on first use for that device's capability."""
    kernel = getattr(kernels_module, kernel_name)
    if device.type == "cpu":
        return kernel
    capability, _, smem = device_props(device)
    cache_key = (kernel_name, capability, smem)
    if cache_key not in _tuned:
        import triton

        _tuned[cache_key] = triton.autotune(
            configs=candidates(name, capability), key=key + ["PREC"],
            prune_configs_by={"early_config_prune": _prune(name, smem)})(kernel)
    return _tuned[cache_key]


def meta_for(name, device):
    """Explicit meta-parameters for a launch: the interpreter's config, or {} (autotuned)."""
    return dict(INTERP[name]) if device.type == "cpu" else {}


def fixed(name, device):
    """(meta, num_warps) of a kernel launched without autotuning."""
    if device.type == "cpu":
        return dict(INTERP[name]), 4
    meta, warps = GPU_FIXED[name]
    return dict(meta), warps
