// Position attention (PAM) forward and backward, torch-free CUDA (sm_80+).
//
//   E[i, j] = scale * sum_c q[c, i] k[c, j]    (DANet: scale = 1, no 1/sqrt(d) scaling)
//   A[i, :] = softmax_j E[i, :]                O[c, i] = sum_j v[c, j] A[i, j]
//   y       = gamma * O + x
// Queries i < Nq, keys/values j < Nk (their own number of positions). Each kernel sees "rows"
// (its blocks) and "columns" (its loop), with their own counts Nr / Nc. The logits are scaled
// by sl2 = scale*log2(e) (exactly kLog2e for scale = 1) and dq / dk by scale once at the store.
// Forward (FlashAttention-2 style): one block = 64 query rows x CVT value channels; it streams
// the keys in blocks of 64 and keeps an online softmax in the log2 domain (E*log2(e), exp2),
// so nothing of size N x N exists. Large Cv is split over gridDim.y; each split recomputes the
// cheap q.k^T (Cq <= contract::kCqMax, small beside Cv) instead of holding a Cv-wide accumulator.
// Backward (no atomics, deterministic):
//   dot_rows  : Delta_i = gamma * sum_c dy[c, i] O[c, i]; per-block partials of sum dy*O -> dgamma
//               (O as the forward stored it: fp32 from the binding, also for fp16/bf16 inputs.
//               An O rounded to 16 bits gives Delta an error that does not cancel against dP,
//               and a sharp softmax (P ~ 1) passes it on whole to dS = P*(dP - Delta) and dk.)
//   dV kernel : block per (64 keys, CVT channels), loop over query blocks: dv = gamma * P^T dy
//   dK kernel : block per 64 keys,    loop over query blocks: dk = dS^T q
//   dQ kernel : block per 64 queries, loop over key blocks:   dq = dS k
//   with P = exp2(S*sl2 - lse*log2e) (S = q^T k), dP = gamma * dy^T v (all Cv, streamed),
//   dS = P*(dP - Delta); dq, dk = scale * (dS k, dS^T q).
//
// Pipeline: every kernel runs a flat sequence of "steps"; a step consumes one stage of two
// 64x64 smem tiles (sA, sB) filled by cp.async two steps earlier (run_pipeline: 3 stages, the
// loads of steps s+1 and s+2 in flight while step s computes). Per 64-wide column block:
//   S-steps  (ceil(Cq/64)) : S  += sA^T sB  over a 64-channel chunk of q/k
//   dP-steps (ceil(Cv/64)) : dP += sA^T sB  over a 64-channel chunk of dy/v     (dQ/dK only)
//   V-steps                : acc += X sB^T  over the 64 column positions (X = P or dS in registers)
// When Cq <= 64 the rows tile (q or k of the block's own rows) is loaded once and stays resident.
// Warps: 4 per block, warp w owns rows 16w..16w+15 of the block; see device_utils.cuh for the
// fragment layout and the fp16/bf16 mma, TF32 mma and SIMT fp32 engines.
#include "danet_cuda.cuh"
#include "device_utils.cuh"

namespace danet_cuda {
namespace {

using namespace dev;

// pam_pv_kernel: forward (DV = false) or dV (DV = true).
struct PvArgs {
  Operand r;             // rows operand  [B, Cq, Nr]: q (forward) | k (dV)
  Operand c;             // cols operand  [B, Cq, Nc]: k (forward) | q (dV)
  Operand val;           // value operand [B, Cv, Nc]: v (forward) | dy (dV)
  const float* lse;      // dV: [B, Nc] forward log-sum-exp, indexed by query (= column)
  const float* gamma;    // [1] or nullptr (dV: dv = gamma * P^T dy; forward: y = gamma*O + x)
  void* out;             // [B, Cv, Nr] contiguous: o (forward; fp32 if out_f32, else T) | dv (T)
  bool out_f32;          // forward: o in fp32 (the backward's Delta; see the top of this file)
  float* lse_out;        // forward: [B, Nr] natural-log lse of each query row
  View3 x;               // forward: [B, Cv, Nr] residual (data == nullptr: no y)
  void* y;               // forward: [B, Cv, Nr] contiguous, dtype y_dtype
  DType y_dtype;
  int64_t Cq, Cv, Nr, Nc;  // sizes: rows = queries (forward) | keys (dV)
  float sl2;             // scale * log2(e): logits in the log2 domain
};

// pam_dqk_kernel: dQ (DQ = true) or dK (DQ = false).
struct DqkArgs {
  Operand r;             // rows operand [B, Cq, Nr]: q (dQ) | k (dK)
  Operand c;             // cols operand [B, Cq, Nc]: k (dQ) | q (dK)
  Operand rv;            // [B, Cv, Nr], dP partner of the rows: dy (dQ) | v (dK)
  Operand cv;            // [B, Cv, Nc], dP partner of the cols: v (dQ) | dy (dK)
  const float* lse;      // [B, Nq] forward log-sum-exp (by query)
  const float* delta;    // [B, Nq] Delta = gamma * sum_c dy*O (by query)
  const float* gamma;    // [1] or nullptr
  void* out;             // [B, Cq, Nr] contiguous, dtype T: dq | dk
  int64_t Cq, Cv, Nr, Nc;  // sizes: rows = queries (dQ) | keys (dK)
  float sl2;             // scale * log2(e)
  float scale;           // applied once to the output (1: unchanged)
};

// Shared-memory plan (bytes) of both kernels: resident rows tile + kStages stages x 2 tiles,
// then statistics [2][2][64] fp32, then (fp32 engines) four per-warp [16][kStagePitch] staging
// tiles. The epilogue reuses the tile area as an fp32 [<=128][kStagePitch] staging tile.
constexpr int kPamTiles = 1 + 2 * kStages;
template <class T>
constexpr size_t pam_smem_bytes() {
  return kPamTiles * (size_t)Tile<T>::kBytes + 4 * kTile * sizeof(float) +
         (sizeof(T) == 4 ? 4 * 16 * kStagePitch * sizeof(float) : 0);
}
static_assert(128 * kStagePitch * 4 <= kPamTiles * Tile<__half>::kBytes, "epilogue staging fits");

// ----------------------------------------------------------------------------------------
// Forward / dV.  grid = (ceil(Nr/64), ceil(Cv/CVT), B), block = 128.
//   forward: rows = queries i, cols = keys j;   acc[i][c] = sum_j softmax(E)[i, j] v[c, j]
//   dV     : rows = keys j,   cols = queries i; acc[j][c] = sum_i P[i, j] dy[c, i]
template <class T, bool TF32, int CVT, bool DV>
__global__ void __launch_bounds__(kThreads, 1) pam_pv_kernel(const PvArgs a) {
  constexpr int TE = Tile<T>::kElems;
  constexpr int NH = CVT / kTile;  // 64-channel sub-tiles of the accumulator
  extern __shared__ __align__(16) unsigned char smem[];
  T* sR = reinterpret_cast<T*>(smem);                          // resident rows tile (Cq <= 64)
  T* sStage = sR + TE;                                         // [stage][A|B] tiles
  float* sStat = reinterpret_cast<float*>(sStage + 2 * kStages * TE);  // dV: [2][64] lse*log2e
  float* sWarp = sStat + 4 * kTile;                            // fp32 engines: P staging

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z;
  const int64_t row0 = (int64_t)blockIdx.x * kTile, cv0 = (int64_t)blockIdx.y * CVT;
  const int64_t Cq = a.Cq, Cv = a.Cv, Nr = a.Nr, Nc = a.Nc;
  const float sl2 = a.sl2;
  const T* R = static_cast<const T*>(a.r.p) + b * a.r.sb;
  const T* Cc = static_cast<const T*>(a.c.p) + b * a.c.sb;
  const T* V = static_cast<const T*>(a.val.p) + b * a.val.sb;

  const int nQ = (int)((Cq + kTile - 1) / kTile);  // S-steps per column block
  const bool resident = nQ == 1;
  const int64_t cv_left = Cv - cv0;
  const int nV = (int)(cv_left < CVT ? (cv_left + kTile - 1) / kTile : NH);  // V-steps
  const int spb = nQ + nV;
  const int total = (int)((Nc + kTile - 1) / kTile) * spb;

  auto issue = [&](int step) {
    const int cb = step / spb, u = step - cb * spb;
    const int64_t j0 = (int64_t)cb * kTile;
    T* sA = sStage + 2 * (step % kStages) * TE;
    T* sB = sA + TE;
    if (u < nQ) {
      if (!resident) load_tile(sA, R, a.r.sc, a.r.sn, (int64_t)u * kTile, Cq, row0, Nr, a.r.vec);
      load_tile(sB, Cc, a.c.sc, a.c.sn, (int64_t)u * kTile, Cq, j0, Nc, a.c.vec);
      if constexpr (DV) {
        if (u == 0 && tid < kTile) {  // plain stores: visible after the consumer's barrier
          const int64_t j = j0 + tid;
          sStat[(cb & 1) * kTile + tid] = j < Nc ? a.lse[b * Nc + j] * kLog2e : INFINITY;
        }
      }
    } else {
      load_tile(sB, V, a.val.sc, a.val.sn, cv0 + (int64_t)(u - nQ) * kTile, Cv, j0, Nc,
                a.val.vec);
    }
  };

  if (resident) load_tile(sR, R, a.r.sc, a.r.sn, 0, Cq, row0, Nr, a.r.vec);  // in group 0

  float s[8][4];       // S (then P) for this warp's 16 rows x the 64 columns of the block
  float acc[NH][8][4];  // output accumulator: 16 rows x CVT channels
  zero_acc(s);
#pragma unroll
  for (int h = 0; h < NH; ++h) zero_acc(acc[h]);
  // forward online softmax state per owned row (g and g+8), log2 domain; l is per-thread partial
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  RegA<T, TF32> pa(sWarp + warp * 16 * kStagePitch);

  auto compute = [&](int step) {
    const int cb = step / spb, u = step - cb * spb;
    const T* sA = sStage + 2 * (step % kStages) * TE;
    const T* sB = sA + TE;
    if (u < nQ) {
      // S[r][j] += sum_c R[c][r] * C[c][j] over this 64-channel chunk
      if (u == 0) zero_acc(s);
      const int64_t left = Cq - (int64_t)u * kTile;
      const int k16 = left >= kTile ? 4 : (int)((left + 15) / 16);
      warp_gemm<T, TF32, true, true>(s, (resident ? sR : sA) + warp * 16, sB, k16);
      if (u == nQ - 1) {
        const int64_t j0 = (int64_t)cb * kTile;
        if constexpr (!DV) {
          float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int64_t j = j0 + nt * 8 + 2 * t + (e & 1);
              const float v = j < Nc ? s[nt][e] * sl2 : -INFINITY;  // ragged keys masked
              s[nt][e] = v;
              if (e < 2) mx_lo = fmaxf(mx_lo, v); else mx_hi = fmaxf(mx_hi, v);
            }
          mx_lo = quad_max(mx_lo);
          mx_hi = quad_max(mx_hi);
          const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
          // A row that has seen only -inf so far keeps weight 0 (not exp2(-inf + inf) = NaN).
          const float base_lo = mn_lo == -INFINITY ? 0.f : mn_lo;
          const float base_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
          const float al_lo = exp2f(m_lo - base_lo), al_hi = exp2f(m_hi - base_hi);
          float rs_lo = 0.f, rs_hi = 0.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - base_lo);
            s[nt][1] = exp2f(s[nt][1] - base_lo);
            s[nt][2] = exp2f(s[nt][2] - base_hi);
            s[nt][3] = exp2f(s[nt][3] - base_hi);
            rs_lo += s[nt][0] + s[nt][1];
            rs_hi += s[nt][2] + s[nt][3];
          }
          l_lo = l_lo * al_lo + rs_lo;
          l_hi = l_hi * al_hi + rs_hi;
          m_lo = mn_lo;
          m_hi = mn_hi;
#pragma unroll
          for (int h = 0; h < NH; ++h)
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              acc[h][nt][0] *= al_lo;
              acc[h][nt][1] *= al_lo;
              acc[h][nt][2] *= al_hi;
              acc[h][nt][3] *= al_hi;
            }
        } else {
          // P[j][i] = exp2(S*sl2 - lse_i*log2e); columns past Nc carry lse = +inf -> 0
          const float* st = sStat + (cb & 1) * kTile;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              s[nt][e] = exp2f(s[nt][e] * sl2 - st[nt * 8 + 2 * t + (e & 1)]);
        }
        pa.set(s);
      }
    } else {
      // acc[r][c] += sum_j P[r][j] * Val[c][j] for the 64-channel sub-tile h
      const int h = u - nQ;
#pragma unroll
      for (int hh = 0; hh < NH; ++hh)
        if (hh == h) pa.gemm(acc[hh], sB);
    }
  };
  run_pipeline(total, issue, compute);

  // Epilogue: scale rows, stage transposed ([channel][position]) for coalesced stores.
  float sc_lo, sc_hi, gm = a.gamma != nullptr ? *a.gamma : 1.f;
  if constexpr (!DV) {
    l_lo = quad_sum(l_lo);
    l_hi = quad_sum(l_hi);
    sc_lo = 1.f / l_lo;
    sc_hi = 1.f / l_hi;
    if (blockIdx.y == 0 && t == 0) {
      const int64_t i_lo = row0 + warp * 16 + g, i_hi = i_lo + 8;
      if (i_lo < Nr) a.lse_out[b * Nr + i_lo] = (m_lo + log2f(l_lo)) * kLn2;
      if (i_hi < Nr) a.lse_out[b * Nr + i_hi] = (m_hi + log2f(l_hi)) * kLn2;
    }
  } else {
    sc_lo = sc_hi = gm;
  }
  float* st = reinterpret_cast<float*>(smem);  // [CVT][kStagePitch]
#pragma unroll
  for (int h = 0; h < NH; ++h) stage_acc<true>(st, kStagePitch, acc[h], warp * 16, h * kTile, sc_lo, sc_hi);
  __syncthreads();
  T* out = static_cast<T*>(a.out);
  const bool has_y = !DV && a.y != nullptr;
  for (int idx = tid; idx < CVT * kTile; idx += kThreads) {
    const int c = idx / kTile, i = idx % kTile;
    const int64_t gc = cv0 + c, gi = row0 + i;
    if (gc < Cv && gi < Nr) {
      const float val = st[c * kStagePitch + i];
      const int64_t off = (b * Cv + gc) * Nr + gi;
      float o_val = val;  // the O that y is made from: what is stored
      if (!DV && a.out_f32) {
        static_cast<float*>(a.out)[off] = val;
      } else {
        const T v = from_float<T>(val);
        out[off] = v;
        o_val = to_float(v);
      }
      if (has_y) store_any(a.y, off, a.y_dtype, gm * o_val + load_view(a.x, b, gc, gi));
    }
  }
}

// ----------------------------------------------------------------------------------------
// dQ / dK.  grid = (ceil(Nr/64), ceil(Cq/CQT), B), block = 128.
//   dQ: rows = queries i, cols = keys j:    out[c][i] = scale * sum_j dS[i, j] k[c, j]
//   dK: rows = keys j,    cols = queries i: out[c][j] = scale * sum_i dS[i, j] q[c, i]
// dS[i, j] = P[i, j] * (gamma * sum_c dy[c, i] v[c, j] - Delta_i), P from the saved lse.
// Only the CQT output channels of this block are accumulated; S and dP are recomputed per
// channel split (one split for Cq <= 64 or <= 128).
template <class T, bool TF32, int CQT, bool DQ>
__global__ void __launch_bounds__(kThreads, 1) pam_dqk_kernel(const DqkArgs a) {
  constexpr int TE = Tile<T>::kElems;
  constexpr int NO = CQT / kTile;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sR = reinterpret_cast<T*>(smem);
  T* sStage = sR + TE;
  float* sStat = reinterpret_cast<float*>(sStage + 2 * kStages * TE);  // dK: [2][lse2|delta][64]
  float* sWarp = sStat + 4 * kTile;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z;
  const int64_t row0 = (int64_t)blockIdx.x * kTile, co = (int64_t)blockIdx.y * CQT;
  const int64_t Cq = a.Cq, Cv = a.Cv, Nr = a.Nr, Nc = a.Nc;
  const float sl2 = a.sl2;
  const T* R = static_cast<const T*>(a.r.p) + b * a.r.sb;
  const T* Cc = static_cast<const T*>(a.c.p) + b * a.c.sb;
  const T* RV = static_cast<const T*>(a.rv.p) + b * a.rv.sb;
  const T* CV = static_cast<const T*>(a.cv.p) + b * a.cv.sb;
  const float gm = a.gamma != nullptr ? *a.gamma : 1.f;

  const int nQ = (int)((Cq + kTile - 1) / kTile);
  const bool resident = nQ == 1;
  const int nV = (int)((Cv + kTile - 1) / kTile);
  const int64_t cq_left = Cq - co;
  const int nO = (int)(cq_left < CQT ? (cq_left + kTile - 1) / kTile : NO);
  const int spb = nQ + nV + nO;
  const int total = (int)((Nc + kTile - 1) / kTile) * spb;

  // dQ: statistics of the block's own query rows (g and g+8 of this warp), in registers.
  float lr_lo = 0.f, lr_hi = 0.f, dr_lo = 0.f, dr_hi = 0.f;
  if constexpr (DQ) {
    const int64_t i_lo = row0 + warp * 16 + g, i_hi = i_lo + 8;
    lr_lo = i_lo < Nr ? a.lse[b * Nr + i_lo] * kLog2e : INFINITY;
    lr_hi = i_hi < Nr ? a.lse[b * Nr + i_hi] * kLog2e : INFINITY;
    dr_lo = i_lo < Nr ? a.delta[b * Nr + i_lo] : 0.f;
    dr_hi = i_hi < Nr ? a.delta[b * Nr + i_hi] : 0.f;
  }

  auto issue = [&](int step) {
    const int cb = step / spb, u = step - cb * spb;
    const int64_t j0 = (int64_t)cb * kTile;
    T* sA = sStage + 2 * (step % kStages) * TE;
    T* sB = sA + TE;
    if (u < nQ) {
      if (!resident) load_tile(sA, R, a.r.sc, a.r.sn, (int64_t)u * kTile, Cq, row0, Nr, a.r.vec);
      load_tile(sB, Cc, a.c.sc, a.c.sn, (int64_t)u * kTile, Cq, j0, Nc, a.c.vec);
      if constexpr (!DQ) {
        if (u == 0 && tid < kTile) {  // column (query) statistics for this column block
          const int64_t i = j0 + tid;
          float* st = sStat + (cb & 1) * 2 * kTile;
          st[tid] = i < Nc ? a.lse[b * Nc + i] * kLog2e : INFINITY;
          st[kTile + tid] = i < Nc ? a.delta[b * Nc + i] : 0.f;
        }
      }
    } else if (u < nQ + nV) {
      const int64_t c0 = (int64_t)(u - nQ) * kTile;
      load_tile(sA, RV, a.rv.sc, a.rv.sn, c0, Cv, row0, Nr, a.rv.vec);
      load_tile(sB, CV, a.cv.sc, a.cv.sn, c0, Cv, j0, Nc, a.cv.vec);
    } else {
      load_tile(sB, Cc, a.c.sc, a.c.sn, co + (int64_t)(u - nQ - nV) * kTile, Cq, j0, Nc, a.c.vec);
    }
  };

  if (resident) load_tile(sR, R, a.r.sc, a.r.sn, 0, Cq, row0, Nr, a.r.vec);  // in group 0

  float s[8][4];        // S, then P (fp32)
  float dp[8][4];       // dP, then dS
  float acc[NO][8][4];  // 16 rows x CQT output channels
  zero_acc(s);
  zero_acc(dp);
#pragma unroll
  for (int h = 0; h < NO; ++h) zero_acc(acc[h]);
  RegA<T, TF32> pa(sWarp + warp * 16 * kStagePitch);

  auto compute = [&](int step) {
    const int cb = step / spb, u = step - cb * spb;
    const int64_t j0 = (int64_t)cb * kTile;
    const T* sA = sStage + 2 * (step % kStages) * TE;
    const T* sB = sA + TE;
    const float* st = sStat + (cb & 1) * 2 * kTile;
    if (u < nQ) {
      if (u == 0) zero_acc(s);
      const int64_t left = Cq - (int64_t)u * kTile;
      const int k16 = left >= kTile ? 4 : (int)((left + 15) / 16);
      warp_gemm<T, TF32, true, true>(s, (resident ? sR : sA) + warp * 16, sB, k16);
      if (u == nQ - 1) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * t + (e & 1);
            const float l2 = DQ ? ((e >> 1) ? lr_hi : lr_lo) : st[col];
            s[nt][e] = j0 + col < Nc ? exp2f(s[nt][e] * sl2 - l2) : 0.f;
          }
      }
    } else if (u < nQ + nV) {
      // dP[r][j] += sum_c RV[c][r] * CV[c][j] over this 64-channel chunk of Cv
      const int v = u - nQ;
      if (v == 0) zero_acc(dp);
      const int64_t left = Cv - (int64_t)v * kTile;
      const int k16 = left >= kTile ? 4 : (int)((left + 15) / 16);
      warp_gemm<T, TF32, true, true>(dp, sA + warp * 16, sB, k16);
      if (v == nV - 1) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float dl = DQ ? ((e >> 1) ? dr_hi : dr_lo) : st[kTile + nt * 8 + 2 * t + (e & 1)];
            dp[nt][e] = s[nt][e] * (gm * dp[nt][e] - dl);  // dS
          }
        pa.set(dp);
      }
    } else {
      // acc[r][c] += sum_j dS[r][j] * C[c][j] for the 64-channel output sub-tile o
      const int o = u - nQ - nV;
#pragma unroll
      for (int oo = 0; oo < NO; ++oo)
        if (oo == o) pa.gemm(acc[oo], sB);
    }
  };
  run_pipeline(total, issue, compute);

  float* stg = reinterpret_cast<float*>(smem);  // [CQT][kStagePitch]
#pragma unroll
  for (int h = 0; h < NO; ++h)
    stage_acc<true>(stg, kStagePitch, acc[h], warp * 16, h * kTile, a.scale, a.scale);
  __syncthreads();
  T* out = static_cast<T*>(a.out);
  for (int idx = tid; idx < CQT * kTile; idx += kThreads) {
    const int c = idx / kTile, i = idx % kTile;
    const int64_t gc = co + c, gi = row0 + i;
    if (gc < Cq && gi < Nr) out[(b * Cq + gc) * Nr + gi] = from_float<T>(stg[c * kStagePitch + i]);
  }
}

// ----------------------------------------------------------------------------------------
// Launchers
constexpr int kCVT = 128;  // value channels per forward / dV block

// scale * log2(e) in fp32: exactly kLog2e for scale = 1 (the product is exact in double).
float scaled_log2e(double scale) { return (float)(scale * (double)kLog2e); }

template <class T, bool TF32>
cudaError_t pam_forward_impl(const PamForwardParams& p, cudaStream_t stream) {
  PvArgs a{};
  a.r = make_operand(p.q, p.B, p.Cq, p.Nq);
  a.c = make_operand(p.k, p.B, p.Cq, p.Nk);
  a.val = make_operand(p.v, p.B, p.Cv, p.Nk);
  a.lse = nullptr;
  const bool has_y = p.gamma != nullptr && p.x.data != nullptr && p.y != nullptr;
  a.gamma = has_y ? p.gamma : nullptr;
  a.out = p.o;
  a.out_f32 = p.o_dtype == DType::kFloat32;
  a.lse_out = p.lse;
  a.x = p.x;
  a.y = has_y ? p.y : nullptr;
  a.y_dtype = p.y_dtype;
  a.Cq = p.Cq;
  a.Cv = p.Cv;
  a.Nr = p.Nq;
  a.Nc = p.Nk;
  a.sl2 = scaled_log2e(p.scale);
  auto kernel = pam_pv_kernel<T, TF32, kCVT, false>;
  const size_t smem = pam_smem_bytes<T>();
  cudaError_t e = prepare_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid((unsigned)ceil_div(p.Nq, kTile), (unsigned)ceil_div(p.Cv, kCVT), (unsigned)p.B);
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class T, bool TF32, int CQT, bool DQ>
cudaError_t launch_dqk(const DqkArgs& a, int64_t B, cudaStream_t stream) {
  auto kernel = pam_dqk_kernel<T, TF32, CQT, DQ>;
  const size_t smem = pam_smem_bytes<T>();
  cudaError_t e = prepare_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid((unsigned)ceil_div(a.Nr, kTile), (unsigned)ceil_div(a.Cq, CQT), (unsigned)B);
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

struct PamWorkspace {
  float* delta;    // [B, Nq]
  float* partial;  // [B * ceil(Nq/32)] per-block sums of dy*O
  int64_t n_partial;
};
PamWorkspace pam_workspace(const PamBackwardParams& p, void* base) {
  PamWorkspace w{};
  w.n_partial = p.B * ceil_div(p.Nq, 32);
  char* c = static_cast<char*>(base);
  w.delta = reinterpret_cast<float*>(c);
  w.partial = reinterpret_cast<float*>(c + align256((size_t)(p.B * p.Nq) * sizeof(float)));
  return w;
}

template <class T, bool TF32>
cudaError_t pam_backward_impl(const PamBackwardParams& p, cudaStream_t stream) {
  const PamWorkspace w = pam_workspace(p, p.workspace);
  // 1. Delta = gamma * sum_c dy*O from the same dy values the dP products use (dy_mma), so that
  //    dP - Delta cancels consistently; block partials of sum dy*O -> dgamma from the exact dy.
  const dim3 rgrid((unsigned)ceil_div(p.Nq, 32), (unsigned)p.B), rblock(32, 8);
  const bool same_dy = p.dy.data == p.dy_mma.data && p.dy.dtype == p.dy_mma.dtype;
  dot_rows_kernel<<<rgrid, rblock, 0, stream>>>(p.dy_mma, p.o, p.Cv, p.Nq, p.gamma, w.delta,
                                                w.partial);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if (p.gamma != nullptr) {
    if (!same_dy) {
      dot_rows_kernel<<<rgrid, rblock, 0, stream>>>(p.dy, p.o, p.Cv, p.Nq, nullptr, nullptr,
                                                    w.partial);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
    finalize_sum_kernel<<<1, 256, 0, stream>>>(w.partial, w.n_partial, p.dgamma);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  const Operand q = make_operand(p.q, p.B, p.Cq, p.Nq), k = make_operand(p.k, p.B, p.Cq, p.Nk);
  const Operand v = make_operand(p.v, p.B, p.Cv, p.Nk);
  const Operand dy = make_operand(p.dy_mma, p.B, p.Cv, p.Nq);
  const float sl2 = scaled_log2e(p.scale);
  // 2. dv = gamma * P^T dy.
  {
    PvArgs a{};
    a.r = k;
    a.c = q;
    a.val = dy;
    a.lse = p.lse;
    a.gamma = p.gamma;
    a.out = p.dv;
    a.Cq = p.Cq;
    a.Cv = p.Cv;
    a.Nr = p.Nk;  // rows = keys, columns = queries
    a.Nc = p.Nq;
    a.sl2 = sl2;
    auto kernel = pam_pv_kernel<T, TF32, kCVT, true>;
    const size_t smem = pam_smem_bytes<T>();
    if ((e = prepare_smem(kernel, smem)) != cudaSuccess) return e;
    const dim3 grid((unsigned)ceil_div(p.Nk, kTile), (unsigned)ceil_div(p.Cv, kCVT), (unsigned)p.B);
    kernel<<<grid, kThreads, smem, stream>>>(a);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  // 3. dk = dS^T q (rows = keys), 4. dq = dS k (rows = queries).
  DqkArgs a{};
  a.lse = p.lse;
  a.delta = w.delta;
  a.gamma = p.gamma;
  a.Cq = p.Cq;
  a.Cv = p.Cv;
  a.sl2 = sl2;
  a.scale = (float)p.scale;
  for (int pass = 0; pass < 2; ++pass) {
    const bool dq = pass == 1;
    a.Nr = dq ? p.Nq : p.Nk;
    a.Nc = dq ? p.Nk : p.Nq;
    a.r = dq ? q : k;
    a.c = dq ? k : q;
    a.rv = dq ? dy : v;
    a.cv = dq ? v : dy;
    a.out = dq ? p.dq : p.dk;
    if (p.Cq <= 64)
      e = dq ? launch_dqk<T, TF32, 64, true>(a, p.B, stream)
             : launch_dqk<T, TF32, 64, false>(a, p.B, stream);
    else
      e = dq ? launch_dqk<T, TF32, 128, true>(a, p.B, stream)
             : launch_dqk<T, TF32, 128, false>(a, p.B, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// B is gridDim.z; Nq, Nk <= kPamMaxPositions keeps the flat step counter (column blocks x steps
// per block: S-, dP- and output steps of the dQ/dK kernel, the most of the three kernels) in an
// int for every Cq, Cv of the contract. Nk = 0 with Nq > 0 (softmax over no keys) is the caller's.
static_assert(kPamMaxPositions / kTile * ((contract::kCqMax + kTile - 1) / kTile +
                                          (contract::kCvMax + kTile - 1) / kTile + 128 / kTile) <=
                  INT32_MAX,
              "the contract's Cq/Cv limits overflow the kernels' int step counter");
bool pam_sizes_ok(int64_t B, int64_t Cq, int64_t Cv, int64_t Nq, int64_t Nk) {
  return B >= 0 && B <= kMaxBatch && Cq >= contract::kCqMin && Cq <= contract::kCqMax &&
         Cv >= contract::kCvMin && Cv <= contract::kCvMax && Nq >= 0 && Nq <= kPamMaxPositions &&
         Nk >= (Nq > 0 ? 1 : 0) && Nk <= kPamMaxPositions;
}

}  // namespace

size_t pam_backward_workspace_bytes(const PamBackwardParams& p) {
  return align256((size_t)(p.B * p.Nq) * sizeof(float)) +
         align256((size_t)(p.B * ceil_div(p.Nq, 32)) * sizeof(float));
}

cudaError_t pam_forward(const PamForwardParams& p, cudaStream_t stream) {
  if (!pam_sizes_ok(p.B, p.Cq, p.Cv, p.Nq, p.Nk)) return cudaErrorInvalidValue;
  if (p.q.dtype != p.dtype || p.k.dtype != p.dtype || p.v.dtype != p.dtype ||
      (p.o_dtype != p.dtype && p.o_dtype != DType::kFloat32))
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.Nq == 0) return cudaSuccess;
  if (cudaError_t e = require_sm80(); e != cudaSuccess) return e;
  switch (p.dtype) {
    case DType::kFloat16: return pam_forward_impl<__half, false>(p, stream);
    case DType::kBFloat16: return pam_forward_impl<__nv_bfloat16, false>(p, stream);
    default:
      return p.allow_tf32 ? pam_forward_impl<float, true>(p, stream)
                          : pam_forward_impl<float, false>(p, stream);
  }
}

cudaError_t pam_backward(const PamBackwardParams& p, cudaStream_t stream) {
  if (!pam_sizes_ok(p.B, p.Cq, p.Cv, p.Nq, p.Nk)) return cudaErrorInvalidValue;
  if (p.q.dtype != p.dtype || p.k.dtype != p.dtype || p.v.dtype != p.dtype ||
      p.dy_mma.dtype != p.dtype)
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.Nq == 0) {
    if (p.gamma != nullptr) return cudaMemsetAsync(p.dgamma, 0, sizeof(float), stream);
    return cudaSuccess;
  }
  if (cudaError_t e = require_sm80(); e != cudaSuccess) return e;
  switch (p.dtype) {
    case DType::kFloat16: return pam_backward_impl<__half, false>(p, stream);
    case DType::kBFloat16: return pam_backward_impl<__nv_bfloat16, false>(p, stream);
    default:
      return p.allow_tf32 ? pam_backward_impl<float, true>(p, stream)
                          : pam_backward_impl<float, false>(p, stream);
  }
}

}  // namespace danet_cuda
