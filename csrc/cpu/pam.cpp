// The CPU kernels of danet_ops::pam_forward, pam_backward and pam_forward_inference (schemas in
// csrc/register.cpp): checks, allocation, and one switch on the path select_path chose
// (lowp_gemm.h); the kernels are in pam_tiles.cpp and pam_keymajor.cpp (formulas in
// pam_kernels.h).
//
// Dtypes: fp32 / fp64 compute in their own dtype. bf16 / fp16 inputs (q, k, v all of one dtype,
// as autocast gives them) compute with bf16 / fp16 operands and fp32 accumulation on a
// low-precision path, else are converted once to fp32. Mixed input dtypes take the fp32 / fp64
// tiles of v's compute dtype. For bf16/fp16 inputs O is returned in fp32 (the backward computes
// Delta = sum_c dO*O from it: an O rounded to bf16 is amplified there by sharp softmaxes).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../dtype_rules.h"  // y's dtype: the contract's output_dtype
#include "pam_kernels.h"

namespace danet_ops {
namespace {

using cpu::as_type;
using cpu::compute_type;
using cpu::Path;

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "pam: q, k, v must be [B, C, N]; got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1),
              "pam: k must be [B, Cq, Nk] with q's B and Cq; got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(2) == k.size(2),
              "pam: v must be [B, Cv, Nk] with k's B and Nk; got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(std::isfinite(scale), "pam: scale must be finite; got ", scale);
}

// The path of this call (select_path for v's dtype when q, k and v share it, else the tiles of
// v's compute dtype), with a.q, a.k, a.v set to the inputs in the path's operand dtype.
template <class Args>
Path prepare(Args& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const auto vt = v.scalar_type();
  const Path path = q.scalar_type() == vt && k.scalar_type() == vt ? cpu::select_path(vt)
                    : vt == at::kDouble ? Path::kFp64Tiles : Path::kFp32Tiles;
  const auto ot = cpu::operand_type(path, vt);
  a.q = as_type(q, ot);
  a.k = as_type(k, ot);
  a.v = as_type(v, ot);
  return path;
}

// acc * f (in acc's fp32/fp64, before any rounding), contiguous, in dtype dt (one conversion
// pass, none when acc already is that).
at::Tensor finish(at::Tensor acc, double f, at::ScalarType dt) {
  if (f != 1.0) acc.mul_(f);
  return acc.to(dt, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

// The forward shared by pam_forward (for_backward: O and lse kept, everything autograd needs)
// and pam_forward_inference (neither: only y, or O when there is no residual; O then lives per
// task beside y).
void pam_forward_impl(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                      const std::optional<at::Tensor>& x_, const std::optional<at::Tensor>& gamma_,
                      double scale, bool for_backward, at::Tensor& o, at::Tensor& lse, at::Tensor& y) {
  check_inputs(q_, k_, v_, scale);
  TORCH_CHECK(x_.has_value() == gamma_.has_value(), "pam: give both x and gamma, or neither");
  const bool residual = x_.has_value();
  const int64_t B = q_.size(0), N = q_.size(2), Cv = v_.size(1);
  if (residual) {
    TORCH_CHECK(x_->dim() == 3 && x_->size(0) == B && x_->size(1) == Cv && x_->size(2) == N,
                "pam: x must be [B, Cv, Nq] = [", B, ", ", Cv, ", ", N, "]; got ", x_->sizes());
  }
  cpu::PamForward a;
  const Path path = prepare(a, q_, k_, v_);
  const auto ct = compute_type(v_.scalar_type());
  a.scale = scale;
  a.residual = residual;
  const auto fopt = a.q.options().dtype(ct);
  if (for_backward || !residual) o = at::empty({B, Cv, N}, fopt);
  if (for_backward) lse = at::empty({B, N}, fopt);
  if (residual) {
    a.x = *x_;
    a.gamma = gamma_->item<double>();
    y = at::empty({B, Cv, N}, a.v.options().dtype(contract::output_dtype(
                                  v_.scalar_type(), x_->scalar_type(), gamma_->scalar_type())));
  }
  a.o = o;
  a.lse = lse;
  a.y = y;
  a.BM = cpu::pam_block_m();
  a.BN = cpu::pam_block_n();
  switch (path) {
    case Path::kBf16Brgemm: cpu::pam_forward_keymajor<at::BFloat16>(a); break;
    case Path::kFp16Brgemm: cpu::pam_forward_keymajor<at::Half>(a); break;
    case Path::kBf16Cblas:
    case Path::kFp16Cblas:
    case Path::kFp32Tiles:
    case Path::kFp64Tiles: cpu::pam_forward_tiles(a, cpu::engine_of(path)); break;
  }
}

// q: [B, Cq, Nq]; k: [B, Cq, Nk]; v: [B, Cv, Nk]; x: [B, Cv, Nq] | None; gamma: [1] | None
// (any strides); E = scale * q^T k. -> o [B, Cv, Nq] (stats dtype: fp32, fp64 for fp64),
// lse [B, Nq] (stats dtype), y [B, Cv, Nq] = gamma*o + x (or shape [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pam_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& x_, const std::optional<at::Tensor>& gamma_, double scale) {
  cpu::BelowAutograd below_autograd;
  at::Tensor o, lse, y;
  pam_forward_impl(q_, k_, v_, x_, gamma_, scale, /*for_backward=*/true, o, lse, y);
  if (!x_.has_value()) y = at::empty({0}, v_.options());
  return {o, lse, y};
}

// Inference (no gradient will be taken): the result only, gamma*O + x with x, else O in v's
// dtype. Saves nothing, keeps no [B, Cv, N] O beside y, computes no log-sum-exp.
at::Tensor pam_forward_inference_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                     const at::Tensor& v_, const std::optional<at::Tensor>& x_,
                                     const std::optional<at::Tensor>& gamma_, double scale) {
  cpu::BelowAutograd below_autograd;
  at::Tensor o, lse, y;
  pam_forward_impl(q_, k_, v_, x_, gamma_, scale, /*for_backward=*/false, o, lse, y);
  return x_.has_value() ? y : as_type(o, v_.scalar_type());
}

// dy: [B, Cv, Nq] gradient of y (gamma given) or of o. -> dq, dk, dv in q's, k's, v's dtype,
// dgamma [1] (stats dtype) or [0]. The convention of pam_kernels.h on every path:
//   Delta_i = g * sum_c dy'[c,i] O[c,i], dS = P o (g dA - Delta), dv = g * dy P,
//   dk = scale * q dS, dq = scale * k dS^T, dgamma = sum dy*O,
// with dy' the dy the dA products read (dy rounded to bf16/fp16 on a low-precision path, so that
// dA - Delta cancels consistently) and O in fp32 (also for bf16/fp16 inputs); dgamma uses the
// exact dy.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pam_backward_cpu(
    const at::Tensor& dy_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& o_, const at::Tensor& lse, const std::optional<at::Tensor>& gamma_,
    double scale) {
  check_inputs(q_, k_, v_, scale);
  cpu::BelowAutograd below_autograd;
  const std::vector<int64_t> out_shape{q_.size(0), v_.size(1), q_.size(2)};
  TORCH_CHECK(dy_.sizes() == at::IntArrayRef(out_shape) && o_.sizes() == at::IntArrayRef(out_shape),
              "pam_backward: dy and o must be [B, Cv, Nq] = ", at::IntArrayRef(out_shape),
              "; got dy ", dy_.sizes(), ", o ", o_.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q_.size(0) && lse.size(1) == q_.size(2),
              "pam_backward: lse must be [B, Nq]; got ", lse.sizes());
  cpu::PamBackward a;
  const Path path = prepare(a, q_, k_, v_);
  const auto ct = compute_type(v_.scalar_type());
  const auto ot = a.q.scalar_type();
  a.dy = as_type(dy_, ot);
  a.lse = as_type(lse, ct);
  a.g = gamma_.has_value() ? gamma_->item<double>() : 1.0;
  a.scale = scale;
  a.BM = cpu::pam_block_m();
  a.BN = cpu::pam_block_n();
  // Delta from the dy the products read (narrower than dy when e.g. fp32 dy meets bf16 operands).
  const bool dy_rounded = a.dy.scalar_type() != dy_.scalar_type() && ot != ct;
  at::Tensor rowdot, rowdot_op;
  cpu::pam_rowdots(dy_, dy_rounded ? a.dy : at::Tensor(), o_, ct, a.BM, rowdot, rowdot_op);
  a.delta = rowdot_op * a.g;

  cpu::PamGrads r;
  switch (path) {
    case Path::kBf16Brgemm: r = cpu::pam_backward_keymajor_bf16(a); break;
    case Path::kFp16Brgemm:  // no fp16 key-major backward: the tile loop on brgemm products
    case Path::kBf16Cblas:
    case Path::kFp16Cblas:
    case Path::kFp32Tiles:
    case Path::kFp64Tiles: r = cpu::pam_backward_tiles(a, cpu::engine_of(path)); break;
  }
  at::Tensor dgamma = gamma_.has_value() ? rowdot.sum().reshape({1}) : at::empty({0}, rowdot.options());
  return {finish(r.dq, scale, q_.scalar_type()), finish(r.dk, scale, k_.scalar_type()),
          finish(r.dv, a.g, v_.scalar_type()), dgamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(danet_ops, CPU, m) {
  m.impl("pam_forward", &pam_forward_cpu);
  m.impl("pam_backward", &pam_backward_cpu);
  m.impl("pam_forward_inference", &pam_forward_inference_cpu);
}

}  // namespace danet_ops
