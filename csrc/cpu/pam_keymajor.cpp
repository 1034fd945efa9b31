// PAM's key-major kernels on oneDNN's brgemm (paths bf16-brgemm / fp16-brgemm): bf16 / fp16
// operands, fp32 accumulation, E and the softmax statistics in fp32 (pam_kernels.h has the
// formulas). The element loops between the products come from vec_loops(isa()).
//
// Forward: computed key-major, one [bn, bm] tile of E^T at a time: E^T = k_j^T q_i takes q_i
// packed once per task (VNNI) and a row-major k^T (transposed once per call: B*Nk*Cq elements,
// 1/8 of v at DANet's Cq = C/8). The softmax statistics are then per column (query), vectorised
// across queries, and P^T is written straight into the VNNI layout that O += V_j P^T reads (pairs
// of key rows interleaved: contiguous stores). One fused pass per tile computes the column max,
// one more exp + column sums + the rounded, packed P (instead of ~8 ATen passes).
// Lazy rescaling: a query's running max moves only when a tile's max exceeds it by more than
// kLazy (then P <= e^kLazy, harmless in fp32 sums and bf16/fp16 P), so the [Cv, bm] accumulator
// is rescaled rarely instead of after every key block. The result is the same softmax.
// Copies per call: k^T and v re-tiled, O(N * C) in the operand dtype, never N x N.
//
// Backward (bf16): key-major like the forward, per (key block j, query block i) the tiles are
// [bn, bm]:
//   P^T  = exp(scale * k_j^T q_i - lse_i)            (A: k^T rows, B: q VNNI)
//   dv_j'^T += P^T dy_i^T                              (A: P^T bf16 rows, B: dy_i^T VNNI)
//   dA^T = v_j^T dy_i,  dS^T = P^T o (g dA^T - Delta_i) (A: v_j^T rows, B: dy VNNI)
//   dk_j'^T += dS^T q_i^T                              (A: dS^T bf16 rows, B: q_i^T VNNI)
//   dq_i'  += k_j dS^T                                 (A: k rows, B: dS^T VNNI)
// Packed once per call: k^T, q and dy in VNNI (pairs of channels), q^T and dy^T per query block
// in VNNI (pairs of positions): bf16 copies of the inputs, O(N * C), never O(N^2). dv' and dk'
// are accumulated transposed in fp32 and returned as transposed views.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "pam_kernels.h"
#include "vec_loops.h"

namespace danet_ops {
namespace cpu {
namespace {

constexpr float kLazy = 8.f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// P^T = exp(S - mu) (flushed below kFlush, NaN -> 0 as the threshold does), column sums added
// to l, and P^T rounded to T into the VNNI layout [ceil(rows/2)][cols][2] (an odd last row is
// paired with 0).
template <class T>
void exp_pack_cols(const VecLoops& L, const float* S, int64_t rows, int64_t cols, int64_t ld,
                   const float* mu, float* l, T* dst, const float* ninf_row) {
  for (int64_t r = 0; r < rows; r += 2) {
    const float* r0 = S + r * ld;
    const bool pair = r + 1 < rows;
    // a missing partner row gives exp(-inf) = 0 (ninf_row holds -inf)
    const float* r1 = pair ? r0 + ld : ninf_row;
    T* out = dst + r * cols;  // pair r/2 starts at (r/2) * cols * 2
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      L.exp_pack_pair_bf16(r0, r1, mu, l, reinterpret_cast<uint32_t*>(out), cols);
    } else {
      for (int64_t i = 0; i < cols; ++i) {
        float p0 = exp_fast(r0[i] - mu[i]), p1 = exp_fast(r1[i] - mu[i]);
        p0 = p0 > kFlush ? p0 : 0.f;
        p1 = p1 > kFlush ? p1 : 0.f;
        l[i] += p0 + p1;
        out[2 * i] = T(p0);
        out[2 * i + 1] = T(p1);
      }
    }
  }
}

}  // namespace

template <class T>
void pam_forward_keymajor(PamForward& a) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const int64_t B = q.size(0), Cq = q.size(1), N = q.size(2), Nk = k.size(2), Cv = v.size(1);
  const int64_t BM = a.BM, BN = a.BN;
  const auto fopt = q.options().dtype(at::kFloat);
  const VecLoops& L = vec_loops(isa());
  // k^T [B, Nk, Cq]: the row-major A operand of E^T = k_j^T q_i.
  const at::Tensor kT = at::empty({B, Nk, Cq}, k.options()).copy_(k.transpose(1, 2));
  // v re-tiled once per call into contiguous [Cv, BN] key blocks: read in place, the rows of a
  // V_j tile lie N elements apart, which for power-of-two N (64x64, 128x128) maps all of them
  // onto the same cache sets and halves the product's rate.
  const int64_t nJ = (Nk + BN - 1) / BN;
  at::Tensor vt = at::empty({B, nJ, Cv, BN}, v.options());
  parallel_tasks(B * nJ, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nJ, j0 = (t % nJ) * BN, bn = std::min(BN, Nk - j0);
      vt[b][t % nJ].narrow(1, 0, bn).copy_(v[b].narrow(1, j0, bn));
    }
  });
  const int64_t nI = (N + BM - 1) / BM;
  const int64_t ldc = BM + 16;  // the accumulator's row stride: not a multiple of 4 KiB
  const float sc = static_cast<float>(a.scale);
  parallel_dynamic(B * nI, [&](const auto& next) {
    at::Tensor S = at::empty({BN, BM}, fopt);                    // E^T tile
    at::Tensor Qv = at::empty({((Cq + 1) / 2) * BM * 2}, q.options());
    at::Tensor Pv = at::empty({((BN + 1) / 2) * BM * 2}, q.options());
    at::Tensor acc_buf = at::empty({Cv, ldc}, fopt);             // O block, fp32
    std::vector<float> m(BM), l(BM), mu(BM), cm(BM), alpha(BM);
    std::vector<float> ninf(BM, kNegInf);                        // odd tail's partner row
    float* Sp = S.mutable_data_ptr<float>();
    T* Qvp = reinterpret_cast<T*>(Qv.mutable_data_ptr());
    T* Pvp = reinterpret_cast<T*>(Pv.mutable_data_ptr());
    for (int64_t t; next(t);) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      const at::Tensor Qi = q[b].narrow(1, i0, bm);              // [Cq, bm]
      pack_vnni<T, T>(Qvp, reinterpret_cast<const T*>(Qi.const_data_ptr()), Cq, bm, Qi.stride(0),
                      Qi.stride(1));
      at::Tensor acc = acc_buf.narrow(1, 0, bm);                // [Cv, bm]
      float* accp = acc.mutable_data_ptr<float>();
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      if (Nk == 0) acc.zero_();
      const T* kTb = reinterpret_cast<const T*>(kT[b].const_data_ptr());
      for (int64_t j0 = 0; j0 < Nk; j0 += BN) {
        const int64_t bn = std::min(BN, Nk - j0);
        brgemm_call<T>(bn, bm, Cq, kTb + j0 * Cq, Cq, Qvp, bm, Sp, BM, false);  // E^T tile
        L.colmax(Sp, bn, bm, BM, sc, cm.data());
        bool rescale = false;
        for (int64_t i = 0; i < bm; ++i) {
          const float mo = m[i], c = cm[i];
          float mn = mo;
          if (c != c) mn = c;                                    // NaN row stays NaN
          else if (c > mo + kLazy || (mo == kNegInf && c > mo)) mn = c;
          // a row with only -inf so far subtracts 0 (never -inf - -inf)
          mu[i] = mn == kNegInf ? 0.f : mn;
          const float mo_use = mo == kNegInf ? 0.f : mo;
          alpha[i] = 1.f;
          if (mn != mo) {  // old partials are 0 while the max was -inf
            alpha[i] = mo == kNegInf ? 0.f : exp_fast(mo_use - mu[i]);
            rescale = true;
          }
          l[i] *= alpha[i];
          m[i] = mn;
        }
        exp_pack_cols<T>(L, Sp, bn, bm, BM, mu.data(), l.data(), Pvp, ninf.data());
        if (rescale && j0 > 0) L.scale_cols(accp, Cv, bm, ldc, alpha.data(), false);
        const T* Vj = reinterpret_cast<const T*>(vt[b][j0 / BN].const_data_ptr());
        brgemm_call<T>(Cv, bm, bn, Vj, BN, Pvp, bm, accp, ldc, j0 > 0);  // += V_j P^T
      }
      if (Nk > 0) L.scale_cols(accp, Cv, bm, ldc, l.data(), true);
      if (a.lse.defined()) {
        float* lp = a.lse[b].narrow(0, i0, bm).mutable_data_ptr<float>();
        for (int64_t i = 0; i < bm; ++i) {
          // m is a max over unscaled-by-lazy values: lse = m + log(l) with l summed against mu
          const float base = m[i] == kNegInf ? 0.f : m[i];
          lp[i] = base + std::log(l[i]);
        }
      }
      if (a.o.defined()) a.o[b].narrow(1, i0, bm).copy_(acc);
      if (a.residual) {
        at::Tensor yb = a.y[b].narrow(1, i0, bm);
        at::add_out(yb, a.x[b].narrow(1, i0, bm), acc, a.gamma);
      }
    }
  });
}

template void pam_forward_keymajor<at::BFloat16>(PamForward& a);
template void pam_forward_keymajor<at::Half>(PamForward& a);

// Parallel over (batch, key-block group), the groups handed out dynamically: up to 4 per
// thread, each with its own dq' partial, summed in a fixed order (deterministic whichever
// worker ran it).
PamGrads pam_backward_keymajor_bf16(const PamBackward& a) {
  using T = at::BFloat16;
  const at::Tensor &q = a.q, &k = a.k, &v = a.v, &dy = a.dy;
  const at::Tensor lse = a.lse.contiguous(), delta = a.delta.contiguous();
  const int64_t B = q.size(0), Cq = q.size(1), N = q.size(2), Nk = k.size(2), Cv = v.size(1);
  const int64_t BM = a.BM, BN = a.BN;
  const int64_t nI = (N + BM - 1) / BM, nJ = (Nk + BN - 1) / BN;
  const int64_t Cq2 = (Cq + 1) / 2, Cv2 = (Cv + 1) / 2, BM2 = (BM + 1) / 2;
  const auto lopt = q.options();
  const auto fopt = lopt.dtype(at::kFloat);
  const VecLoops& L = vec_loops(isa());

  const int64_t Th = at::get_num_threads();
  const int64_t G = nJ == 0 ? 1 : std::min(nJ, std::max<int64_t>(1, (4 * Th + B - 1) / B));
  at::Tensor dq = at::zeros({B, Cq, N}, fopt);
  at::Tensor dq_part = G == 1 ? dq.unsqueeze(1) : at::zeros({B, G, Cq, N}, fopt);
  at::Tensor dkT = at::zeros({B, Nk, Cq}, fopt), dvT = at::zeros({B, Nk, Cv}, fopt);

  const at::Tensor kT = at::empty({B, Nk, Cq}, lopt).copy_(k.transpose(1, 2));
  // Per query block (contiguous, so no power-of-two row strides): q_i and dy_i in VNNI over
  // channel pairs ([C/2][bm][2], ld bm), q_i^T and dy_i^T in VNNI over position pairs.
  at::Tensor qv = at::empty({B, nI, Cq2 * BM * 2}, lopt), dyv = at::empty({B, nI, Cv2 * BM * 2}, lopt);
  at::Tensor qTv = at::empty({B, nI, BM2 * Cq * 2}, lopt), dyTv = at::empty({B, nI, BM2 * Cv * 2}, lopt);
  auto P = [](const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
  parallel_tasks(B * nI, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, ib = t % nI, i0 = ib * BM, bm = std::min(BM, N - i0);
      const at::Tensor Qi = q[b].narrow(1, i0, bm), Di = dy[b].narrow(1, i0, bm);
      const T* qs = reinterpret_cast<const T*>(Qi.const_data_ptr());
      const T* ds = reinterpret_cast<const T*>(Di.const_data_ptr());
      pack_vnni<T, T>(P(qv[b][ib]), qs, Cq, bm, Qi.stride(0), Qi.stride(1));
      pack_vnni<T, T>(P(dyv[b][ib]), ds, Cv, bm, Di.stride(0), Di.stride(1));
      pack_vnni<T, T>(P(qTv[b][ib]), qs, bm, Cq, Qi.stride(1), Qi.stride(0));
      pack_vnni<T, T>(P(dyTv[b][ib]), ds, bm, Cv, Di.stride(1), Di.stride(0));
    }
  });
  const float sc = static_cast<float>(a.scale), gf = static_cast<float>(a.g);
  parallel_dynamic(B * G, [&](const auto& next) {
    at::Tensor S = at::empty({BN, BM}, fopt);                     // P^T (fp32)
    at::Tensor dE = at::empty({BN, BM}, fopt);                    // dA^T
    at::Tensor Pl = at::empty({BN, BM}, lopt), dSl = at::empty({BN, BM}, lopt);
    at::Tensor dSv = at::empty({((BN + 1) / 2) * BM * 2}, lopt);
    at::Tensor VjT = at::empty({BN, Cv}, lopt), Kjc = at::empty({Cq, BN}, lopt);
    std::vector<float> zeros(BM, 0.f);
    float* Sp = S.mutable_data_ptr<float>();
    float* dEp = dE.mutable_data_ptr<float>();
    auto* Plp = reinterpret_cast<uint16_t*>(Pl.mutable_data_ptr());
    auto* dSlp = reinterpret_cast<uint16_t*>(dSl.mutable_data_ptr());
    auto* dSvp = reinterpret_cast<uint32_t*>(dSv.mutable_data_ptr());
    std::vector<uint16_t> scratch(BM);
    for (int64_t t; next(t);) {
      const int64_t b = t / G, grp = t % G;
      const int64_t jb_begin = grp * nJ / G, jb_end = (grp + 1) * nJ / G;
      float* dqp = dq_part[b][grp].mutable_data_ptr<float>();      // [Cq, N]
      const float* lseb = lse[b].const_data_ptr<float>();
      const float* deltab = delta[b].const_data_ptr<float>();
      for (int64_t jb = jb_begin; jb < jb_end; ++jb) {
        const int64_t j0 = jb * BN, bn = std::min(BN, Nk - j0);
        VjT.narrow(0, 0, bn).copy_(v[b].narrow(1, j0, bn).t());
        const T* kTj = P(kT[b]) + j0 * Cq;
        Kjc.narrow(1, 0, bn).copy_(k[b].narrow(1, j0, bn));     // [Cq, bn], ld BN
        const T* Kj = P(Kjc);
        float* dvTj = dvT[b].narrow(0, j0, bn).mutable_data_ptr<float>();
        float* dkTj = dkT[b].narrow(0, j0, bn).mutable_data_ptr<float>();
        for (int64_t ib = 0; ib < nI; ++ib) {
          const int64_t i0 = ib * BM, bm = std::min(BM, N - i0);
          brgemm_call<T>(bn, bm, Cq, kTj, Cq, P(qv[b][ib]), bm, Sp, BM, false);      // E^T
          for (int64_t r = 0; r < bn; ++r)
            L.bwd_p_row(Sp + r * BM, lseb + i0, sc, Plp + r * bm, bm);          // P^T [bn, bm]
          brgemm_call<T>(bn, Cv, bm, reinterpret_cast<const T*>(Plp), bm, P(dyTv[b][ib]), Cv,
                         dvTj, Cv, true);                                      // dv'^T += P^T dy^T
          brgemm_call<T>(bn, bm, Cv, P(VjT), Cv, P(dyv[b][ib]), bm, dEp, BM, false);  // dA^T
          for (int64_t r = 0; r < bn; r += 2) {
            const bool pair = r + 1 < bn;
            L.bwd_ds_pair(Sp + r * BM, pair ? Sp + (r + 1) * BM : zeros.data(), dEp + r * BM,
                          pair ? dEp + (r + 1) * BM : zeros.data(), deltab + i0, gf,
                          dSlp + r * bm, pair ? dSlp + (r + 1) * bm : scratch.data(),
                          dSvp + (r / 2) * bm, bm);
          }
          brgemm_call<T>(bn, Cq, bm, reinterpret_cast<const T*>(dSlp), bm, P(qTv[b][ib]), Cq,
                         dkTj, Cq, true);                                      // dk'^T += dS^T q^T
          brgemm_call<T>(Cq, bm, bn, Kj, BN, reinterpret_cast<const T*>(dSvp), bm, dqp + i0, N,
                         true);                                                // dq' += k dS^T
        }
      }
    }
  });
  if (G > 1) at::sum_out(dq, dq_part, {1});
  return {dq, dkT.transpose(1, 2), dvT.transpose(1, 2)};
}

}  // namespace cpu
}  // namespace danet_ops
