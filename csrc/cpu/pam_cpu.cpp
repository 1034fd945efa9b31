// Fused position attention (PAM) on CPU: flash-attention style tiling with an online softmax.
//
//   E[i,j] = scale * sum_c q[c,i] k[c,j]   A = softmax_j(E)   O[c,i] = sum_j v[c,j] A[i,j]
//   y = gamma * O + x
// Queries i < Nq; keys/values j < Nk, their own number of positions (DANet: Nk = Nq, scale = 1;
// scale = 1 skips the multiply, so those results are unchanged bit for bit).
//
// Nothing N x N is ever allocated: a task holds one [BM, BN] tile of E at a time. The tile
// products go through ATen's BLAS (at::mm / addmm on strided views), which reads the
// channel-major [C, N] conv output in place: a [C, N] slice with unit stride along N or along C
// (channels_last) is a BLAS matrix as it is, so no transposed or contiguous copy is made.
// fp16/bf16 inputs are computed in fp32 (converted once, O(C*N)); fp64 stays fp64.
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

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The tile ops below are ATen calls on views of the op's inputs, which may require grad: they
// must dispatch below autograd (in every worker thread: the guard is thread-local).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

at::Tensor in_compute(const at::Tensor& t, at::ScalarType ct) {
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

}  // namespace

// q: [B, Cq, Nq]; k: [B, Cq, Nk]; v: [B, Cv, Nk]; x: [B, Cv, Nq] | None; gamma: [1] | None
// (any strides); E = scale * q^T k. -> o [B, Cv, Nq] (v's dtype), lse [B, Nq] fp32 (fp64 for
// fp64), y [B, Cv, Nq] = gamma*o + x (or shape [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pam_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& x_, const std::optional<at::Tensor>& gamma_, double scale) {
  check_inputs(q_, k_, v_, scale);
  BelowAutograd below_autograd;
  TORCH_CHECK(x_.has_value() == gamma_.has_value(), "pam: give both x and gamma, or neither");
  const auto ct = compute_type(v_.scalar_type());
  const at::Tensor q = in_compute(q_, ct), k = in_compute(k_, ct), v = in_compute(v_, ct);
  const int64_t B = q.size(0), N = q.size(2), Nk = k.size(2), Cv = v.size(1);
  const bool residual = x_.has_value();
  const double gamma = residual ? gamma_->item<double>() : 0.0;

  at::Tensor o = at::empty({B, Cv, N}, v.options());       // in compute dtype
  at::Tensor lse = at::empty({B, N}, q.options());          // fp32 (fp64 for fp64 inputs)
  at::Tensor y;
  if (residual) {
    TORCH_CHECK(x_->dim() == 3 && x_->size(0) == B && x_->size(1) == Cv && x_->size(2) == N,
                "pam: x must be [B, Cv, Nq] = [", B, ", ", Cv, ", ", N, "]; got ", x_->sizes());
    y = at::empty({B, Cv, N}, v.options());
  }
  const at::Tensor x = residual ? in_compute(*x_, ct) : at::Tensor();

  const int64_t BM = kBlockM, BN = kBlockN, nI = (N + BM - 1) / BM;
  at::parallel_for(0, B * nI, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_worker;
    at::Tensor S = at::empty({BM, BN}, q.options());        // one tile of E, then of P
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      const at::Tensor Qt = q[b].narrow(1, i0, bm).t();      // [bm, Cq]
      at::Tensor acc = o[b].narrow(1, i0, bm);              // [Cv, bm], accumulates in place
      acc.zero_();
      at::Tensor m = at::full({bm}, -std::numeric_limits<double>::infinity(), q.options());
      at::Tensor l = at::zeros({bm}, q.options());
      for (int64_t j0 = 0; j0 < Nk; j0 += BN) {
        const int64_t bn = std::min(BN, Nk - j0);
        at::Tensor s = S.narrow(0, 0, bm).narrow(1, 0, bn);
        at::mm_out(s, Qt, k[b].narrow(1, j0, bn));           // q^T k tile [bm, bn]
        if (scale != 1.0) s.mul_(scale);                     // E tile
        at::Tensor m_new = at::maximum(m, at::amax(s, 1));
        s.sub_(m_new.unsqueeze(1)).exp_();                  // P tile, unnormalised
        at::Tensor alpha = (m - m_new).exp_();              // rescale of the old partials
        l.mul_(alpha).add_(s.sum(1));
        acc.mul_(alpha.unsqueeze(0));
        acc.addmm_(v[b].narrow(1, j0, bn), s.t());           // [Cv, bn] x [bn, bm]
        m = m_new;
      }
      if (Nk > 0) acc.div_(l.unsqueeze(0));                 // O block (no keys: O = 0, lse = -inf)
      lse[b].narrow(0, i0, bm).copy_(m + l.log());
      if (residual) {                                       // fused epilogue y = gamma*O + x
        at::Tensor yb = y[b].narrow(1, i0, bm);
        at::add_out(yb, x[b].narrow(1, i0, bm), acc, gamma);
      }
    }
  });

  const auto out_dtype = v_.scalar_type();
  if (residual) {
    // dtype of the reference's gamma * O + x: gamma is a [1] tensor, so it takes part.
    y = y.to(at::promote_types(at::promote_types(out_dtype, x_->scalar_type()),
                               gamma_->scalar_type()));
  } else {
    y = at::empty({0}, v_.options());
  }
  return {o.to(out_dtype), lse, y};
}

// dy: [B, Cv, Nq] gradient of y (gamma given) or of o. Recomputes P tile by tile from lse.
//   dO = gamma*dy, Delta_i = sum_c dO[c,i] O[c,i], dv = dO P, dA = dO^T v,
//   dE = scale * P o (dA - Delta), dq = k dE^T, dk = q dE, dgamma = sum dy*O
//   (scale is folded once into the dq / dk products' alpha; dk, dv: [B, C, Nk]).
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
  const at::Tensor q = in_compute(q_, ct), k = in_compute(k_, ct), v = in_compute(v_, ct);
  const at::Tensor dy = in_compute(dy_, ct), o = in_compute(o_, ct);
  const at::Tensor lse_c = in_compute(lse, ct);
  const int64_t B = q.size(0), Cq = q.size(1), N = q.size(2), Nk = k.size(2), Cv = v.size(1);
  const double g = gamma_.has_value() ? gamma_->item<double>() : 1.0;
  const int64_t BM = kBlockM, BN = kBlockN, nI = (N + BM - 1) / BM, nJ = (Nk + BN - 1) / BN;

  // Preprocess: rowdot[b, i] = sum_c dy[c,i] O[c,i] (Delta = g * rowdot; dgamma = sum rowdot).
  at::Tensor rowdot = at::empty({B, N}, q.options());
  at::parallel_for(0, B * nI, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_worker;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      at::Tensor r = rowdot[b].narrow(0, i0, bm);
      at::sum_out(r, dy[b].narrow(1, i0, bm) * o[b].narrow(1, i0, bm), {0});
    }
  });
  const at::Tensor delta = rowdot * g;

  const int64_t T = at::get_num_threads();
  const int64_t G = B >= T || nJ == 0 ? 1 : std::min(nJ, (T + B - 1) / B);  // key-block groups per batch
  at::Tensor dq = at::zeros({B, Cq, N}, q.options());
  at::Tensor dq_part = G == 1 ? dq.unsqueeze(1) : at::zeros({B, G, Cq, N}, q.options());
  at::Tensor dk = at::zeros({B, Cq, Nk}, q.options());
  at::Tensor dv = at::zeros({B, Cv, Nk}, q.options());

  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_worker;
    at::Tensor P = at::empty({BM, BN}, q.options());
    at::Tensor dE = at::empty({BM, BN}, q.options());
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
          at::mm_out(p, Qi.t(), Kj);                          // q^T k tile
          if (scale != 1.0) p.mul_(scale);                    // E tile
          p.sub_(lse_c[b].narrow(0, i0, bm).unsqueeze(1)).exp_();  // P = exp(E - lse)
          dVj.addmm_(dYi, p, 1.0, g);                         // dv += g * dy P
          at::mm_out(de, dYi.t(), Vj);                        // dy^T v
          de.mul_(g).sub_(delta[b].narrow(0, i0, bm).unsqueeze(1)).mul_(p);  // dE / scale
          dKj.addmm_(Qi, de, 1.0, scale);                     // dk += q dE
          dqp.narrow(1, i0, bm).addmm_(Kj, de.t(), 1.0, scale);  // dq += k dE^T
        }
      }
    }
  });
  if (G > 1) at::sum_out(dq, dq_part, {1});

  at::Tensor dgamma = gamma_.has_value() ? rowdot.sum().reshape({1}) : at::empty({0}, q.options());
  return {dq.to(q_.scalar_type()), dk.to(k_.scalar_type()), dv.to(v_.scalar_type()), dgamma};
}

TORCH_LIBRARY_IMPL(danet_ops, CPU, m) {
  m.impl("pam_forward", &pam_forward_cpu);
  m.impl("pam_backward", &pam_backward_cpu);
}

}  // namespace danet_ops
