"""ONNX lowering of the danet_ops ops: standard ONNX ops (MatMul / Softmax / MatMul), no custom domain.

Two registrations, both made at `import danet_ops` (and again when the compiled ops are loaded
late), so that a plain `torch.onnx.export(model, args)` works with no extra arguments:

* dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the default): a decomposition of each
  forward op into ATen ops, put in `torch._decomp.decomposition_table`. The exporter decomposes every
  op that has no ONNX translation with that table (torch.onnx's `create_onnx_friendly_decomposition_table`),
  so `danet_ops::pam_forward` becomes bmm / softmax / bmm and then MatMul / Softmax / MatMul. Nothing
  else uses that table wholesale: `torch.export`'s default decompositions, Inductor and
  AOTInductor have their own explicit lists, so there the op stays fused (checked in
  tests/test_export.py).
* legacy TorchScript exporter (`dynamo=False`): `torch.onnx.register_custom_op_symbolic`.

Why MatMul/Softmax/MatMul and not ONNX's `Attention` (opset 23): measured with onnxruntime 1.32 on
CPU (docs/deploy.md), its CPU `Attention` kernel accepts Dv != Dqk and scale=1 and gives the same
result, but it also materialises the N x N matrix (same peak memory, no faster), while needing
opset 23, which is not the exporter's default (18) and which TensorRT / OpenVINO / older runtimes
lack. MatMul/Softmax/MatMul runs everywhere.

The math is the general one of SPEC §1: E = scale * q^T k with k/v having their own number of
positions Nk (taken from k and v, never from q), O = v softmax(E)^T: [B, Cv, Nq]. The `scale`
argument is optional, so the same functions serve op schemas with and without it.
"""
import os
import sys

import torch

from ._contract import output_dtype, stats_dtype  # fp16/bf16 models: the attention math in fp32 (SPEC §4)

# Names of the forward ops per family, compiled and Triton (schemas: docs/ARCHITECTURE.md).
PAM_OPS = ("danet_ops::pam_forward", "danet_ops::pam_forward_triton")
CAM_OPS = ("danet_ops::cam_forward", "danet_ops::cam_forward_triton")
LEGACY_OPSET = 13  # Softmax(axis=-1) with per-axis semantics; the symbolics cover opsets 13..23

_registered = set()


# ----------------------------------------------------------------------------- ATen math (dynamo path)
def pam_math(q, k, v, x=None, gamma=None, scale=1.0):
    """(o, lse, y) of `pam_forward` in plain ATen ops; q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk]."""
    ct = stats_dtype(v.dtype)
    qc, kc, vc = (t if t.dtype == ct else t.to(ct) for t in (q, k, v))
    e = torch.bmm(qc.transpose(1, 2), kc)                      # [B, Nq, Nk]
    if scale is not None and float(scale) != 1.0:
        e = e * float(scale)
    a = torch.softmax(e, dim=-1)
    o = torch.bmm(vc, a.transpose(1, 2))                        # [B, Cv, Nq]
    lse = torch.logsumexp(e, dim=-1)                            # dead code unless used; pruned by the exporter
    # o stays in the compute dtype, as the fused kernels return it (fp32 for fp16/bf16 v: the
    # fakes say so, and torch.export asserts it); the caller casts it to v's dtype.
    if x is None:
        y = v.new_empty((0,))
    else:
        y = (gamma * o + x).to(output_dtype(v.dtype, x.dtype, gamma.dtype))
    return o, lse, y


def cam_math(x, gamma=None, mode="original"):
    """(o, attn, y) of `cam_forward` in plain ATen ops; x [B, C, N]."""
    ct = stats_dtype(x.dtype)
    a = x if x.dtype == ct else x.to(ct)
    e = torch.bmm(a, a.transpose(1, 2))                         # [B, C, C]
    # "original": softmax(rowmax(E) - E) == softmax(-E) (softmax is shift-invariant per row)
    attn = torch.softmax(-e if mode == "original" else e, dim=-1)
    o = torch.bmm(attn, a)
    if o.dtype != x.dtype:
        o = o.to(x.dtype)
    y = x.new_empty((0,)) if gamma is None else gamma * o + x
    return o, attn, y


# ----------------------------------------------------------------------------- legacy symbolics
def _legacy_pam(g, q, k, v, x, gamma, scale=None):
    from torch.onnx import symbolic_helper as sh

    qt = g.op("Transpose", q, perm_i=[0, 2, 1])
    e = g.op("MatMul", qt, k)                                    # [B, Nq, Nk]
    s = 1.0 if scale is None or sh._is_none(scale) else float(sh._maybe_get_const(scale, "f"))
    if s != 1.0:
        e = g.op("Mul", e, g.op("Constant", value_t=torch.tensor(s, dtype=torch.float32)))
    a = g.op("Softmax", e, axis_i=-1)
    o = g.op("MatMul", v, g.op("Transpose", a, perm_i=[0, 2, 1]))   # [B, Cv, Nq]
    lse = _legacy_logsumexp(g, e)
    if sh._is_none(x):
        y = g.op("Constant", value_t=torch.zeros(0))
    else:
        y = g.op("Add", g.op("Mul", gamma, o), x)
    return o, lse, y


def _legacy_logsumexp(g, e):
    from torch.onnx import symbolic_helper as sh

    if sh.GLOBALS.export_onnx_opset_version >= 18:
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        return g.op("ReduceLogSumExp", e, axes, keepdims_i=0)
    return g.op("ReduceLogSumExp", e, axes_i=[-1], keepdims_i=0)


def _legacy_cam(g, x, gamma, mode):
    from torch.onnx import symbolic_helper as sh

    mode = sh._maybe_get_const(mode, "s")
    e = g.op("MatMul", x, g.op("Transpose", x, perm_i=[0, 2, 1]))  # [B, C, C]
    if mode == "original":
        e = g.op("Neg", e)
    attn = g.op("Softmax", e, axis_i=-1)
    o = g.op("MatMul", attn, x)
    if sh._is_none(gamma):
        y = g.op("Constant", value_t=torch.zeros(0))
    else:
        y = g.op("Add", g.op("Mul", gamma, o), x)
    return o, attn, y


# ----------------------------------------------------------------------------- registration
def _op(qualname):
    ns, name = qualname.split("::")
    packet = getattr(getattr(torch.ops, ns), name, None)  # None: op not (yet) registered
    return None if packet is None else packet.default


def _inductor_fallback(op):
    """Keep the op fused under Inductor (torch.compile, AOTInductor) when CI is set.

    Inductor runs an op it has no lowering for as an extern kernel (a "fallback"), creating the
    fallback on first use. With the environment variable CI set, its make_fallback refuses an op
    that has an entry in torch._decomp.decomposition_table (ours have one, for the ONNX exporter
    above): "a decomposition exists, we should switch to it". Declaring the fallback ourselves
    with warn=False keeps the fused op. Only done when CI is set or Inductor is already imported,
    so a plain `import danet_ops` does not pay Inductor's import time (about a second).
    """
    if not (os.environ.get("CI") or "torch._inductor.lowering" in sys.modules):
        return
    from torch._inductor import lowering

    if op not in lowering.lowerings:
        lowering.make_fallback(op, warn=False)


def register():
    """Register the ONNX lowerings for every danet_ops forward op that exists now (idempotent)."""
    from torch._decomp import register_decomposition

    from ._triton import ops as _triton_ops  # noqa: F401  (defines the *_triton ops; no triton import)

    for names, math, legacy in ((PAM_OPS, pam_math, _legacy_pam), (CAM_OPS, cam_math, _legacy_cam)):
        for name in names:
            if name in _registered:
                continue
            try:
                op = _op(name)
            except (AttributeError, RuntimeError):
                op = None
            if op is None:
                continue
            register_decomposition(op)(math)
            _inductor_fallback(op)
            try:
                torch.onnx.register_custom_op_symbolic(name, legacy, LEGACY_OPSET)
            except Exception:  # torch without the TorchScript exporter: the dynamo path still works
                pass
            _registered.add(name)
    return sorted(_registered)
