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
//    attention on GPU. Where oneDNN's brgemm takes the dtype (bf16 on AVX512/AMX) the forward
//    (and for bf16 the backward) run the fused key-major kernels below (pam_forward_lowp,
//    pam_backward_lowp_bf16); otherwise the generic tile loop with cpu::gemm_lowp.
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
#include <cstring>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../dtype_rules.h"  // y's dtype: the contract's output_dtype
#include "cpu_common.h"

namespace danet_ops {
namespace {

// Tile sizes: query block BM (one task of the forward) and key block BN, read per call from
// DANET_OPS_CPU_BLOCK_M / _N (cpu::env_block: integers in [16, 1024], else a RuntimeError).
// 256 keeps a task's working set ([Cv, BM] accumulator + [BM, BN] tile) in L2 for Cv = 512; the
// cap 1024 bounds a task's scratch (a 4 MB fp32 tile) independently of N.
constexpr int64_t kBlockDefault = 256, kBlockMin = 16, kBlockMax = 1024;
int64_t block_m() { return cpu::env_block("DANET_OPS_CPU_BLOCK_M", kBlockDefault, kBlockMin, kBlockMax); }
int64_t block_n() { return cpu::env_block("DANET_OPS_CPU_BLOCK_N", kBlockDefault, kBlockMin, kBlockMax); }
constexpr double kInf = std::numeric_limits<double>::infinity();

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

using cpu::BelowAutograd;  // the tile ops are ATen calls on views that may require grad

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

// ---- Low-precision forward on brgemm (bf16/fp16 operands, fp32 accumulation) ---------------
//
// Computed key-major, one [bn, bm] tile of E^T at a time: E^T = k_j^T q_i takes q_i packed once
// per task (VNNI) and a row-major k^T (transposed once per call: B*Nk*Cq elements, 1/8 of v at
// DANet's Cq = C/8; v is re-tiled once per call, see below: O(N*C) bf16 copies, never N x N); the softmax statistics are then per column (query), vectorised across
// queries, and P^T is written straight into the VNNI layout that O += V_j P^T reads (pairs of
// key rows interleaved: contiguous stores). One fused pass per tile computes the column max,
// one more exp + column sums + the rounded, packed P (instead of ~8 ATen passes).
// Lazy rescaling: a query's running max moves only when a tile's max exceeds it by more than
// kLazy (then P <= e^kLazy, harmless in fp32 sums and bf16/fp16 P), so the [Cv, bm] accumulator
// is rescaled rarely instead of after every key block. The result is the same softmax.

// The element loops below: compiled for AVX-512, AVX2 and baseline x86-64 (chosen at load time),
// and without trapping math (no FP exceptions are used; the results are unchanged), which GCC
// needs to if-convert the clamps and conversions in them and so vectorise them.
#define DANET_OPS_VEC_LOOP \
  __attribute__((target_clones("avx512f", "avx2", "default"), optimize("no-trapping-math")))

constexpr float kLazy = 8.f;
constexpr float kExpLo = -87.f;          // exp(-87) = 1.65e-38: normal fp32
constexpr float kFlush = 2.7e-38f;       // weights below e^-86.5 are set to 0 (as FTZ would)

// exp(x) for x in [-87, 88.7] (clamped below; NaN stays NaN): Cephes' expf polynomial, ~1 ulp;
// plain arithmetic so that the loops below vectorise.
static inline __attribute__((always_inline)) float exp_fast(float x) {
  x = x < kExpLo ? kExpLo : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const float r = (x - n * 0.693359375f) - n * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// cm[i] = max over rows of S[r][i] (r < rows, row stride ld), NaN-propagating; scale applied
// to S in place first when it is not 1.
DANET_OPS_VEC_LOOP
void colmax(float* S, int64_t rows, int64_t cols, int64_t ld, float scale, float* cm) {
  for (int64_t i = 0; i < cols; ++i) cm[i] = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = S + r * ld;
    if (scale != 1.f) {
#pragma omp simd
      for (int64_t i = 0; i < cols; ++i) row[i] *= scale;
    }
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) {
      const float y = row[i], c = cm[i];
      cm[i] = (y > c || y != y) ? y : c;
    }
  }
}

// P^T = exp(S - mu) (flushed below kFlush, NaN -> 0 as the threshold does), column sums added
// to l, and P^T rounded to T into the VNNI layout [ceil(rows/2)][cols][2].
// row[i] *= f[i] (div: row[i] /= f[i]) for every row of a [rows, cols] block with stride ld.
DANET_OPS_VEC_LOOP
void scale_cols(float* A, int64_t rows, int64_t cols, int64_t ld, const float* f, bool div) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = A + r * ld;
    if (div) {
#pragma omp simd
      for (int64_t i = 0; i < cols; ++i) row[i] /= f[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < cols; ++i) row[i] *= f[i];
    }
  }
}

// bf16 bits of a non-NaN float, rounded to nearest even (the weights here are never NaN).
static inline __attribute__((always_inline)) uint32_t bf16_bits(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// One row pair of exp_pack_cols in bf16: plain arithmetic on restrict pointers, so it
// vectorises (a pair of bf16 weights is one 32-bit word of the VNNI layout).
DANET_OPS_VEC_LOOP
void exp_pack_pair_bf16(const float* __restrict r0, const float* __restrict r1,
                        const float* __restrict mu, float* __restrict l,
                        uint32_t* __restrict out, int64_t cols) {
#pragma omp simd
  for (int64_t i = 0; i < cols; ++i) {
    float p0 = exp_fast(r0[i] - mu[i]), p1 = exp_fast(r1[i] - mu[i]);
    p0 = p0 > kFlush ? p0 : 0.f;  // also NaN -> 0, as the threshold does
    p1 = p1 > kFlush ? p1 : 0.f;
    l[i] += p0 + p1;
    out[i] = bf16_bits(p0) | (bf16_bits(p1) << 16);
  }
}

// P^T = exp(S - mu) (flushed below kFlush, NaN -> 0 as the threshold does), column sums added
// to l, and P^T rounded to T into the VNNI layout [ceil(rows/2)][cols][2] (an odd last row is
// paired with 0).
template <class T>
void exp_pack_cols(const float* S, int64_t rows, int64_t cols, int64_t ld, const float* mu,
                   float* l, T* dst, float* zero_row) {
  for (int64_t r = 0; r < rows; r += 2) {
    const float* r0 = S + r * ld;
    const bool pair = r + 1 < rows;
    // a missing partner row gives exp(-inf) = 0 (zero_row holds -inf)
    const float* r1 = pair ? r0 + ld : zero_row;
    T* out = dst + r * cols;  // pair r/2 starts at (r/2) * cols * 2
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      exp_pack_pair_bf16(r0, r1, mu, l, reinterpret_cast<uint32_t*>(out), cols);
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

// Forward on brgemm. q, k, v in the operand dtype T (bf16 / fp16); o/y/lse allocated.
template <class T>
void pam_forward_lowp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_,
                      const at::Tensor& x, double gamma, double scale, bool residual, bool need_o,
                      bool need_lse, int64_t BM, int64_t BN, at::Tensor& o, at::Tensor& lse,
                      at::Tensor& y) {
  const int64_t B = q.size(0), Cq = q.size(1), N = q.size(2), Nk = k.size(2), Cv = v_.size(1);
  const auto fopt = q.options().dtype(at::kFloat);
  // k^T [B, Nk, Cq] and v with unit stride along N (a copy only when v has not), with the
  // standard strides brgemm's leading dimensions need.
  const at::Tensor kT = at::empty({B, Nk, Cq}, k.options()).copy_(k.transpose(1, 2));
  // v re-tiled once per call into contiguous [Cv, BN] key blocks: read in place, the rows of a
  // V_j tile lie N elements apart, which for power-of-two N (64x64, 128x128) maps all of them
  // onto the same cache sets and halves the product's rate.
  const int64_t nJ = (Nk + BN - 1) / BN;
  at::Tensor vt = at::empty({B, nJ, Cv, BN}, v_.options());
  cpu::parallel_tasks(B * nJ, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nJ, j0 = (t % nJ) * BN, bn = std::min(BN, Nk - j0);
      vt[b][t % nJ].narrow(1, 0, bn).copy_(v_[b].narrow(1, j0, bn));
    }
  });
  const int64_t nI = (N + BM - 1) / BM;
  const int64_t lda = BM + 16;  // the accumulator's row stride: not a multiple of 4 KiB
  const float sc = static_cast<float>(scale);
  cpu::parallel_dynamic(B * nI, [&](const auto& next) {
    at::Tensor S = at::empty({BN, BM}, fopt);                    // E^T tile
    at::Tensor Qv = at::empty({((Cq + 1) / 2) * BM * 2}, q.options());
    at::Tensor Pv = at::empty({((BN + 1) / 2) * BM * 2}, q.options());
    at::Tensor acc_buf = at::empty({Cv, lda}, fopt);             // O block, fp32
    std::vector<float> m(BM), l(BM), mu(BM), cm(BM), alpha(BM);
    std::vector<float> ninf(BM, -std::numeric_limits<float>::infinity());  // odd tail's partner
    float* Sp = S.mutable_data_ptr<float>();
    T* Qvp = reinterpret_cast<T*>(Qv.mutable_data_ptr());
    T* Pvp = reinterpret_cast<T*>(Pv.mutable_data_ptr());
    for (int64_t t; next(t);) {
      const int64_t b = t / nI, i0 = (t % nI) * BM, bm = std::min(BM, N - i0);
      const at::Tensor Qi = q[b].narrow(1, i0, bm);              // [Cq, bm]
      cpu::pack_vnni<T, T>(Qvp, reinterpret_cast<const T*>(Qi.const_data_ptr()), Cq, bm,
                           Qi.stride(0), Qi.stride(1));
      at::Tensor acc = acc_buf.narrow(1, 0, bm);                // [Cv, bm]
      const int64_t ldc = lda;
      float* accp = acc.mutable_data_ptr<float>();
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      if (Nk == 0) acc.zero_();
      const T* kTb = reinterpret_cast<const T*>(kT[b].const_data_ptr());
      for (int64_t j0 = 0; j0 < Nk; j0 += BN) {
        const int64_t bn = std::min(BN, Nk - j0);
        cpu::brgemm_call<T>(bn, bm, Cq, kTb + j0 * Cq, Cq, Qvp, bm, Sp, BM, false);  // E^T tile
        colmax(Sp, bn, bm, BM, sc, cm.data());
        bool rescale = false;
        for (int64_t i = 0; i < bm; ++i) {
          const float mo = m[i], c = cm[i];
          float mn = mo;
          if (c != c) mn = c;                                    // NaN row stays NaN
          else if (c > mo + kLazy || (mo == -std::numeric_limits<float>::infinity() && c > mo)) mn = c;
          // a row with only -inf so far subtracts 0 (never -inf - -inf)
          mu[i] = mn == -std::numeric_limits<float>::infinity() ? 0.f : mn;
          const float mo_use = mo == -std::numeric_limits<float>::infinity() ? 0.f : mo;
          alpha[i] = 1.f;
          if (mn != mo) {  // old partials are 0 while the max was -inf
            alpha[i] = mo == -std::numeric_limits<float>::infinity() ? 0.f : exp_fast(mo_use - mu[i]);
            rescale = true;
          }
          l[i] *= alpha[i];
          m[i] = mn;
        }
        exp_pack_cols<T>(Sp, bn, bm, BM, mu.data(), l.data(), Pvp, ninf.data());
        if (rescale && j0 > 0) scale_cols(accp, Cv, bm, ldc, alpha.data(), false);
        const T* Vj = reinterpret_cast<const T*>(vt[b][j0 / BN].const_data_ptr());
        cpu::brgemm_call<T>(Cv, bm, bn, Vj, BN, Pvp, bm, accp, ldc, j0 > 0);  // += V_j P^T
      }
      if (Nk > 0) scale_cols(accp, Cv, bm, ldc, l.data(), true);
      if (need_lse) {
        float* lp = lse[b].narrow(0, i0, bm).mutable_data_ptr<float>();
        for (int64_t i = 0; i < bm; ++i) {
          // m is a max over unscaled-by-lazy values: lse = m + log(l) with l summed against mu
          const float base = m[i] == -std::numeric_limits<float>::infinity() ? 0.f : m[i];
          lp[i] = base + std::log(l[i]);
        }
      }
      if (need_o) o[b].narrow(1, i0, bm).copy_(acc);
      if (residual) {
        at::Tensor yb = y[b].narrow(1, i0, bm);
        at::add_out(yb, x[b].narrow(1, i0, bm), acc, gamma);
      }
    }
  });
}

// ---- Low-precision backward on brgemm -----------------------------------------------------
// Key-major like the forward: per (key block j, query block i) the tiles are [bn, bm].
//   P^T  = exp(scale * k_j^T q_i - lse_i)            (A: k^T rows, B: q VNNI)
//   dv_j^T += P^T dy_i^T                               (A: P^T bf16 rows, B: dy_i^T VNNI)
//   dE^T = v_j^T dy_i,  dS^T = P^T o (g dE^T - Delta_i) (A: v_j^T rows, B: dy VNNI)
//   dk_j^T += dS^T q_i^T                               (A: dS^T bf16 rows, B: q_i^T VNNI)
//   dq_i  += k_j dS^T                                  (A: k rows in place, B: dS^T VNNI)
// Packed once per call: k^T, q and dy in VNNI (pairs of channels), q^T and dy^T per query block
// in VNNI (pairs of positions): bf16 copies of the inputs, O(N * C), never O(N^2). dv and dk are
// accumulated transposed in fp32 and transposed once at the end; g and scale are applied there.

// P^T row: p = exp(scale * s - lse) in place (fp32, kept for dS) and rounded into pl.
DANET_OPS_VEC_LOOP
void bwd_p_row(float* __restrict s, const float* __restrict lse, float scale,
               uint16_t* __restrict pl, int64_t cols) {
#pragma omp simd
  for (int64_t i = 0; i < cols; ++i) {
    const float p = exp_fast(s[i] * scale - lse[i]);
    s[i] = p;
    pl[i] = static_cast<uint16_t>(bf16_bits(p));
  }
}

// dS^T rows r0, r1 (r1 may be a row of zeros): ds = p * (g * de - delta), rounded into the row-
// major dsl rows and the VNNI pair word dsv.
DANET_OPS_VEC_LOOP
void bwd_ds_pair(const float* __restrict p0, const float* __restrict p1,
                 const float* __restrict de0, const float* __restrict de1,
                 const float* __restrict delta, float g, uint16_t* __restrict l0,
                 uint16_t* __restrict l1, uint32_t* __restrict dsv, int64_t cols) {
#pragma omp simd
  for (int64_t i = 0; i < cols; ++i) {
    const float d0 = p0[i] * (g * de0[i] - delta[i]);
    const float d1 = p1[i] * (g * de1[i] - delta[i]);
    const uint32_t b0 = bf16_bits(d0), b1 = bf16_bits(d1);
    l0[i] = static_cast<uint16_t>(b0);
    l1[i] = static_cast<uint16_t>(b1);
    dsv[i] = b0 | (b1 << 16);
  }
}

// bf16 only (fp16 brgemm backward falls back to the generic tile path).
void pam_backward_lowp_bf16(const at::Tensor& q, const at::Tensor& k_, const at::Tensor& v,
                            const at::Tensor& dy, const at::Tensor& lse, const at::Tensor& delta,
                            double g, double scale, int64_t BM, int64_t BN, int64_t G,
                            at::Tensor& dq_part, at::Tensor& dkT, at::Tensor& dvT) {
  using T = at::BFloat16;
  const int64_t B = q.size(0), Cq = q.size(1), N = q.size(2), Nk = k_.size(2), Cv = v.size(1);
  const int64_t nI = (N + BM - 1) / BM, nJ = (Nk + BN - 1) / BN;
  const int64_t Cq2 = (Cq + 1) / 2, Cv2 = (Cv + 1) / 2, BM2 = (BM + 1) / 2;
  const auto lopt = q.options();
  const at::Tensor kT = at::empty({B, Nk, Cq}, lopt).copy_(k_.transpose(1, 2));
  // Per query block (contiguous, so no power-of-two row strides): q_i and dy_i in VNNI over
  // channel pairs ([C/2][bm][2], ld bm), q_i^T and dy_i^T in VNNI over position pairs.
  at::Tensor qv = at::empty({B, nI, Cq2 * BM * 2}, lopt), dyv = at::empty({B, nI, Cv2 * BM * 2}, lopt);
  at::Tensor qTv = at::empty({B, nI, BM2 * Cq * 2}, lopt), dyTv = at::empty({B, nI, BM2 * Cv * 2}, lopt);
  auto P = [](const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
  cpu::parallel_tasks(B * nI, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nI, ib = t % nI, i0 = ib * BM, bm = std::min(BM, N - i0);
      const at::Tensor Qi = q[b].narrow(1, i0, bm), Di = dy[b].narrow(1, i0, bm);
      const T* qs = reinterpret_cast<const T*>(Qi.const_data_ptr());
      const T* ds = reinterpret_cast<const T*>(Di.const_data_ptr());
      cpu::pack_vnni<T, T>(P(qv[b][ib]), qs, Cq, bm, Qi.stride(0), Qi.stride(1));
      cpu::pack_vnni<T, T>(P(dyv[b][ib]), ds, Cv, bm, Di.stride(0), Di.stride(1));
      cpu::pack_vnni<T, T>(P(qTv[b][ib]), qs, bm, Cq, Qi.stride(1), Qi.stride(0));
      cpu::pack_vnni<T, T>(P(dyTv[b][ib]), ds, bm, Cv, Di.stride(1), Di.stride(0));
    }
  });
  const float sc = static_cast<float>(scale), gf = static_cast<float>(g);
  cpu::parallel_dynamic(B * G, [&](const auto& next) {
    at::Tensor S = at::empty({BN, BM}, lopt.dtype(at::kFloat));   // P^T (fp32)
    at::Tensor dE = at::empty({BN, BM}, lopt.dtype(at::kFloat));  // dE^T
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
        Kjc.narrow(1, 0, bn).copy_(k_[b].narrow(1, j0, bn));    // [Cq, bn], ld BN
        const T* Kj = P(Kjc);
        const int64_t ldk = BN;
        float* dvTj = dvT[b].narrow(0, j0, bn).mutable_data_ptr<float>();
        float* dkTj = dkT[b].narrow(0, j0, bn).mutable_data_ptr<float>();
        for (int64_t ib = 0; ib < nI; ++ib) {
          const int64_t i0 = ib * BM, bm = std::min(BM, N - i0);
          cpu::brgemm_call<T>(bn, bm, Cq, kTj, Cq, P(qv[b][ib]), bm, Sp, BM, false);      // E^T
          for (int64_t r = 0; r < bn; ++r)
            bwd_p_row(Sp + r * BM, lseb + i0, sc, Plp + r * bm, bm);            // Pl: [bn, bm]
          cpu::brgemm_call<T>(bn, Cv, bm, reinterpret_cast<const T*>(Plp), bm, P(dyTv[b][ib]), Cv,
                        dvTj, Cv, true);                                       // dv^T += P^T dy^T
          cpu::brgemm_call<T>(bn, bm, Cv, P(VjT), Cv, P(dyv[b][ib]), bm, dEp, BM, false);  // dE^T
          for (int64_t r = 0; r < bn; r += 2) {
            const bool pair = r + 1 < bn;
            bwd_ds_pair(Sp + r * BM, pair ? Sp + (r + 1) * BM : zeros.data(), dEp + r * BM,
                        pair ? dEp + (r + 1) * BM : zeros.data(), deltab + i0, gf,
                        dSlp + r * bm, pair ? dSlp + (r + 1) * bm : scratch.data(),
                        dSvp + (r / 2) * bm, bm);
          }
          cpu::brgemm_call<T>(bn, Cq, bm, reinterpret_cast<const T*>(dSlp), bm, P(qTv[b][ib]), Cq,
                        dkTj, Cq, true);                                       // dk^T += dS^T q^T
          cpu::brgemm_call<T>(Cq, bm, bn, Kj, ldk, reinterpret_cast<const T*>(dSvp), bm, dqp + i0, N,
                        true);                                                 // dq += k dS^T
        }
      }
    }
  });
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
    y = at::empty({B, Cv, N}, v.options().dtype(contract::output_dtype(
                                  v_.scalar_type(), x_->scalar_type(), gamma_->scalar_type())));
  }

  const int64_t BM = block_m(), BN = block_n(), nI = (N + BM - 1) / BM;
  if (ot != ct && cpu::brgemm_available(ot)) {
    if (ot == at::kBFloat16)
      pam_forward_lowp<at::BFloat16>(q, k, v, x, gamma, scale, residual, need_o, need_lse, BM, BN,
                                     o, lse, y);
    else
      pam_forward_lowp<at::Half>(q, k, v, x, gamma, scale, residual, need_o, need_lse, BM, BN, o,
                                 lse, y);
    return;
  }
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
  const int64_t BM = block_m(), BN = block_n(), nI = (N + BM - 1) / BM, nJ = (Nk + BN - 1) / BN;
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
  if (ot == at::kBFloat16 && ct == at::kFloat && cpu::brgemm_available<at::BFloat16>()) {
    // Key-block groups handed out dynamically: up to 4 per thread (each its own dq partial,
    // summed in a fixed order: deterministic whichever worker ran it).
    const int64_t Gl = nJ == 0 ? 1 : std::min(nJ, std::max<int64_t>(1, (4 * T + B - 1) / B));
    if (Gl != G) dq_part = Gl == 1 ? dq.unsqueeze(1) : at::zeros({B, Gl, Cq, N}, fopt);
    at::Tensor dkT = at::zeros({B, Nk, Cq}, fopt), dvT = at::zeros({B, Nk, Cv}, fopt);
    pam_backward_lowp_bf16(q, k, v, dy, lse_c.contiguous(), delta.contiguous(), g, scale, BM, BN,
                           Gl, dq_part, dkT, dvT);
    if (Gl > 1) at::sum_out(dq, dq_part, {1});
    at::Tensor dgamma = gamma_.has_value() ? rowdot.sum().reshape({1}) : at::empty({0}, fopt);
    if (scale != 1.0) dq.mul_(scale);
    at::Tensor dk = dkT.transpose(1, 2).mul(scale).to(k_.scalar_type());
    at::Tensor dv = dvT.transpose(1, 2).mul(g).to(v_.scalar_type());
    return {dq.to(q_.scalar_type()), dk.contiguous(), dv.contiguous(), dgamma};
  }
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
