// The op schemas of danet_ops: one TORCH_LIBRARY block for the whole library. Each backend adds
// its kernels with TORCH_LIBRARY_IMPL(danet_ops, <DispatchKey>, m) in its own folder (csrc/cpu,
// csrc/cuda); the Triton backend registers its own *_triton ops from Python. Fake kernels and
// autograd are registered from Python (danet_ops/_fake_and_autograd.py). Dtypes follow
// danet_ops/_contract.py: "stats dtype" is stats_dtype(v) (fp64 for fp64 inputs, else fp32),
// "output dtype" is output_dtype(v, x, gamma) (the reference's gamma * O + x).
#include <torch/library.h>

TORCH_LIBRARY(danet_ops, m) {
  // PAM, E = scale * q^T k, P = softmax over keys, O = v P^T, y = gamma * O + x.
  // q: [B, Cq, Nq]; k: [B, Cq, Nk]; v: [B, Cv, Nk]; x: [B, Cv, Nq] or None; gamma: [1] or None
  // (both or neither). -> o [B, Cv, Nq] and lse [B, Nq] in the stats dtype (the backward reads
  // both), y [B, Cv, Nq] in the output dtype (or shape [0] without x).
  m.def("pam_forward(Tensor q, Tensor k, Tensor v, Tensor? x, Tensor? gamma, float scale=1.0)"
        " -> (Tensor, Tensor, Tensor)");
  // dy: gradient of y (gamma given) or of o; o, lse: pam_forward's; scale: the forward's.
  // -> dq [B, Cq, Nq], dk [B, Cq, Nk], dv [B, Cv, Nk] in q's, k's, v's dtypes; dgamma [1] in
  // the stats dtype (or [0] without gamma).
  m.def("pam_backward(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse,"
        " Tensor? gamma, float scale=1.0) -> (Tensor, Tensor, Tensor, Tensor)");
  // Inference form of pam_forward (no gradient will be taken; CPU kernels only): the result
  // alone, y with x and gamma, else O in v's dtype. Nothing saved, no log-sum-exp.
  m.def("pam_forward_inference(Tensor q, Tensor k, Tensor v, Tensor? x, Tensor? gamma,"
        " float scale=1.0) -> Tensor");

  // CAM, E = a a^T over positions (a = x as [B, C, N]); mode "original": A = softmax(-E) (the
  // released code's softmax(rowmax(E) - E)), "paper": A = softmax(E); O = A a; y = gamma*O + x.
  // x: [B, C, N]; gamma: [1] or None. -> o [B, C, N] in x's dtype, attn [B, C, C] in the stats
  // dtype, y in the output dtype (or shape [0] without gamma).
  m.def("cam_forward(Tensor x, Tensor? gamma, str mode) -> (Tensor, Tensor, Tensor)");
  // dy: gradient of y (gamma given) or of o; attn, o: cam_forward's.
  // -> dx [B, C, N] in x's dtype (the full gradient of x, the residual's dy included when gamma
  // is given), dgamma [1] in the stats dtype (or [0] without gamma).
  m.def("cam_backward(Tensor dy, Tensor x, Tensor attn, Tensor o, Tensor? gamma, str mode)"
        " -> (Tensor, Tensor)");
  // Inference form of cam_forward (no gradient will be taken; CPU kernels only): y with gamma,
  // else O, in their forward dtypes. Nothing saved.
  m.def("cam_forward_inference(Tensor x, Tensor? gamma, str mode) -> Tensor");

  // Introspection of the CPU kernels (csrc/cpu/lowp_gemm.h), as of the moment of the call
  // (DANET_OPS_CPU_LOWP and DANET_OPS_CPU_ISA are read per call):
  // the path a CPU call of op "pam" | "cam" with inputs of that dtype would take:
  // "fp64-tiles", "fp32-tiles", "bf16-brgemm", "fp16-brgemm", "bf16-cblas" or "fp16-cblas".
  m.def("cpu_path(str op, ScalarType dtype) -> str");
  // the ISA level the CPU kernels dispatch to (the CPU's best, capped by DANET_OPS_CPU_ISA):
  // "avx512", "avx2" or "default" (csrc/cpu/isa.h).
  m.def("cpu_isa() -> str");
}
