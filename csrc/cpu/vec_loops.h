// The element loops of the key-major kernels (pam_keymajor.cpp), compiled once per ISA
// (vec_loops.cpp: AVX-512 on x86, and the baseline) and chosen at run time by vec_loops(isa()),
// so that DANET_OPS_CPU_ISA caps them. Plain arithmetic on restrict
// pointers with `omp simd`, so that each build vectorises for its ISA; GCC also compiles them
// without trapping math (no FP exceptions are used; the results are the same), which it needs to
// if-convert the clamps and conversions and so vectorise them.
#pragma once

#include <cstdint>

#include "isa.h"

namespace danet_ops {
namespace cpu {

constexpr float kExpLo = -87.f;     // exp(-87) = 1.65e-38: normal fp32
constexpr float kFlush = 2.7e-38f;  // weights below e^-86.5 are set to 0 (as FTZ would)

// exp(x) for x in [-87, 88.7] (clamped below; NaN stays NaN): Cephes' expf polynomial, ~1 ulp;
// plain arithmetic so that the loops vectorise.
inline __attribute__((always_inline)) float exp_fast(float x) {
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

// bf16 bits of a non-NaN float, rounded to nearest even (the weights here are never NaN).
inline __attribute__((always_inline)) uint32_t bf16_bits(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

struct VecLoops {
  // cm[i] = max over rows of S[r][i] (r < rows, row stride ld), NaN-propagating; scale applied
  // to S in place first when it is not 1.
  void (*colmax)(float* S, int64_t rows, int64_t cols, int64_t ld, float scale, float* cm);
  // row[i] *= f[i] (div: row[i] /= f[i]) for every row of a [rows, cols] block with stride ld.
  void (*scale_cols)(float* A, int64_t rows, int64_t cols, int64_t ld, const float* f, bool div);
  // One row pair of P^T in bf16: p = exp(r - mu) (0 below kFlush, NaN -> 0), l[i] += p0 + p1,
  // out[i] = the VNNI word (bf16(p0), bf16(p1)).
  void (*exp_pack_pair_bf16)(const float* r0, const float* r1, const float* mu, float* l,
                             uint32_t* out, int64_t cols);
  // P^T row of the backward: s[i] = exp(scale * s[i] - lse[i]) in place, pl[i] = bf16(s[i]).
  void (*bwd_p_row)(float* s, const float* lse, float scale, uint16_t* pl, int64_t cols);
  // dS^T rows 0, 1: d = p * (g * de - delta), rounded to bf16 into the row-major rows l0, l1
  // and the VNNI pair word dsv.
  void (*bwd_ds_pair)(const float* p0, const float* p1, const float* de0, const float* de1,
                      const float* delta, float g, uint16_t* l0, uint16_t* l1, uint32_t* dsv,
                      int64_t cols);
};

// The loops built for `level` (the baseline where this architecture has no such build).
const VecLoops& vec_loops(Isa level);

}  // namespace cpu
}  // namespace danet_ops
