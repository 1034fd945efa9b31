// The op schemas of danet_ops. One TORCH_LIBRARY block for the whole library; each backend adds
// its kernels with TORCH_LIBRARY_IMPL(danet_ops, <DispatchKey>, m) in its own folder
// (csrc/cpu, csrc/cuda). Fake (meta) kernels and autograd are registered from Python
// (danet_ops/_meta.py). Shapes and semantics: docs/ARCHITECTURE.md and SPEC §1-§2.
#include <torch/library.h>

TORCH_LIBRARY(danet_ops, m) {
  // q: [B, Cq, Nq]; k: [B, Cq, Nk]; v: [B, Cv, Nk]; x: [B, Cv, Nq] or None; gamma: [1] or None.
  // E = scale * q^T k. -> o [B, Cv, Nq] (dtype of v), lse [B, Nq] fp32, y = gamma*o + x (or [0]).
  m.def("pam_forward(Tensor q, Tensor k, Tensor v, Tensor? x, Tensor? gamma, float scale=1.0)"
        " -> (Tensor, Tensor, Tensor)");
  // dy: gradient of y (gamma given) or of o; scale: the forward's.
  // -> dq [B, Cq, Nq], dk [B, Cq, Nk], dv [B, Cv, Nk], dgamma ([1] fp32, or [0]).
  m.def("pam_backward(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse,"
        " Tensor? gamma, float scale=1.0) -> (Tensor, Tensor, Tensor, Tensor)");
  // x: [B, C, N]; mode "original" (softmax(-E)) or "paper" (softmax(E)), E = x x^T.
  // -> o [B, C, N], attn [B, C, C] fp32, y = gamma*o + x (or shape [0]).
  m.def("cam_forward(Tensor x, Tensor? gamma, str mode) -> (Tensor, Tensor, Tensor)");
  // -> dx (full gradient of x, residual included when gamma is given), dgamma.
  m.def("cam_backward(Tensor dy, Tensor x, Tensor attn, Tensor o, Tensor? gamma, str mode)"
        " -> (Tensor, Tensor)");
}
