// Shared helpers of the CPU kernels (pam_cpu.cpp, cam_cpu.cpp):
//
//  * FlushDenormals: FTZ + DAZ in the calling thread for a scope, restored afterwards. Every
//    parallel task of our kernels sets it, so exp(s - m) that would be denormal becomes 0 and
//    the GEMMs that read P never hit the (orders of magnitude slower) denormal path.
//    torch.set_flush_denormal reaches only the calling thread, not at::parallel_for's workers.
//  * Low-precision tile products: bf16 x bf16 -> fp32 (fp16 x fp16 -> fp32) GEMMs through the
//    MKL that libtorch_cpu carries (cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, which use
//    AVX512-BF16 / AMX where the CPU has them). Looked up as weak symbols: a torch without MKL
//    simply has no low-precision path (fp32 tiles, as before).
//  * use_lowp(dtype): whether bf16/fp16 inputs take that path: DANET_OPS_CPU_LOWP=0|1 forces
//    it; by default bf16 when the CPU has AMX-BF16, fp16 when it has AVX512-FP16 or AMX-FP16
//    (see lowp_native: on AVX512-BF16 alone MKL's bf16 GEMM measured no faster than sgemm).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/Utils.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define DANET_OPS_X86 1
#endif

extern "C" {
// MKL's CBLAS (LP64: MKL_INT = int). Weak: absent in torch builds without MKL.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace danet_ops {
namespace cpu {

class FlushDenormals {
 public:
  FlushDenormals() {
#ifdef DANET_OPS_X86
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~FlushDenormals() {
#ifdef DANET_OPS_X86
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
};

// at::parallel_for over tasks [0, n) (grain 1), each chunk fn(begin, end) running the way every
// task of our kernels must: below autograd (the tile ops are ATen calls on views of inputs that
// may require grad; the guard is thread-local, so it is set in each worker) and with FTZ/DAZ.
template <class F>
void parallel_tasks(int64_t n, const F& fn) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd_worker;
    FlushDenormals ftz;
    fn(begin, end);
  });
}

// CPU features from torch's cpuinfo ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16").
inline bool cpu_has(const std::string& what) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(what);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

inline bool lowp_gemm_available(at::ScalarType t) {
  if (t == at::kBFloat16) return cblas_gemm_bf16bf16f32 != nullptr;
  if (t == at::kHalf) return cblas_gemm_f16f16f32 != nullptr;
  return false;
}

// Whether the low-precision tile GEMMs are faster than fp32 tiles on this CPU: with AMX
// (AMX-BF16 / AMX-FP16) or AVX512-FP16. Not on AVX512-BF16 alone: measured on a 2-core AMD EPYC
// (AVX512-BF16, no AMX), MKL's bf16 GEMM on 256-wide tiles ran no faster than sgemm and the bf16
// PAM forward took 1.24x the fp32-tile time, so there the fp32 tiles stay the default
// (DANET_OPS_CPU_LOWP=1 still forces the bf16 tiles).
inline bool lowp_native(at::ScalarType t) {
  static const bool amx = (cpu_has("amx_bf16") || cpu_has("amx_fp16")) && at::cpu::init_amx();
  if (t == at::kBFloat16) return amx && cpu_has("amx_bf16");
  if (t == at::kHalf) return cpu_has("avx512_fp16") || (amx && cpu_has("amx_fp16"));
  return false;
}

// Read per call (cheap) so tests and benchmarks can flip DANET_OPS_CPU_LOWP between calls.
inline bool use_lowp(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  if (!lowp_gemm_available(t)) return false;
  const char* env = std::getenv("DANET_OPS_CPU_LOWP");
  if (env != nullptr && env[0] != '\0') return env[0] != '0';
  return lowp_native(t);
}

// X: a 2-D view [r, c] as a row-major CBLAS operand: (transposed?, leading dimension).
// False when neither dimension has unit stride (the caller then passes a contiguous copy).
inline bool as_operand(const at::Tensor& X, bool& trans, int64_t& ld) {
  const int64_t r = X.size(0), c = X.size(1), s0 = X.stride(0), s1 = X.stride(1);
  if ((s1 == 1 || c == 1) && (r == 1 || s0 >= std::max<int64_t>(c, 1))) {
    trans = false;
    ld = r == 1 ? std::max<int64_t>(c, 1) : s0;
    return true;
  }
  if ((s0 == 1 || r == 1) && (c == 1 || s1 >= std::max<int64_t>(r, 1))) {
    trans = true;
    ld = c == 1 ? std::max<int64_t>(r, 1) : s1;
    return true;
  }
  return false;
}

// Denormal-free exp. ATen's vectorised exp leaves its fast path for any lane whose result
// underflows to a denormal or to 0 (and for -inf): on a 256x256 tile whose logits span a few
// hundred, exp_ alone cost 30-80x the normal case on AMD EPYC (5.2 ms vs 0.07 ms), more than the
// tile's GEMMs. So the argument is clamped first: exp(max(t, -87)) >= 1.65e-38, a normal fp32
// (fp64: -700). NaN stays NaN.
inline void exp_clamped_(at::Tensor& t) {
  t.clamp_min_(t.scalar_type() == at::kDouble ? -700.0 : -87.0).exp_();
}

// exp_clamped_ and then every result below e^-86.5 (2.7e-38) set to exactly 0, as FTZ would
// flush it: a -inf logit gets weight 0. Also zeroes NaN: only for tiles whose NaN rows are
// already NaN through their row max (the forward's online softmax).
inline void exp_flush_(at::Tensor& t) {
  const bool f64 = t.scalar_type() == at::kDouble;
  exp_clamped_(t);
  at::threshold_(t, f64 ? 1e-304 : 2.7e-38, 0.0);
}

// C = alpha * A B + beta * C with A [m, k], B [k, n] low-precision (bf16 or fp16, one dtype)
// views and C an fp32 [m, n] view with unit stride along n. fp32 accumulation.
inline void gemm_lowp(at::Tensor& C, const at::Tensor& A_, const at::Tensor& B_, float alpha,
                      float beta) {
  const int64_t m = C.size(0), n = C.size(1), k = A_.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.f) C.zero_(); else C.mul_(beta);
    return;
  }
  TORCH_INTERNAL_ASSERT(C.scalar_type() == at::kFloat && (C.stride(1) == 1 || n == 1));
  TORCH_INTERNAL_ASSERT(A_.scalar_type() == B_.scalar_type());
  bool ta = false, tb = false;
  int64_t lda = 0, ldb = 0;
  const at::Tensor A = as_operand(A_, ta, lda) ? A_ : A_.contiguous();
  const at::Tensor B = as_operand(B_, tb, ldb) ? B_ : B_.contiguous();
  if (!A.is_same(A_)) as_operand(A, ta, lda);
  if (!B.is_same(B_)) as_operand(B, tb, ldb);
  const int64_t ldc = m == 1 ? std::max<int64_t>(n, 1) : C.stride(0);
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  auto* a = reinterpret_cast<const uint16_t*>(A.const_data_ptr());
  auto* b = reinterpret_cast<const uint16_t*>(B.const_data_ptr());
  auto fn = A.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  fn(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
     static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
     static_cast<int>(ldb), beta, C.mutable_data_ptr<float>(), static_cast<int>(ldc));
}

// The same product on either path: low-precision operands -> gemm_lowp; otherwise ATen's
// addmm / mm on the compute dtype (fp32 or fp64), in place on C.
inline void gemm(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double alpha,
                 double beta) {
  if (A.scalar_type() == at::kBFloat16 || A.scalar_type() == at::kHalf) {
    gemm_lowp(C, A, B, static_cast<float>(alpha), static_cast<float>(beta));
  } else if (beta == 0.0) {
    at::mm_out(C, A, B);
    if (alpha != 1.0) C.mul_(alpha);
  } else {
    C.addmm_(A, B, beta, alpha);
  }
}

}  // namespace cpu
}  // namespace danet_ops
