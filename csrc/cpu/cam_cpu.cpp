// Fused channel attention (CAM) on CPU.
//
//   a = x as [C, N];  E = a a^T  [C, C] (summed over N, accumulated in fp32 or fp64)
//   mode "original": A = softmax(rowmax(E) - E) = softmax(-E);  mode "paper": A = softmax(E)
//   O = A a;  y = gamma * O + a
//
// Forward: the Gram matrix is symmetric, so only its upper-triangle channel blocks are
// multiplied (about half the products) and mirrored. O = A a is computed per N-block with the
// epilogue y = gamma*O + a applied while the block is in cache.
// Backward (dO = gamma*dy, s = -1 for "original", +1 for "paper"):
//   dA = dO a^T;  dS = A o (dA - rowsum(dA o A));  dE = s dS
//   da = A^T dO + (dE + dE^T) a (+ dy, the residual)
// The two Gram-side products become one product with dE + dE^T, and it is accumulated into the
// same N-block of da as the value-side product A^T dO (one pass over a and dO).
//
// Precision (cpu_common.h): fp32/fp64 in their own dtype. bf16/fp16 on a CPU with matrix units
// for them (or DANET_OPS_CPU_LOWP=1): the products read bf16/fp16 operands (a, and A / dE
// rounded to it) with fp32 accumulation: the Gram sums in fp32 always, so fp16 inputs whose E
// exceeds 65504 stay finite. Elsewhere bf16/fp16 are converted to fp32 once.
// Every task runs with FTZ/DAZ (no denormal slow path), the softmax included.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../contract.h"  // CAM modes, generated from danet_ops/_contract.py
#include "../dtype_rules.h"  // y's dtype: the contract's output_dtype
#include "cpu_common.h"

namespace danet_ops {
namespace {

// Channel block of the Gram / dA products and N block of O / da, read per call
// (cpu::env_block, a RuntimeError outside the bounds): DANET_OPS_CPU_CAM_BLOCK_C in [8, 4096],
// DANET_OPS_CPU_CAM_BLOCK_N in [16, 65536]. A task's scratch is O(C * block), never O(N^2).
int64_t cam_block_c() { return cpu::env_block("DANET_OPS_CPU_CAM_BLOCK_C", 128, 8, 4096); }
int64_t cam_block_n() { return cpu::env_block("DANET_OPS_CPU_CAM_BLOCK_N", 512, 16, 65536); }

using cpu::BelowAutograd;  // the tile ops are ATen calls on views that may require grad

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType operand_type(at::ScalarType t) {
  return cpu::use_lowp(t) ? t : compute_type(t);
}

at::Tensor as_type(const at::Tensor& t, at::ScalarType ct) {
  return t.scalar_type() == ct ? t : t.to(ct);
}

double mode_sign(const std::string& mode) {
  using contract::kCamModeOriginal;
  using contract::kCamModePaper;
  TORCH_CHECK(mode == kCamModeOriginal || mode == kCamModePaper, "cam: mode must be '",
              kCamModeOriginal, "' or '", kCamModePaper, "'; got '", mode, "'");
  return mode == kCamModeOriginal ? -1.0 : 1.0;
}

// E[b] = a[b] a[b]^T for every batch, computing the upper-triangle blocks only.
// a: [B, C, N] (any strides; operand dtype) -> E: [B, C, C] contiguous in `ct`.
at::Tensor gram_symmetric(const at::Tensor& a, at::ScalarType ct, int64_t kChannelBlock) {
  const int64_t B = a.size(0), C = a.size(1);
  const int64_t nb = (C + kChannelBlock - 1) / kChannelBlock;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (I, J) with I <= J
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) pairs.emplace_back(I, J);
  const int64_t P = static_cast<int64_t>(pairs.size());
  at::Tensor E = at::empty({B, C, C}, a.options().dtype(ct));
  cpu::parallel_tasks(B * P, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / P;
      const auto [I, J] = pairs[t % P];
      const int64_t i0 = I * kChannelBlock, bi = std::min(kChannelBlock, C - i0);
      const int64_t j0 = J * kChannelBlock, bj = std::min(kChannelBlock, C - j0);
      at::Tensor e = E[b].narrow(0, i0, bi).narrow(1, j0, bj);
      cpu::gemm(e, a[b].narrow(0, i0, bi), a[b].narrow(0, j0, bj).t(), 1.0, 0.0);  // [bi,N]x[N,bj]
      if (I != J) E[b].narrow(0, j0, bj).narrow(1, i0, bi).copy_(e.t());   // mirror
    }
  });
  return E;
}

// attn = softmax(s * E) over the last dim, by row blocks in FTZ/DAZ tasks. In place on E.
// softmax(-E) equals the released softmax(rowmax(E) - E) (softmax is shift invariant); the
// row max is subtracted first, then exp with weights below e^-86.5 flushed to 0.
at::Tensor softmax_rows(at::Tensor E, double s) {
  const int64_t B = E.size(0), C = E.size(1), R = 64, nR = (C + R - 1) / R;
  cpu::parallel_tasks(B * nR, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nR, r0 = (t % nR) * R, br = std::min(R, C - r0);
      at::Tensor e = E[b].narrow(0, r0, br);
      if (s != 1.0) e.mul_(s);
      e.sub_(at::amax(e, 1, /*keepdim=*/true));
      cpu::exp_flush_(e);                 // no denormal (and no slow exp) for sharp rows
      e.div_(e.sum(1, /*keepdim=*/true));
    }
  });
  return E;
}

// The forward shared by cam_forward and cam_forward_inference (o undefined: O only per block).
void cam_forward_impl(const at::Tensor& x_, const std::optional<at::Tensor>& gamma_, double s,
                      bool keep_o, at::Tensor& o, at::Tensor& attn, at::Tensor& y) {
  TORCH_CHECK(x_.dim() == 3, "cam: x must be [B, C, N]; got ", x_.sizes());
  const int64_t kChannelBlock = cam_block_c(), kNBlock = cam_block_n();  // checked before any work
  const auto ct = compute_type(x_.scalar_type());
  const auto ot = operand_type(x_.scalar_type());
  const at::Tensor a = as_type(x_, ot);
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2);
  const bool residual = gamma_.has_value();
  const double gamma = residual ? gamma_->item<double>() : 0.0;
  const auto fopt = a.options().dtype(ct);

  attn = softmax_rows(gram_symmetric(a, ct, kChannelBlock), s);           // [B, C, C] in ct
  const at::Tensor Aop = as_type(attn, ot);                // A rounded to the operand dtype

  const bool write_o = keep_o || !residual;
  if (write_o) o = at::empty({B, C, N}, fopt);
  if (residual) y = at::empty({B, C, N}, fopt.dtype(contract::output_dtype(
                                             x_.scalar_type(), x_.scalar_type(), gamma_->scalar_type())));
  const int64_t nN = (N + kNBlock - 1) / kNBlock;
  cpu::parallel_tasks(B * nN, [&](int64_t begin, int64_t end) {
    at::Tensor obuf = write_o ? at::Tensor() : at::empty({C, kNBlock}, fopt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nN, n0 = (t % nN) * kNBlock, bn = std::min(kNBlock, N - n0);
      at::Tensor ob = write_o ? o[b].narrow(1, n0, bn) : obuf.narrow(1, 0, bn);
      cpu::gemm(ob, Aop[b], a[b].narrow(1, n0, bn), 1.0, 0.0);   // [C,C] x [C,bn]
      if (residual) {
        at::Tensor yb = y[b].narrow(1, n0, bn);
        at::add_out(yb, x_[b].narrow(1, n0, bn), ob, gamma);     // y = gamma*O + a
      }
    }
  });
}

}  // namespace

// x: [B, C, N] (any strides); gamma: [1] | None.
// -> o [B, C, N] (x's dtype), attn [B, C, C] (fp32, fp64 for fp64), y = gamma*o + x or [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_forward_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& gamma_, c10::string_view mode_) {
  BelowAutograd below_autograd;
  const double s = mode_sign(std::string(mode_));
  at::Tensor o, attn, y;
  cam_forward_impl(x_, gamma_, s, /*keep_o=*/true, o, attn, y);
  if (!gamma_.has_value()) y = at::empty({0}, x_.options());
  return {as_type(o, x_.scalar_type()), attn, y};
}

// Inference (no gradient will be taken): gamma*O + x with gamma, else O; nothing else kept.
at::Tensor cam_forward_inference_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& gamma_,
                                     c10::string_view mode_) {
  BelowAutograd below_autograd;
  const double s = mode_sign(std::string(mode_));
  at::Tensor o, attn, y;
  cam_forward_impl(x_, gamma_, s, /*keep_o=*/false, o, attn, y);
  return gamma_.has_value() ? y : as_type(o, x_.scalar_type());
}

// dy: [B, C, N] gradient of y (gamma given) or of o; attn, o from the forward.
// -> dx [B, C, N] (full gradient of x), dgamma [1] (compute dtype) or [0].
std::tuple<at::Tensor, at::Tensor> cam_backward_cpu(
    const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& attn_, const at::Tensor& o_,
    const std::optional<at::Tensor>& gamma_, c10::string_view mode_) {
  BelowAutograd below_autograd;
  TORCH_CHECK(x_.dim() == 3 && dy_.sizes() == x_.sizes() && o_.sizes() == x_.sizes(),
              "cam_backward: dy, x, o must be [B, C, N] of one shape; got dy ", dy_.sizes(),
              ", x ", x_.sizes(), ", o ", o_.sizes());
  const double s = mode_sign(std::string(mode_));
  const int64_t kChannelBlock = cam_block_c(), kNBlock = cam_block_n();
  const auto ct = compute_type(x_.scalar_type());
  const auto ot = operand_type(x_.scalar_type());
  const at::Tensor a = as_type(x_, ot), dy = as_type(dy_, ot);
  const at::Tensor A = as_type(attn_, ct);
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2);
  TORCH_CHECK(A.sizes() == at::IntArrayRef({B, C, C}), "cam_backward: attn must be [B, C, C]; got ",
              A.sizes());
  const bool residual = gamma_.has_value();
  const double g = residual ? gamma_->item<double>() : 1.0;
  const auto fopt = a.options().dtype(ct);

  // dA = g * dy a^T  [B, C, C], by channel row blocks (full product: dA is not symmetric).
  const int64_t nb = (C + kChannelBlock - 1) / kChannelBlock;
  at::Tensor dA = at::empty({B, C, C}, fopt);
  cpu::parallel_tasks(B * nb, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nb, i0 = (t % nb) * kChannelBlock, bi = std::min(kChannelBlock, C - i0);
      at::Tensor d = dA[b].narrow(0, i0, bi);
      cpu::gemm(d, dy[b].narrow(0, i0, bi), a[b].t(), g, 0.0);  // [bi,N] x [N,C]
    }
  });
  // Softmax backward, the sign of the mode, and the symmetrised Gram gradient M = dE + dE^T.
  at::Tensor dE = at::_softmax_backward_data(dA, A, -1, A.scalar_type()).mul_(s);
  const at::Tensor M = as_type(dE + dE.transpose(1, 2), ot);
  const at::Tensor At = as_type(A, ot).transpose(1, 2);

  // da = M a + g A^T dy (+ dy), one pass over N-blocks of a and dy; the same pass gives the
  // per-block partial sums of dy*o for dgamma (summed in a fixed order: deterministic).
  at::Tensor dx = at::empty({B, C, N}, fopt);
  const int64_t nN = (N + kNBlock - 1) / kNBlock;
  at::Tensor dgamma_part = at::zeros({B * nN}, fopt);
  cpu::parallel_tasks(B * nN, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nN, n0 = (t % nN) * kNBlock, bn = std::min(kNBlock, N - n0);
      at::Tensor d = dx[b].narrow(1, n0, bn);
      const at::Tensor dyb = dy[b].narrow(1, n0, bn);
      cpu::gemm(d, M[b], a[b].narrow(1, n0, bn), 1.0, 0.0);  // Gram side, both uses of a
      cpu::gemm(d, At[b], dyb, g, 1.0);                      // value side
      if (residual) {
        const at::Tensor dyf = as_type(dy_[b].narrow(1, n0, bn), ct);
        d.add_(dyf);
        dgamma_part[t].copy_((dyf * as_type(o_[b].narrow(1, n0, bn), ct)).sum());
      }
    }
  });
  at::Tensor dgamma = residual ? dgamma_part.sum().reshape({1}) : at::empty({0}, fopt);
  return {dx.to(x_.scalar_type()), dgamma};
}

TORCH_LIBRARY_FRAGMENT(danet_ops, m) {
  // Inference form of cam_forward (no gradient will be taken; CPU only): gamma*O + x with
  // gamma, else O. Nothing saved.
  m.def("cam_forward_inference(Tensor x, Tensor? gamma, str mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(danet_ops, CPU, m) {
  m.impl("cam_forward", &cam_forward_cpu);
  m.impl("cam_backward", &cam_backward_cpu);
  m.impl("cam_forward_inference", &cam_forward_inference_cpu);
}

}  // namespace danet_ops
