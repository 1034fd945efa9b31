// The bodies of the VecLoops (vec_loops.h), included by vec_loops.cpp once per ISA, with
// DANET_OPS_VEC_NS (the namespace of this build) and DANET_OPS_VEC_ATTR (its target attribute)
// defined. No include guard: included several times on purpose.

namespace DANET_OPS_VEC_NS {

DANET_OPS_VEC_ATTR
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

DANET_OPS_VEC_ATTR
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

DANET_OPS_VEC_ATTR
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

DANET_OPS_VEC_ATTR
void bwd_p_row(float* __restrict s, const float* __restrict lse, float scale,
               uint16_t* __restrict pl, int64_t cols) {
#pragma omp simd
  for (int64_t i = 0; i < cols; ++i) {
    const float p = exp_fast(s[i] * scale - lse[i]);
    s[i] = p;
    pl[i] = static_cast<uint16_t>(bf16_bits(p));
  }
}

DANET_OPS_VEC_ATTR
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

const VecLoops table = {colmax, scale_cols, exp_pack_pair_bf16, bwd_p_row, bwd_ds_pair};

}  // namespace DANET_OPS_VEC_NS
