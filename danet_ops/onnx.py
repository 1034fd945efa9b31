"""ONNX lowering of the danet_ops ops, chosen per export.

While ``torch.onnx.export`` traces a model (the dynamo exporter, the default, or the legacy
TorchScript one), ``position_attention`` and ``channel_attention`` (and so ``PositionAttention``,
``ChannelAttention`` and the blocks ``convert_attention`` makes) write ONNX ops instead of calling
a fused kernel, whatever their ``backend``. Nothing is registered globally: a plain
``torch.onnx.export(model, args)`` works, and ``torch.export``, AOTInductor, ``torch.compile`` and
``torch.jit.trace`` keep the fused ops.

PAM (``E = scale * q^T k``, ``A = softmax(E)`` over the Nk keys, ``O = v A^T``) has two lowerings:

* ``"ort"`` (default): ONNX Runtime's contrib operator ``com.microsoft.MultiHeadAttention``
  (``num_heads=1``, the ``scale`` attribute, a value head size Cv other than Cq), between
  Transposes from the ops' channel-major ``[B, C, N]`` to its ``[B, N, C]``. ORT's CPU kernel
  runs it as flash attention in fp32: O(N) memory. A runtime without this contrib operator
  refuses the model when loading it, naming the operator (onnx's reference evaluator does).
* ``"standard"``: ``MatMul`` / ``Softmax`` / ``MatMul``, standard ONNX that every runtime runs,
  with the N x N matrix in memory.

``gamma * O + x`` is a ``Mul`` and an ``Add`` around either. CAM is always standard ops
(``MatMul`` / ``Neg`` / ``Softmax`` / ``MatMul``): its matrix is C x C. fp16 / bf16 models compute
the attention in fp32 (``Cast`` nodes), as the fused kernels do, except that "ort" gives fp16
q, k, v to MultiHeadAttention as they are (ORT's CPU kernel computes in fp32 and rounds O to fp16;
it has no bf16 kernel, so bf16 goes in as fp32). float64 has no "ort" lowering (TypeError).

Choose the lowering for one export with the context manager::

    with danet_ops.onnx.attention_lowering("standard"):
        torch.onnx.export(model, (x,), "model.onnx")

A graph that already holds the raw ops (``torch.ops.danet_ops.pam_forward`` called directly, or a
program made by ``torch.export.export`` before the ONNX export) is lowered with
``program.run_decompositions(danet_ops.onnx.decompositions("ort"))`` before ``torch.onnx.export``.
"""
import contextlib
import contextvars

import torch

from . import backends
from ._contract import output_dtype, stats_dtype

try:  # the dynamo exporter's "torch.onnx.export is running" flag, which is_in_onnx_export reads
    from torch.onnx._internal.exporter import _flags as _dynamo_exporter
except ImportError:  # another layout of torch.onnx: is_in_onnx_export alone
    _dynamo_exporter = None

LOWERINGS = ("ort", "standard")
# "ort" by default: the ops' point is O(N) memory, ONNX Runtime is the runtime the export extra
# installs and tests, and a runtime without the contrib op refuses the model at load time,
# naming it, whereas "standard" would silently need N x N memory (4 GiB per image at 128 x 256).
DEFAULT_LOWERING = "ort"
MHA = "com.microsoft::MultiHeadAttention"

_lowering = contextvars.ContextVar("danet_ops_onnx_attention_lowering", default=DEFAULT_LOWERING)


def _check(lowering):
    if lowering not in LOWERINGS:
        raise ValueError(f"ONNX attention lowering must be one of {LOWERINGS}; got {lowering!r}")
    return lowering


@contextlib.contextmanager
def attention_lowering(lowering):
    """Lower PAM as ``lowering`` ("ort" | "standard") in the ONNX exports run inside the block."""
    token = _lowering.set(_check(lowering))
    try:
        yield lowering
    finally:
        _lowering.reset(token)


def current_lowering():
    """The PAM lowering an ONNX export started now would use."""
    return _lowering.get()


# torch.compiler.assume_constant_result(current_lowering): a constant of the trace, since Dynamo
# cannot read a ContextVar; set by hand, as danet_ops.backends does for resolve, because the
# decorator imports torch._dynamo.
current_lowering._dynamo_marked_constant = True


# ----------------------------------------------------------------------------- the math
def pam_math(q, k, v, x=None, gamma=None, scale=1.0, lowering="standard", lse=True):
    """(o, lse, y) of ``pam_forward``: q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk] -> o [B, Cv, Nq].

    o is in the compute dtype (fp32 for fp16/bf16 v), as the fused kernels return it; y is
    ``gamma * o + x`` in the promoted dtype, or empty without x. lse [B, Nq] (None when not
    asked for) needs E, N x N: the exporters prune it unless the graph uses it.
    """
    ct = stats_dtype(v.dtype)
    qc, kc, vc = (t if t.dtype == ct else t.to(ct) for t in (q, k, v))
    e = None
    if lowering == "ort":
        # fp16 q, k, v go in as they are: ORT's kernel computes in fp32 and rounds O once
        # (measured, docs/deploy.md); anything else in the compute dtype.
        half = q.dtype == k.dtype == v.dtype == torch.float16
        o = _multi_head_attention(*((q, k, v) if half else (qc, kc, vc)), scale).to(ct)
    else:
        e = _logits(qc, kc, scale)
        o = torch.bmm(vc, torch.softmax(e, dim=-1).transpose(1, 2))
    lse_out = None
    if lse:
        lse_out = torch.logsumexp(_logits(qc, kc, scale) if e is None else e, dim=-1)
    if x is None:
        y = v.new_empty((0,))
    else:
        y = (gamma * o + x).to(output_dtype(v.dtype, x.dtype, gamma.dtype))
    return o, lse_out, y


def _logits(q, k, scale):
    e = torch.bmm(q.transpose(1, 2), k)                           # [B, Nq, Nk]
    return e if scale == 1.0 else e * scale


def cam_math(x, gamma=None, mode="original"):
    """(o, attn, y) of ``cam_forward``: x [B, C, N]; E = x x^T accumulated in fp32."""
    ct = stats_dtype(x.dtype)
    a = x if x.dtype == ct else x.to(ct)
    e = torch.bmm(a, a.transpose(1, 2))                           # [B, C, C]
    # "original": softmax(rowmax(E) - E) == softmax(-E) (softmax is shift-invariant per row)
    attn = torch.softmax(-e if mode == "original" else e, dim=-1)
    o = torch.bmm(attn, a)
    if o.dtype != x.dtype:
        o = o.to(x.dtype)
    y = x.new_empty((0,)) if gamma is None else gamma * o + x
    return o, attn, y


# ----------------------------------------------------------------------------- the contrib node
def _multi_head_attention(q, k, v, scale):
    """com.microsoft.MultiHeadAttention on [B, C, N] tensors; returns O [B, Cv, Nq].

    The operator takes q [B, Nq, Cq], k [B, Nk, Cq], v [B, Nk, Cv] and returns [B, Nq, Cv]
    (num_heads=1: one head of size Cq for q/k and Cv for v). Its ``scale`` attribute 0 means
    1/sqrt(Cq), so a scale of 0 is applied to q instead.
    """
    if q.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"ONNX attention lowering 'ort': ONNX Runtime's MultiHeadAttention takes "
                        f"float32 or float16, and this PAM computes in {q.dtype}; export inside "
                        f"danet_ops.onnx.attention_lowering('standard') instead")
    scale = float(scale)
    if scale == 0.0:
        q, scale = q * 0.0, 1.0
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if torch.jit.is_tracing():      # the legacy exporter traces with TorchScript
        o = _LegacyMultiHeadAttention.apply(qt, kt, vt, scale)
    else:
        if torch.compiler.is_dynamo_compiling():
            raise RuntimeError("ONNX attention lowering 'ort' is written with torch.onnx.ops.symbolic, "
                               "which torch.export(strict=True) cannot trace; the dynamo exporter's "
                               "default capture (strict=False) can, or export inside "
                               "danet_ops.onnx.attention_lowering('standard')")
        ops = getattr(torch.onnx, "ops", None)
        if ops is None or not hasattr(ops, "symbolic"):
            raise RuntimeError(f"ONNX attention lowering 'ort' needs torch.onnx.ops.symbolic "
                               f"(torch >= 2.8; this is {torch.__version__}); export inside "
                               f"danet_ops.onnx.attention_lowering('standard') instead")
        o = ops.symbolic(MHA, (qt, kt, vt), {"num_heads": 1, "scale": scale}, dtype=q.dtype,
                         shape=(q.shape[0], q.shape[2], v.shape[1]), version=1)
    return o.transpose(1, 2)


class _LegacyMultiHeadAttention(torch.autograd.Function):
    """The contrib node for the legacy exporter (its ``symbolic``); forward: the same math."""

    @staticmethod
    def forward(ctx, q, k, v, scale):                 # [B, Nq, Cq], [B, Nk, Cq], [B, Nk, Cv]
        return torch.softmax(scale * torch.bmm(q, k.transpose(1, 2)), dim=-1).bmm(v)

    @staticmethod
    def symbolic(g, q, k, v, scale):
        from torch.onnx import symbolic_helper as sh

        o = g.op(MHA, q, k, v, num_heads_i=1, scale_f=scale)
        qs, vs = sh._get_tensor_sizes(q), sh._get_tensor_sizes(v)
        if qs is not None and vs is not None:    # the output's type, for ONNX shape inference
            o.setType(q.type().with_sizes([qs[0], qs[1], vs[2]]))
        return o


# ----------------------------------------------------------------------------- what functional calls
def position_attention(q, k, v, x=None, gamma=None, scale=1.0, lowering=None):
    """``danet_ops.position_attention`` written as ONNX-exportable ops (shapes as there).

    ``lowering`` None: the one of the enclosing ``attention_lowering`` block, else "ort".
    """
    lowering = _check(lowering or current_lowering())
    B, Cv = q.shape[0], v.shape[1]
    o, _, y = pam_math(q.flatten(2), k.flatten(2), v.flatten(2),
                       None if x is None else x.flatten(2), gamma, scale, lowering, lse=False)
    return (o.to(v.dtype) if x is None else y).view(B, Cv, *q.shape[2:])


def channel_attention(x, gamma=None, mode="original"):
    """``danet_ops.channel_attention`` written as standard ONNX-exportable ops."""
    o, _, y = cam_math(x.flatten(2), gamma, mode)
    return (o if gamma is None else y).view(x.shape)


def exporting():
    """Whether ``torch.onnx.export`` is tracing now (then functional calls the lowering above)."""
    if torch.compiler.is_dynamo_compiling():
        # Dynamo folds torch.onnx.is_in_onnx_export() to False, also when the dynamo exporter
        # captures with torch.export(strict=True) (its second strategy): read its flag instead.
        # torch.compile (not exporting) never is an ONNX export.
        return torch.compiler.is_exporting() and bool(getattr(_dynamo_exporter, "_is_onnx_exporting", False))
    return torch.onnx.is_in_onnx_export()


# ----------------------------------------------------------------------------- raw ops in a graph
def decompositions(lowering=None):
    """{op: lowering} for ``ExportedProgram.run_decompositions``, for graphs holding the raw ops.

    ``torch.onnx.export(program.run_decompositions(danet_ops.onnx.decompositions("ort")))``
    writes the same ONNX as exporting the model directly. The forward ops of every backend in
    danet_ops.backends that are registered in this process.
    """
    lowering = _check(lowering or current_lowering())

    def pam(q, k, v, x=None, gamma=None, scale=1.0):
        return pam_math(q, k, v, x, gamma, scale, lowering)

    table = {}
    for backend in backends.REGISTRY.values():
        for entry, fn in (("pam_forward", pam), ("cam_forward", cam_math)):
            op = backend.op(entry)
            if op is not None:
                table[op] = fn
    return table
