// Fused position attention (PAM) on CPU: flash-attention style tiling with an online softmax.
//
//   E[i,j] = scale * sum_c q[c,i] k[c,j]   A = softmax_j(E)   O[c,i] = sum_j v[c,j] A[i,j]
//   y = gamma * O + x
// Queries i < Nq; keys/values j < Nk, their own number of positions (DANet: Nk = Nq, scale = 1;
// scale = 1 skips the multiply, so those results are unchanged bit for bit).
//
// Nothing N x N is ever allocated: a task holds one [BM, BN] tile of E at a time. The tile
// products read the channel-major [C, N] conv output in place: a [C, N] slice with unit stride
// along N or along C (channels_last) is a BLAS matrix as it is, so no transposed or contiguous
// copy is made.
//
// Precision paths (cpu_common.h):
//  * fp32 / fp64: tiles in the input dtype through ATen's BLAS.
//  * bf16 / fp16 on a CPU with matrix units for them (or DANET_OPS_CPU_LOWP=1): the tile
//    products take bf16/fp16 operands with fp32 accumulation (E in fp32, softmax statistics in
//    fp32, P rounded to the input dtype for P.V and for the backward products), like flash
//    attention on GPU.
//  * bf16 / fp16 elsewhere (or DANET_OPS_CPU_LOWP=0): converted once to fp32, fp32 tiles.
// For bf16/fp16 inputs O is returned in fp32 (the backward computes Delta = sum_c dO*O from it:
// an O rounded to bf16 is amplified there by sharp softmaxes); the Python wrapper casts it.
//
// Denormals: exp(s - m) of very sharp logits is clamped to stay normal (and in the forward
// flushed to exactly 0 below e^-86.5), which also keeps ATen's exp on its fast path; every task
// runs with FTZ/DAZ set in its own thread (FlushDenormals), so no product of ours computes with
// denormals.
// A query row whose first key blocks are all -inf subtracts 0 instead of its running max -inf
// (as flash attention does), so -inf - -inf never turns the row into NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace danet_ops {
namespace {

// Tile sizes: query block BM (one task of the forward) and key block BN. 256 keeps a task's
// working set ([Cv, BM] accumulator + [BM, BN] tile) in L2 for Cv = 512.
int64_t block_size(const char* env, int64_t dflt) {
  const char* s = std::getenv(env);
  if (s == nullptr) return dflt;
  const long long v = std::atoll(s);
  return v >= 16 ? v : dflt;
}
const int64_t kBlockM = block_size("DANET_OPS_CPU_BLOCK_M", 256);
const int64_t kBlockN = block_size("DANET_OPS_CPU_BLOCK_N", 256);
constexpr double kInf = std::numeric_limits<double>::infinity();

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The tile ops below are ATen calls on views of the op's inputs, which may require grad: they
// must dispatch below autograd (in every worker thread: the guard is thread-local).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

at::Tensor as_type(const at::Tensor& t, at::ScalarType ct) {
  return t.scalar_type() == ct ? t : t.to(ct);
}

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

// The dtype the tile products read: the inputs' dtype on the low-precision path (q, k, v all
// bf16 or all fp16, as autocast gives them), else fp32/fp64.
at::ScalarType operand_type(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const auto vt = v.scalar_type();
  const bool same = q.scalar_type() == vt && k.scalar_type() == vt;
  return same && cpu::use_lowp(vt) ? vt : compute_type(vt);
}

// The forward shared by pam_forward (everything autograd needs) and pam_forward_inference
// (need_o / need_lse false: only y, or O when there is no residual).
void pam_forward_impl(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                      const std::optional<at::Tensor>& x_, const std::optional<at::Tensor>& gamma_,
                      double scale, bool need_lse, at::Tensor& o, at::Tensor& lse, at::Tensor& y) {
  check_inputs(q_, k_, v_, scale);
  TORCH_CHECK(x_.has_value() == gamma_.has_value(), "pam: give both x and gamma, or neither");
  const bool residual = x_.has_value();
  const int64_t B = q_.size(0), N = q_.size(2), Nk = k_.size(2), Cv = v_.size(1);
  if (residual) {
    TORCH_CHECK(x_->dim() == 3 && x_->size(0) == B && x_->size(1) == Cv && x_->size(2) == N,
                "pam: x must be [B, Cv, Nq] = [", B, ", ", Cv, ", ", N, "]; got ", x_->sizes());
  }
  const auto ct = compute_type(v_.scalar_type());
  const auto ot = operand_type(q_, k_, v_);
  const at::Tensor q = as_type(q_, ot), k = as_type(k_, ot), v = as_type(v_, ot);
  const double gamma = residual ? gamma_->item<double>() : 0.0;
  const auto fopt = q.options().dtype(ct);
  const bool need_o = !residual || o.defined();  // inference with residual: O lives per task
  if (!residual && !o.defined()) o = at::empty({B, Cv, N}, fopt);
  if (need_lse) lse = at::empty({B, N}, fopt);
  const at::Tensor x = residual ? *x_ : at::Tensor();
  if (residual) {
    // dtype of the reference's gamma * O + x: gamma is a [1] tensor, so it takes part.
    const auto out_dtype = at::promote_types(
        at::promote_types(v_.scalar_type(), x_->scalar_type()), gamma_->scalar_type());
    y = at::empty({B, Cv, N}, v.options().dtype(out_dtype));
  }

  const int64_t BM = kBlockM, BN = kBlockN, nI = (N + BM - 1) / BM;
  cpu::parallel_tasks(B * nI, [&](int64_t begin, int64_t end) {
    at::Tensor S = at::empty({BM, BN}, fopt);                  // one tile of E, then of P
    at::Tensor Pl = ot == ct ? S : at::empty({BM, BN}, q.options());  // P in the operand dtype
    at::Tensor acc_buf = need_o ? at::Tensor() : at::empty({Cv, BM}, fopt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      const at::Tensor Qt = q[b].narrow(1, i0, bm).t();      // [bm, Cq]
      at::Tensor acc = need_o ? o[b].narrow(1, i0, bm) : acc_buf.narrow(1, 0, bm);  // [Cv, bm]
      at::Tensor m = at::full({bm}, -kInf, fopt);
      at::Tensor l = at::zeros({bm}, fopt);
      if (Nk == 0) acc.zero_();                             // no keys: O = 0, lse = -inf
      for (int64_t j0 = 0; j0 < Nk; j0 += BN) {
        const int64_t bn = std::min(BN, Nk - j0);
        at::Tensor s = S.narrow(0, 0, bm).narrow(1, 0, bn);
        cpu::gemm(s, Qt, k[b].narrow(1, j0, bn), scale, 0.0);  // E tile [bm, bn]
        at::Tensor m_new = at::maximum(m, at::amax(s, 1));
        // A row with only -inf so far subtracts 0: exp(-inf - 0) = 0, never -inf - -inf.
        at::Tensor m_use = m_new.masked_fill(m_new == -kInf, 0.0);
        s.sub_(m_use.unsqueeze(1));
        cpu::exp_flush_(s);                                 // P tile, unnormalised
        at::Tensor alpha = m - m_use;
        cpu::exp_clamped_(alpha);                           // rescale of the old partials
        l.mul_(alpha).add_(s.sum(1));
        if (j0 > 0) acc.mul_(alpha.unsqueeze(0));
        at::Tensor p = s;
        if (ot != ct) {
          p = Pl.narrow(0, 0, bm).narrow(1, 0, bn);
          p.copy_(s);                                       // P rounded to bf16/fp16
        }
        cpu::gemm(acc, v[b].narrow(1, j0, bn), p.t(), 1.0, j0 > 0 ? 1.0 : 0.0);  // += V P^T
        m = m_new;
      }
      if (Nk > 0) acc.div_(l.unsqueeze(0));                 // O block
      if (need_lse) lse[b].narrow(0, i0, bm).copy_(m + l.log());
      if (residual) {                                       // fused epilogue y = gamma*O + x
        at::Tensor yb = y[b].narrow(1, i0, bm);
        at::add_out(yb, x[b].narrow(1, i0, bm), acc, gamma);
      }
    }
  });
}

}  // namespace

// q: [B, Cq, Nq]; k: [B, Cq, Nk]; v: [B, Cv, Nk]; x: [B, Cv, Nq] | None; gamma: [1] | None
// (any strides); E = scale * q^T k. -> o [B, Cv, Nq] (v's dtype; fp32 for bf16/fp16 v),
// lse [B, Nq] fp32 (fp64 for fp64), y [B, Cv, Nq] = gamma*o + x (or shape [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pam_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& x_, const std::optional<at::Tensor>& gamma_, double scale) {
  BelowAutograd below_autograd;
  check_inputs(q_, k_, v_, scale);
  const auto ct = compute_type(v_.scalar_type());
  at::Tensor o = at::empty({q_.size(0), v_.size(1), q_.size(2)}, v_.options().dtype(ct));
  at::Tensor lse, y;
  pam_forward_impl(q_, k_, v_, x_, gamma_, scale, /*need_lse=*/true, o, lse, y);
  if (!x_.has_value()) y = at::empty({0}, v_.options());
  return {o, lse, y};
}

// Inference (no gradient will be taken): the result only, gamma*O + x with x, else O in v's
// dtype. Saves nothing, keeps no [B, Cv, N] O beside y, computes no log-sum-exp.
at::Tensor pam_forward_inference_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                     const at::Tensor& v_, const std::optional<at::Tensor>& x_,
                                     const std::optional<at::Tensor>& gamma_, double scale) {
  BelowAutograd below_autograd;
  at::Tensor o, lse, y;
  pam_forward_impl(q_, k_, v_, x_, gamma_, scale, /*need_lse=*/false, o, lse, y);
  return x_.has_value() ? y : as_type(o, v_.scalar_type());
}

// dy: [B, Cv, Nq] gradient of y (gamma given) or of o. Recomputes P tile by tile from lse.
//   dO = gamma*dy, Delta_i = sum_c dO[c,i] O[c,i], dv = dO P, dA = dO^T v,
//   dE = scale * P o (dA - Delta), dq = k dE^T, dk = q dE, dgamma = sum dy*O
//   (scale is folded once into the dq / dk products' alpha; dk, dv: [B, C, Nk]).
// Delta uses O in fp32 (also for bf16/fp16 inputs) and the dy values the dA products use (dy
// rounded to bf16/fp16 on the low-precision path, so that dA - Delta cancels consistently);
// dgamma uses the exact dy.
// Parallel over (batch, key-block group): a group owns dk/dv of its key blocks; dq is summed
// over groups from per-group partial buffers in a fixed order (deterministic, no atomics).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pam_backward_cpu(
    const at::Tensor& dy_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& o_, const at::Tensor& lse, const std::optional<at::Tensor>& gamma_,
    double scale) {
  check_inputs(q_, k_, v_, scale);
  BelowAutograd below_autograd;
  const std::vector<int64_t> out_shape{q_.size(0), v_.size(1), q_.size(2)};
  TORCH_CHECK(dy_.sizes() == at::IntArrayRef(out_shape) && o_.sizes() == at::IntArrayRef(out_shape),
              "pam_backward: dy and o must be [B, Cv, Nq] = ", at::IntArrayRef(out_shape),
              "; got dy ", dy_.sizes(), ", o ", o_.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q_.size(0) && lse.size(1) == q_.size(2),
              "pam_backward: lse must be [B, Nq]; got ", lse.sizes());
  const auto ct = compute_type(v_.scalar_type());
  const auto ot = operand_type(q_, k_, v_);
  const at::Tensor q = as_type(q_, ot), k = as_type(k_, ot), v = as_type(v_, ot);
  const at::Tensor dy = as_type(dy_, ot);
  const at::Tensor lse_c = as_type(lse, ct);
  const int64_t B = q.size(0), Cq = q.size(1), N = q.size(2), Nk = k.size(2), Cv = v.size(1);
  const double g = gamma_.has_value() ? gamma_->item<double>() : 1.0;
  const int64_t BM = kBlockM, BN = kBlockN, nI = (N + BM - 1) / BM, nJ = (Nk + BN - 1) / BN;
  const auto fopt = q.options().dtype(ct);

  // Preprocess, block by block in the compute dtype: rowdot[b, i] = sum_c dy[c,i] O[c,i]
  // (dgamma = sum rowdot) and Delta = g * sum_c dy'[c,i] O[c,i] with dy' the dy the dA products
  // read (the same as dy unless dy is wider than the operands, e.g. fp32 dy under autocast).
  const bool dy_rounded = dy.scalar_type() != dy_.scalar_type() && ot != ct;
  at::Tensor rowdot = at::empty({B, N}, fopt);
  at::Tensor rowdot_op = dy_rounded ? at::empty({B, N}, fopt) : rowdot;
  cpu::parallel_tasks(B * nI, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      const at::Tensor ob = as_type(o_[b].narrow(1, i0, bm), ct);
      at::Tensor r = rowdot[b].narrow(0, i0, bm);
      at::sum_out(r, as_type(dy_[b].narrow(1, i0, bm), ct) * ob, {0});
      if (dy_rounded) {
        at::Tensor r2 = rowdot_op[b].narrow(0, i0, bm);
        at::sum_out(r2, as_type(dy[b].narrow(1, i0, bm), ct) * ob, {0});
      }
    }
  });
  const at::Tensor delta = rowdot_op * g;

  const int64_t T = at::get_num_threads();
  const int64_t G = B >= T || nJ == 0 ? 1 : std::min(nJ, (T + B - 1) / B);  // key-block groups per batch
  at::Tensor dq = at::zeros({B, Cq, N}, fopt);
  at::Tensor dq_part = G == 1 ? dq.unsqueeze(1) : at::zeros({B, G, Cq, N}, fopt);
  at::Tensor dk = at::zeros({B, Cq, Nk}, fopt);
  at::Tensor dv = at::zeros({B, Cv, Nk}, fopt);

  cpu::parallel_tasks(B * G, [&](int64_t begin, int64_t end) {
    at::Tensor P = at::empty({BM, BN}, fopt);
    at::Tensor dE = at::empty({BM, BN}, fopt);
    at::Tensor Pl = ot == ct ? P : at::empty({BM, BN}, q.options());
    at::Tensor dEl = ot == ct ? dE : at::empty({BM, BN}, q.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / G, grp = t % G;
      const int64_t jb_begin = grp * nJ / G, jb_end = (grp + 1) * nJ / G;
      at::Tensor dqp = dq_part[b][grp];                       // [Cq, N]
      for (int64_t jb = jb_begin; jb < jb_end; ++jb) {
        const int64_t j0 = jb * BN, bn = std::min(BN, Nk - j0);
        const at::Tensor Kj = k[b].narrow(1, j0, bn), Vj = v[b].narrow(1, j0, bn);
        at::Tensor dKj = dk[b].narrow(1, j0, bn), dVj = dv[b].narrow(1, j0, bn);
        for (int64_t i0 = 0; i0 < N; i0 += BM) {
          const int64_t bm = std::min(BM, N - i0);
          const at::Tensor Qi = q[b].narrow(1, i0, bm);       // [Cq, bm]
          const at::Tensor dYi = dy[b].narrow(1, i0, bm);     // [Cv, bm]
          at::Tensor p = P.narrow(0, 0, bm).narrow(1, 0, bn);
          at::Tensor de = dE.narrow(0, 0, bm).narrow(1, 0, bn);
          cpu::gemm(p, Qi.t(), Kj, scale, 0.0);               // E tile
          p.sub_(lse_c[b].narrow(0, i0, bm).unsqueeze(1));
          cpu::exp_clamped_(p);                               // P = exp(E - lse)
          at::Tensor pl = p, del = de;
          if (ot != ct) {
            pl = Pl.narrow(0, 0, bm).narrow(1, 0, bn);
            pl.copy_(p);
            del = dEl.narrow(0, 0, bm).narrow(1, 0, bn);
          }
          cpu::gemm(dVj, dYi, pl, g, 1.0);                    // dv += g * dy P
          cpu::gemm(de, dYi.t(), Vj, 1.0, 0.0);               // dy^T v
          de.mul_(g).sub_(delta[b].narrow(0, i0, bm).unsqueeze(1)).mul_(p);  // dE / scale
          if (ot != ct) del.copy_(de);
          cpu::gemm(dKj, Qi, del, scale, 1.0);                // dk += q dE
          at::Tensor dqi = dqp.narrow(1, i0, bm);
          cpu::gemm(dqi, Kj, del.t(), scale, 1.0);            // dq += k dE^T
        }
      }
    }
  });
  if (G > 1) at::sum_out(dq, dq_part, {1});

  at::Tensor dgamma = gamma_.has_value() ? rowdot.sum().reshape({1}) : at::empty({0}, fopt);
  return {dq.to(q_.scalar_type()), dk.to(k_.scalar_type()), dv.to(v_.scalar_type()), dgamma};
}

TORCH_LIBRARY_FRAGMENT(danet_ops, m) {
  // Inference form of pam_forward (no gradient will be taken; CPU only): the result alone,
  // gamma*O + x with x and gamma, else O in v's dtype. Nothing saved, no log-sum-exp.
  m.def("pam_forward_inference(Tensor q, Tensor k, Tensor v, Tensor? x, Tensor? gamma,"
        " float scale=1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(danet_ops, CPU, m) {
  m.impl("pam_forward", &pam_forward_cpu);
  m.impl("pam_backward", &pam_backward_cpu);
  m.impl("pam_forward_inference", &pam_forward_inference_cpu);
}

}  // namespace danet_ops
