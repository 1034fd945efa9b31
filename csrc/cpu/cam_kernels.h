// The CPU kernels of CAM (cam_tiles.cpp), called by the op file cam.cpp with the engine of the
// path select_path chose (lowp_gemm.h):
//
//   a = x as [C, N];  E = a a^T  [C, C] (summed over N, accumulated in fp32 or fp64)
//   mode "original": A = softmax(rowmax(E) - E) = softmax(-E);  mode "paper": A = softmax(E)
//   O = A a;  y = gamma * O + a
// Backward (dO = g*dy, g = gamma or 1; s = -1 for "original", +1 for "paper"):
//   dA = dO a^T;  dS = A o (dA - rowsum(dA o A));  dE = s dS
//   da = A^T dO + (dE + dE^T) a (+ dy, the residual)
// On a low-precision path the products read bf16/fp16 operands (a, and A / dE rounded to it)
// with fp32 accumulation: the Gram sums in fp32 always, so fp16 inputs whose E exceeds 65504
// stay finite. Every task runs with FTZ/DAZ (no denormal slow path), the softmax included.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "lowp_gemm.h"

namespace danet_ops {
namespace cpu {

// x [B, C, N] (any strides) as given, a = x in the operand dtype; s the mode's sign; BC, BN the
// channel and N blocks. Outputs allocated by the caller: attn [B, C, C] in the compute dtype
// (written here), o [B, C, N] (compute dtype) when defined, else O lives per block; y (the
// contract's output dtype) when residual.
struct CamForward {
  at::Tensor x, a;
  double gamma = 0.0, s = -1.0;
  bool residual = false;
  int64_t BC = 128, BN = 512;
  at::Tensor attn, o, y;
};
void cam_forward_tiles(CamForward& f, Engine engine);

// o, dy as given (dgamma and the residual read them exactly); a, dy_op in the operand dtype;
// attn [B, C, C] in the compute dtype. -> dx [B, C, N] (compute dtype), dgamma [1] or [0].
struct CamBackward {
  at::Tensor o, dy, a, dy_op, attn;
  double g = 1.0, s = -1.0;
  bool residual = false;
  int64_t BC = 128, BN = 512;
};
std::tuple<at::Tensor, at::Tensor> cam_backward_tiles(const CamBackward& b, Engine engine);

}  // namespace cpu
}  // namespace danet_ops
