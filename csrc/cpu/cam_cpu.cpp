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
// fp16/bf16 inputs are computed in fp32 (converted once); the C x C matrices are tiny.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace danet_ops {
namespace {

constexpr int64_t kChannelBlock = 64;   // Gram / dA channel block
constexpr int64_t kNBlock = 512;        // N block of O = A a and of da

using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;  // see pam_cpu.cpp

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor in_compute(const at::Tensor& t, at::ScalarType ct) {
  return t.scalar_type() == ct ? t : t.to(ct);
}

double mode_sign(const std::string& mode) {
  TORCH_CHECK(mode == "original" || mode == "paper",
              "cam: mode must be 'original' or 'paper'; got '", mode, "'");
  return mode == "original" ? -1.0 : 1.0;
}

// E[b] = a[b] a[b]^T for every batch, computing the upper-triangle blocks only.
// a: [B, C, N] (any strides) -> E: [B, C, C] contiguous.
at::Tensor gram_symmetric(const at::Tensor& a) {
  const int64_t B = a.size(0), C = a.size(1);
  const int64_t nb = (C + kChannelBlock - 1) / kChannelBlock;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (I, J) with I <= J
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) pairs.emplace_back(I, J);
  const int64_t P = static_cast<int64_t>(pairs.size());
  at::Tensor E = at::empty({B, C, C}, a.options());
  at::parallel_for(0, B * P, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_worker;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / P;
      const auto [I, J] = pairs[t % P];
      const int64_t i0 = I * kChannelBlock, bi = std::min(kChannelBlock, C - i0);
      const int64_t j0 = J * kChannelBlock, bj = std::min(kChannelBlock, C - j0);
      at::Tensor e = E[b].narrow(0, i0, bi).narrow(1, j0, bj);
      at::mm_out(e, a[b].narrow(0, i0, bi), a[b].narrow(0, j0, bj).t());  // [bi,N]x[N,bj]
      if (I != J) E[b].narrow(0, j0, bj).narrow(1, i0, bi).copy_(e.t());   // mirror
    }
  });
  return E;
}

}  // namespace

// x: [B, C, N] (any strides); gamma: [1] | None.
// -> o [B, C, N] (x's dtype), attn [B, C, C] (fp32, fp64 for fp64), y = gamma*o + x or [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_forward_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& gamma_, c10::string_view mode_) {
  BelowAutograd below_autograd;
  TORCH_CHECK(x_.dim() == 3, "cam: x must be [B, C, N]; got ", x_.sizes());
  const double s = mode_sign(std::string(mode_));
  const auto ct = compute_type(x_.scalar_type());
  const at::Tensor a = in_compute(x_, ct);
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2);
  const bool residual = gamma_.has_value();
  const double gamma = residual ? gamma_->item<double>() : 0.0;

  // softmax(-E) equals the released softmax(rowmax(E) - E) (softmax is shift invariant) and
  // is computed stably by softmax's own max subtraction.
  const at::Tensor attn = at::softmax(gram_symmetric(a) * s, -1);   // [B, C, C]

  at::Tensor o = at::empty({B, C, N}, a.options());
  at::Tensor y = residual ? at::empty({B, C, N}, a.options()) : at::Tensor();
  const int64_t nN = (N + kNBlock - 1) / kNBlock;
  at::parallel_for(0, B * nN, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_worker;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nN, n0 = (t % nN) * kNBlock, bn = std::min(kNBlock, N - n0);
      at::Tensor ob = o[b].narrow(1, n0, bn);
      at::mm_out(ob, attn[b], a[b].narrow(1, n0, bn));          // [C,C] x [C,bn]
      if (residual) {
        at::Tensor yb = y[b].narrow(1, n0, bn);
        at::add_out(yb, a[b].narrow(1, n0, bn), ob, gamma);      // y = gamma*O + a
      }
    }
  });
  if (residual) {
    y = y.to(at::promote_types(x_.scalar_type(), gamma_->scalar_type()));
  } else {
    y = at::empty({0}, x_.options());
  }
  return {o.to(x_.scalar_type()), attn, y};
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
  const auto ct = compute_type(x_.scalar_type());
  const at::Tensor a = in_compute(x_, ct), dy = in_compute(dy_, ct);
  const at::Tensor A = in_compute(attn_, ct), o = in_compute(o_, ct);
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2);
  TORCH_CHECK(A.sizes() == at::IntArrayRef({B, C, C}), "cam_backward: attn must be [B, C, C]; got ",
              A.sizes());
  const bool residual = gamma_.has_value();
  const double g = residual ? gamma_->item<double>() : 1.0;

  // dA = g * dy a^T  [B, C, C], by channel row blocks (full product: dA is not symmetric).
  const int64_t nb = (C + kChannelBlock - 1) / kChannelBlock;
  at::Tensor dA = at::empty({B, C, C}, a.options());
  at::parallel_for(0, B * nb, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_worker;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nb, i0 = (t % nb) * kChannelBlock, bi = std::min(kChannelBlock, C - i0);
      at::Tensor d = dA[b].narrow(0, i0, bi);
      at::mm_out(d, dy[b].narrow(0, i0, bi), a[b].t());      // [bi,N] x [N,C]
      d.mul_(g);
    }
  });
  // Softmax backward, the sign of the mode, and the symmetrised Gram gradient M = dE + dE^T.
  at::Tensor dE = at::_softmax_backward_data(dA, A, -1, A.scalar_type()).mul_(s);
  const at::Tensor M = dE + dE.transpose(1, 2);
  const at::Tensor At = A.transpose(1, 2);

  // da = M a + g A^T dy (+ dy), one pass over N-blocks of a and dy; the same pass gives the
  // per-block partial sums of dy*o for dgamma (summed in a fixed order: deterministic).
  at::Tensor dx = at::empty({B, C, N}, a.options());
  const int64_t nN = (N + kNBlock - 1) / kNBlock;
  at::Tensor dgamma_part = at::zeros({B * nN}, a.options());
  at::parallel_for(0, B * nN, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_worker;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nN, n0 = (t % nN) * kNBlock, bn = std::min(kNBlock, N - n0);
      at::Tensor d = dx[b].narrow(1, n0, bn);
      const at::Tensor dyb = dy[b].narrow(1, n0, bn);
      at::mm_out(d, M[b], a[b].narrow(1, n0, bn));           // Gram side, both uses of a
      d.addmm_(At[b], dyb, 1.0, g);                          // value side
      if (residual) {
        d.add_(dyb);
        dgamma_part[t].copy_((dyb * o[b].narrow(1, n0, bn)).sum());
      }
    }
  });
  at::Tensor dgamma = residual ? dgamma_part.sum().reshape({1}) : at::empty({0}, a.options());
  return {dx.to(x_.scalar_type()), dgamma};
}

TORCH_LIBRARY_IMPL(danet_ops, CPU, m) {
  m.impl("cam_forward", &cam_forward_cpu);
  m.impl("cam_backward", &cam_backward_cpu);
}

}  // namespace danet_ops
