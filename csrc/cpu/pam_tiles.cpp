// PAM on tiles: flash-attention style tiling with an online softmax, every tile an ATen tensor
// (pam_kernels.h has the formulas). The tile products go through cpu::gemm with the path's engine:
// ATen's BLAS on fp32 / fp64, or bf16 / fp16 operands with fp32 accumulation (E in fp32, softmax
// statistics in fp32, P and dS rounded to the operand dtype for the products that read them).
// The products read the channel-major [C, N] inputs in place: a [C, N] slice with unit stride
// along N or along C (channels_last) is a BLAS matrix as it is, so no transposed or contiguous
// copy is made.
//
// Denormals: exp(s - m) of very sharp logits is clamped to stay normal (and in the forward
// flushed to exactly 0 below e^-86.5), which also keeps ATen's exp on its fast path; every task
// runs with FTZ/DAZ (TaskScope). A query row whose first key blocks are all -inf subtracts 0
// instead of its running max -inf (as flash attention does), so -inf - -inf never makes a NaN.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "pam_kernels.h"

namespace danet_ops {
namespace cpu {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
}  // namespace

// Parallel over (batch, query block): a task owns its O block [Cv, bm] and streams the key blocks.
void pam_forward_tiles(PamForward& a, Engine engine) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v, &x = a.x;
  const int64_t B = q.size(0), N = q.size(2), Nk = k.size(2), Cv = v.size(1);
  const int64_t BM = a.BM, BN = a.BN, nI = (N + BM - 1) / BM;
  const auto ct = compute_type(q.scalar_type());
  const bool lowp = ct != q.scalar_type();
  const auto fopt = q.options().dtype(ct);
  parallel_tasks(B * nI, [&](int64_t begin, int64_t end) {
    at::Tensor S = at::empty({BM, BN}, fopt);                       // one tile of E, then of P
    at::Tensor Pl = lowp ? at::empty({BM, BN}, q.options()) : S;    // P in the operand dtype
    at::Tensor acc_buf = a.o.defined() ? at::Tensor() : at::empty({Cv, BM}, fopt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      const at::Tensor Qt = q[b].narrow(1, i0, bm).t();             // [bm, Cq]
      at::Tensor acc = a.o.defined() ? a.o[b].narrow(1, i0, bm) : acc_buf.narrow(1, 0, bm);  // [Cv, bm]
      at::Tensor m = at::full({bm}, -kInf, fopt);
      at::Tensor l = at::zeros({bm}, fopt);
      if (Nk == 0) acc.zero_();                                    // no keys: O = 0, lse = -inf
      for (int64_t j0 = 0; j0 < Nk; j0 += BN) {
        const int64_t bn = std::min(BN, Nk - j0);
        at::Tensor s = S.narrow(0, 0, bm).narrow(1, 0, bn);
        gemm(s, Qt, k[b].narrow(1, j0, bn), a.scale, 0.0, engine);  // E tile [bm, bn]
        at::Tensor m_new = at::maximum(m, at::amax(s, 1));
        // A row with only -inf so far subtracts 0: exp(-inf - 0) = 0, never -inf - -inf.
        at::Tensor m_use = m_new.masked_fill(m_new == -kInf, 0.0);
        s.sub_(m_use.unsqueeze(1));
        exp_flush_(s);                                             // P tile, unnormalised
        at::Tensor alpha = m - m_use;
        exp_clamped_(alpha);                                       // rescale of the old partials
        l.mul_(alpha).add_(s.sum(1));
        if (j0 > 0) acc.mul_(alpha.unsqueeze(0));
        at::Tensor p = s;
        if (lowp) {
          p = Pl.narrow(0, 0, bm).narrow(1, 0, bn);
          p.copy_(s);                                              // P rounded to bf16/fp16
        }
        gemm(acc, v[b].narrow(1, j0, bn), p.t(), 1.0, j0 > 0 ? 1.0 : 0.0, engine);  // += V P^T
        m = m_new;
      }
      if (Nk > 0) acc.div_(l.unsqueeze(0));                        // O block
      if (a.lse.defined()) a.lse[b].narrow(0, i0, bm).copy_(m + l.log());
      if (a.residual) {                                            // fused epilogue y = gamma*O + x
        at::Tensor yb = a.y[b].narrow(1, i0, bm);
        at::add_out(yb, x[b].narrow(1, i0, bm), acc, a.gamma);
      }
    }
  });
}

void pam_rowdots(const at::Tensor& dy, const at::Tensor& dy_op, const at::Tensor& o,
                 at::ScalarType ct, int64_t BM, at::Tensor& rowdot, at::Tensor& rowdot_op) {
  const int64_t B = dy.size(0), N = dy.size(2), nI = (N + BM - 1) / BM;
  const auto fopt = dy.options().dtype(ct);
  rowdot = at::empty({B, N}, fopt);
  rowdot_op = dy_op.defined() ? at::empty({B, N}, fopt) : rowdot;
  parallel_tasks(B * nI, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      const at::Tensor ob = as_type(o[b].narrow(1, i0, bm), ct);
      at::Tensor r = rowdot[b].narrow(0, i0, bm);
      at::sum_out(r, as_type(dy[b].narrow(1, i0, bm), ct) * ob, {0});
      if (dy_op.defined()) {
        at::Tensor r2 = rowdot_op[b].narrow(0, i0, bm);
        at::sum_out(r2, as_type(dy_op[b].narrow(1, i0, bm), ct) * ob, {0});
      }
    }
  });
}

// Recomputes P tile by tile from lse. Parallel over (batch, key-block group): a group owns dk/dv
// of its key blocks; dq is summed over groups from per-group partial buffers in a fixed order
// (deterministic, no atomics).
PamGrads pam_backward_tiles(const PamBackward& a, Engine engine) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v, &dy = a.dy, &lse = a.lse, &delta = a.delta;
  const int64_t B = q.size(0), Cq = q.size(1), N = q.size(2), Nk = k.size(2), Cv = v.size(1);
  const int64_t BM = a.BM, BN = a.BN, nJ = (Nk + BN - 1) / BN;
  const auto ct = compute_type(q.scalar_type());
  const bool lowp = ct != q.scalar_type();
  const auto fopt = q.options().dtype(ct);
  const double g = a.g;

  const int64_t T = at::get_num_threads();
  const int64_t G = B >= T || nJ == 0 ? 1 : std::min(nJ, (T + B - 1) / B);  // groups per batch
  at::Tensor dq = at::zeros({B, Cq, N}, fopt);
  at::Tensor dq_part = G == 1 ? dq.unsqueeze(1) : at::zeros({B, G, Cq, N}, fopt);
  at::Tensor dk = at::zeros({B, Cq, Nk}, fopt);
  at::Tensor dv = at::zeros({B, Cv, Nk}, fopt);

  parallel_tasks(B * G, [&](int64_t begin, int64_t end) {
    at::Tensor P = at::empty({BM, BN}, fopt);
    at::Tensor dE = at::empty({BM, BN}, fopt);
    at::Tensor Pl = lowp ? at::empty({BM, BN}, q.options()) : P;
    at::Tensor dEl = lowp ? at::empty({BM, BN}, q.options()) : dE;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / G, grp = t % G;
      const int64_t jb_begin = grp * nJ / G, jb_end = (grp + 1) * nJ / G;
      at::Tensor dqp = dq_part[b][grp];                            // [Cq, N]
      for (int64_t jb = jb_begin; jb < jb_end; ++jb) {
        const int64_t j0 = jb * BN, bn = std::min(BN, Nk - j0);
        const at::Tensor Kj = k[b].narrow(1, j0, bn), Vj = v[b].narrow(1, j0, bn);
        at::Tensor dKj = dk[b].narrow(1, j0, bn), dVj = dv[b].narrow(1, j0, bn);
        for (int64_t i0 = 0; i0 < N; i0 += BM) {
          const int64_t bm = std::min(BM, N - i0);
          const at::Tensor Qi = q[b].narrow(1, i0, bm);            // [Cq, bm]
          const at::Tensor dYi = dy[b].narrow(1, i0, bm);          // [Cv, bm]
          at::Tensor p = P.narrow(0, 0, bm).narrow(1, 0, bn);
          at::Tensor de = dE.narrow(0, 0, bm).narrow(1, 0, bn);
          gemm(p, Qi.t(), Kj, a.scale, 0.0, engine);               // E tile
          p.sub_(lse[b].narrow(0, i0, bm).unsqueeze(1));
          exp_clamped_(p);                                         // P = exp(E - lse)
          at::Tensor pl = p, del = de;
          if (lowp) {
            pl = Pl.narrow(0, 0, bm).narrow(1, 0, bn);
            pl.copy_(p);
            del = dEl.narrow(0, 0, bm).narrow(1, 0, bn);
          }
          gemm(dVj, dYi, pl, 1.0, 1.0, engine);                    // dv' += dy P
          gemm(de, dYi.t(), Vj, 1.0, 0.0, engine);                 // dA = dy^T v
          de.mul_(g).sub_(delta[b].narrow(0, i0, bm).unsqueeze(1)).mul_(p);  // dS
          if (lowp) del.copy_(de);
          gemm(dKj, Qi, del, 1.0, 1.0, engine);                    // dk' += q dS
          at::Tensor dqi = dqp.narrow(1, i0, bm);
          gemm(dqi, Kj, del.t(), 1.0, 1.0, engine);                // dq' += k dS^T
        }
      }
    }
  });
  if (G > 1) at::sum_out(dq, dq_part, {1});
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace danet_ops
