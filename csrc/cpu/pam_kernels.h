// The CPU kernels of PAM, called by the op file pam.cpp on the path select_path chose:
//   pam_tiles.cpp     the tile loops on ATen's BLAS (fp32 / fp64) or on a low-precision engine
//   pam_keymajor.cpp  the key-major brgemm kernels (bf16 / fp16 forward, bf16 backward)
//
//   E[i,j] = scale * sum_c q[c,i] k[c,j]   P = softmax_j(E)   O[c,i] = sum_j v[c,j] P[i,j]
//   y = gamma * O + x
// q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk], x [B, Cv, Nq]; any strides. Nothing N x N is ever
// allocated: a task holds one [BM, BN] tile of E (or [BN, BM] of E^T) at a time.
#pragma once

#include <ATen/ATen.h>

#include "lowp_gemm.h"

namespace danet_ops {
namespace cpu {

// q, k, v in the path's operand dtype (bf16 / fp16 / fp32 / fp64). o, lse, y allocated by the
// caller in the compute dtype (y: the contract's output dtype); o and lse may be undefined: then
// they are not written (O lives per task); y when residual (y = gamma*O + x, x undefined without).
struct PamForward {
  at::Tensor q, k, v, x;
  double gamma = 0.0, scale = 1.0;
  bool residual = false;
  int64_t BM = 256, BN = 256;
  at::Tensor o, lse, y;
};

void pam_forward_tiles(PamForward& a, Engine engine);
template <class T>  // at::BFloat16 or at::Half
void pam_forward_keymajor(PamForward& a);

// The backward, one convention on every path (dO = g*dy, g = gamma or 1):
//   P = exp(scale * q^T k - lse), dA = dy^T v, dS = P o (g dA - Delta),
//   dv' = dy P,  dk' = q dS,  dq' = k dS^T
// the kernels return the sums dv', dk', dq' (compute dtype, fp32 for bf16/fp16); the op applies
// dv = g dv', dk = scale dk', dq = scale dq' once to them.
// q, k, v, dy in the operand dtype; lse, delta [B, Nq] in the compute dtype, delta = g * sum_c
// dy[c,i] O[c,i] with the dy the products read.
struct PamBackward {
  at::Tensor q, k, v, dy, lse, delta;
  double g = 1.0, scale = 1.0;
  int64_t BM = 256, BN = 256;
};
struct PamGrads {
  at::Tensor dq, dk, dv;  // [B, Cq, Nq], [B, Cq, Nk], [B, Cv, Nk]; any strides
};

PamGrads pam_backward_tiles(const PamBackward& a, Engine engine);
PamGrads pam_backward_keymajor_bf16(const PamBackward& a);

// rowdot[b, i] = sum_c dy[c,i] O[c,i] in the compute dtype ct (dgamma = sum rowdot), by query
// blocks of BM; and, when dy_op is defined (dy rounded to a narrower operand dtype, e.g. fp32 dy
// under autocast), the same with dy_op into rowdot_op (else rowdot_op is rowdot).
void pam_rowdots(const at::Tensor& dy, const at::Tensor& dy_op, const at::Tensor& o,
                 at::ScalarType ct, int64_t BM, at::Tensor& rowdot, at::Tensor& rowdot_op);

}  // namespace cpu
}  // namespace danet_ops
