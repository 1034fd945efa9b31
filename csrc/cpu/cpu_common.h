// Shared helpers of the CPU kernels (pam_cpu.cpp, cam_cpu.cpp):
//
//  * FlushDenormals: FTZ + DAZ in the calling thread for a scope, restored afterwards. Every
//    parallel task of our kernels sets it, so exp(s - m) that would be denormal becomes 0 and
//    the GEMMs that read P never hit the (orders of magnitude slower) denormal path.
//    torch.set_flush_denormal reaches only the calling thread, not at::parallel_for's workers.
//  * Low-precision tile products: bf16 x bf16 -> fp32 (fp16 x fp16 -> fp32) GEMMs through
//    oneDNN's brgemm micro-kernel that libtorch_cpu exports (at::native::cpublas::brgemm; B
//    packed in the VNNI layout here), else through MKL's cblas_gemm_bf16bf16f32 /
//    cblas_gemm_f16f16f32 (weak symbols). A torch with neither has no low-precision path.
//  * use_lowp(dtype): whether bf16/fp16 inputs take that path: DANET_OPS_CPU_LOWP=0|1 forces
//    it; by default bf16 on AVX512-BF16 (with brgemm) or AMX-BF16, fp16 on AVX512-FP16 or
//    AMX-FP16 (lowp_native says why).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

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

// The tile ops are ATen calls on views of the op's inputs, which may require grad: they must
// dispatch below autograd (in every worker thread: the guard is thread-local).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// Whether this thread has called brgemm since its last release (set by brgemm_call).
inline thread_local bool brgemm_used = false;

// The scope every parallel task of our kernels runs in: below autograd and with FTZ/DAZ; on
// leaving, the brgemm hardware context (AMX tile configuration) is released if the task used
// brgemm (fp32/fp64 tasks never touch it).
class TaskScope {
 public:
  TaskScope() = default;
  ~TaskScope() {
    if (brgemm_used) {
      brgemm_used = false;
      at::native::cpublas::brgemm_release(true);
    }
  }
  TaskScope(const TaskScope&) = delete;
  TaskScope& operator=(const TaskScope&) = delete;

 private:
  BelowAutograd below_autograd_;
  FlushDenormals ftz_;
};

// at::parallel_for over tasks [0, n) (grain 1), each chunk fn(begin, end) in a TaskScope.
template <class F>
void parallel_tasks(int64_t n, const F& fn) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    TaskScope scope;
    fn(begin, end);
  });
}

// A tile size from the environment, read on every call (so a change between calls takes
// effect) and validated: unset or empty -> dflt; otherwise an integer in [lo, hi], else a
// RuntimeError naming the variable. The bounds keep the memory contract: a block is a constant
// independent of N (the upper bound stops a "block of N", which would make a tile N x N), and
// the lower bound keeps tiles big enough for the GEMMs to be GEMMs.
inline int64_t env_block(const char* name, int64_t dflt, int64_t lo, int64_t hi) {
  const char* s = std::getenv(name);
  if (s == nullptr || s[0] == '\0') return dflt;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s, &end, 10);
  const bool ok = errno == 0 && end != s && *end == '\0' && v >= lo && v <= hi;
  TORCH_CHECK(ok, name, " must be an integer in [", lo, ", ", hi, "] (a tile size; the bounds keep "
              "the O(N) memory contract and tiles worth a GEMM); got '", s, "'");
  return static_cast<int64_t>(v);
}

// Like parallel_tasks, but the tasks are handed out one at a time from a shared counter
// (dynamic scheduling): fn(next) runs once per worker, sets up its buffers and then loops
// `for (int64_t t; next(t);)`. On a shared or busy machine a descheduled worker then delays
// the op by one task, not by half of it. The result does not depend on which worker ran a task.
template <class F>
void parallel_dynamic(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> counter{0};
  auto next = [&](int64_t& t) {
    t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < n;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    TaskScope scope;
    if (begin < end) fn(next);
  });
}

// CPU features from torch's cpuinfo ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16").
inline bool cpu_has(const std::string& what) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(what);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
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

// ---- Low-precision tile products -------------------------------------------------------------
//
// Two engines for C (fp32) = alpha * A B + beta * C with A, B bf16 (or fp16):
//  * brgemm: oneDNN's batch-reduce GEMM micro-kernel, exported by libtorch_cpu as
//    at::native::cpublas::brgemm (bf16 x bf16 -> fp32 with vdpbf16ps on AVX512-BF16, tiles on
//    AMX; fp16 where oneDNN's ISA is at least AVX512-FP16). It wants A row-major and B packed in
//    the VNNI layout [ceil(K/2)][N][2] (pairs of consecutive K rows interleaved; an odd K is
//    zero-padded in B, A is never read past K). Measured on a 2-core AMD EPYC (AVX512-BF16, no
//    AMX), 1 thread: 205-225 GFLOP/s on the PAM tile shapes (256x64x256 .. 512x256x256), 2.4x
//    sgemm (84-91 GFLOP/s) and 1.2-2.9x at::mm in bf16; MKL's cblas_gemm_bf16bf16f32 ran 77-89,
//    no faster than sgemm.
//  * MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (weak symbols): the fallback where
//    brgemm refuses the dtype (it throws rather than computing on an unsupported ISA).
// B may also be an fp32 view (a P or dE tile): it is rounded to the operand dtype while packed
// (round to nearest even, as Tensor.to), which saves a separate rounding pass.

// One brgemm product C[M, N] = A[M, K] B[K, N] on small integer values (exact in bf16/fp16
// and in fp32 sums), B in our VNNI layout, checked against the exact result.
template <class T>
bool brgemm_probe(int64_t M, int64_t N, int64_t K) {
  const int64_t K2 = (K + 1) / 2;
  std::vector<T> A(M * K), Bv(K2 * N * 2, T(0.f));
  std::vector<float> C(M * N, -1.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) A[m * K + k] = T(static_cast<float>((m * 3 + k) % 7 - 3));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      Bv[((k / 2) * N + n) * 2 + (k & 1)] = T(static_cast<float>((k * 5 + n) % 5 - 2));
  at::native::cpublas::brgemm(M, N, K, K, N, N, false, A.data(), Bv.data(), C.data(), true);
  at::native::cpublas::brgemm_release(true);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float want = 0.f;
      for (int64_t k = 0; k < K; ++k)
        want += static_cast<float>((m * 3 + k) % 7 - 3) * static_cast<float>((k * 5 + n) % 5 - 2);
      if (C[m * N + n] != want) return false;
    }
  return true;
}

// Whether brgemm computes T here: probed once on the kernels' kind of shapes (a full 256-wide
// tile and a ragged one with odd K; it throws on an ISA oneDNN's ukernel does not cover, and a
// layout it would read differently, e.g. another B format on some ISA, fails the check), and,
// per call, oneDNN still enabled (torch.backends.mkldnn.enabled = False makes brgemm refuse the
// VNNI layout). Otherwise the kernels take the other engine.
template <class T>
inline bool brgemm_available() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool ok = [] {
    try {
      return brgemm_probe<T>(33, 256, 64) && brgemm_probe<T>(5, 37, 7);
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

inline bool brgemm_available(at::ScalarType t) {
  if (t == at::kBFloat16) return brgemm_available<at::BFloat16>();
  if (t == at::kHalf) return brgemm_available<at::Half>();
  return false;
}

inline bool lowp_gemm_available(at::ScalarType t) {
  if (brgemm_available(t)) return true;
  if (t == at::kBFloat16) return cblas_gemm_bf16bf16f32 != nullptr;
  if (t == at::kHalf) return cblas_gemm_f16f16f32 != nullptr;
  return false;
}

// C [M, N] (ldc) (+)= A [M, K] (lda, row-major) x B (VNNI-packed [ceil(K/2)][N][2], ldb = N):
// every brgemm product of our kernels goes through here, so the task's scope knows to release
// the hardware context.
template <class T>
void brgemm_call(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                 float* C, int64_t ldc, bool add) {
  brgemm_used = true;
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, true);
}

template <class T>
inline T to_lowp(float f) {
  return T(f);  // round to nearest even (c10's conversions), NaN stays NaN
}
template <class T>
inline T to_lowp(T x) {
  return x;
}

// dst [ceil(K/2)][N][2] <- src [K, N] (element (k, n) at src[k*sk + n*sn]), rounded to T.
template <class T, class S>
void pack_vnni(T* dst, const S* src, int64_t K, int64_t N, int64_t sk, int64_t sn) {
  const int64_t K2 = K / 2;
  if (sn == 1 || N == 1) {  // rows contiguous: interleave row pairs
    for (int64_t kp = 0; kp < K2; ++kp) {
      const S* r0 = src + 2 * kp * sk;
      const S* r1 = r0 + sk;
      T* out = dst + 2 * kp * N;
      for (int64_t n = 0; n < N; ++n) {
        out[2 * n] = to_lowp<T>(r0[n]);
        out[2 * n + 1] = to_lowp<T>(r1[n]);
      }
    }
    if (K & 1) {
      const S* r0 = src + (K - 1) * sk;
      T* out = dst + 2 * K2 * N;
      for (int64_t n = 0; n < N; ++n) {
        out[2 * n] = to_lowp<T>(r0[n]);
        out[2 * n + 1] = T(0.f);
      }
    }
  } else {  // columns contiguous (a transposed view) or general strides: walk n outer
    for (int64_t n = 0; n < N; ++n) {
      const S* col = src + n * sn;
      for (int64_t kp = 0; kp < K2; ++kp) {
        T* out = dst + 2 * (kp * N + n);
        out[0] = to_lowp<T>(col[2 * kp * sk]);
        out[1] = to_lowp<T>(col[(2 * kp + 1) * sk]);
      }
      if (K & 1) {
        T* out = dst + 2 * (K2 * N + n);
        out[0] = to_lowp<T>(col[(K - 1) * sk]);
        out[1] = T(0.f);
      }
    }
  }
}

// B [K, N] (a 2-D view, low-precision or fp32) packed once for brgemm, reusable across products
// (a key block's K or V tile read by every query block of the backward).
struct PackedB {
  at::Tensor buf;  // [ceil(K/2) * N * 2] in the operand dtype
  int64_t K = 0, N = 0;
};

template <class T>
void pack_b_into(PackedB& pb, const at::Tensor& B, at::ScalarType ot) {
  pb.K = B.size(0);
  pb.N = B.size(1);
  const int64_t need = ((pb.K + 1) / 2) * pb.N * 2;
  if (!pb.buf.defined() || pb.buf.numel() < need || pb.buf.scalar_type() != ot)
    pb.buf = at::empty({std::max<int64_t>(need, 1)}, B.options().dtype(ot));
  T* dst = reinterpret_cast<T*>(pb.buf.mutable_data_ptr());
  if (B.scalar_type() == at::kFloat) {
    pack_vnni<T, float>(dst, B.const_data_ptr<float>(), pb.K, pb.N, B.stride(0), B.stride(1));
  } else {
    TORCH_INTERNAL_ASSERT(B.scalar_type() == ot);
    pack_vnni<T, T>(dst, reinterpret_cast<const T*>(B.const_data_ptr()), pb.K, pb.N, B.stride(0),
                    B.stride(1));
  }
}

inline void pack_b(PackedB& pb, const at::Tensor& B, at::ScalarType ot) {
  if (ot == at::kBFloat16) pack_b_into<at::BFloat16>(pb, B, ot);
  else pack_b_into<at::Half>(pb, B, ot);
}

// C [m, n] fp32 (unit stride along n) = A [m, K] (operand dtype, unit stride along K; else a
// contiguous copy is made) x packed B, + C when add.
inline void brgemm_packed(at::Tensor& C, const at::Tensor& A_, const PackedB& pb, bool add) {
  const int64_t m = C.size(0), n = C.size(1), K = pb.K;
  if (m == 0 || n == 0) return;
  if (K == 0) {
    if (!add) C.zero_();
    return;
  }
  TORCH_INTERNAL_ASSERT(C.scalar_type() == at::kFloat && (C.stride(1) == 1 || n == 1));
  TORCH_INTERNAL_ASSERT(A_.size(1) == K && pb.N == n && A_.scalar_type() == pb.buf.scalar_type());
  const bool a_rows = (A_.stride(1) == 1 || K == 1) && (m == 1 || A_.stride(0) >= K);
  const at::Tensor A = a_rows ? A_ : A_.contiguous();
  const int64_t lda = m == 1 ? K : A.stride(0);
  const int64_t ldc = m == 1 ? n : C.stride(0);
  if (A.scalar_type() == at::kBFloat16) {
    brgemm_call(m, n, K, reinterpret_cast<const at::BFloat16*>(A.const_data_ptr()), lda,
                reinterpret_cast<const at::BFloat16*>(pb.buf.const_data_ptr()), n,
                C.mutable_data_ptr<float>(), ldc, add);
  } else {
    brgemm_call(m, n, K, reinterpret_cast<const at::Half*>(A.const_data_ptr()), lda,
                reinterpret_cast<const at::Half*>(pb.buf.const_data_ptr()), n,
                C.mutable_data_ptr<float>(), ldc, add);
  }
}

// C = alpha * A B + beta * C through MKL's CBLAS (the fallback engine). A, B in one dtype.
inline void gemm_lowp_cblas(at::Tensor& C, const at::Tensor& A_, const at::Tensor& B_,
                            float alpha, float beta) {
  const int64_t m = C.size(0), n = C.size(1), k = A_.size(1);
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

// C = alpha * A B + beta * C with A [m, k] low-precision (bf16 or fp16), B [k, n] in A's dtype
// or fp32 (rounded to A's dtype), C an fp32 [m, n] view with unit stride along n. fp32
// accumulation. On brgemm, K is split into chunks of kKChunk (a packed B chunk stays in L2: CAM's
// products have K = N); alpha != 1 with beta != 0 goes through a temporary.
inline void gemm_lowp(at::Tensor& C, const at::Tensor& A, const at::Tensor& B_, float alpha,
                      float beta) {
  const int64_t m = C.size(0), n = C.size(1), k = A.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.f) C.zero_(); else C.mul_(beta);
    return;
  }
  TORCH_INTERNAL_ASSERT(C.scalar_type() == at::kFloat && (C.stride(1) == 1 || n == 1));
  const auto ot = A.scalar_type();
  if (!brgemm_available(ot)) {
    const at::Tensor B = B_.scalar_type() == ot ? B_ : B_.to(ot);
    gemm_lowp_cblas(C, A, B, alpha, beta);
    return;
  }
  if (alpha != 1.f && beta != 0.f) {
    at::Tensor T = at::empty({m, n}, C.options());
    gemm_lowp(T, A, B_, 1.f, 0.f);
    if (beta != 1.f) C.mul_(beta);
    C.add_(T, alpha);
    return;
  }
  if (beta != 0.f && beta != 1.f) C.mul_(beta);
  constexpr int64_t kKChunk = 1024;
  thread_local PackedB pb;
  for (int64_t k0 = 0; k0 < k; k0 += kKChunk) {
    const int64_t kc = std::min(kKChunk, k - k0);
    pack_b(pb, B_.narrow(0, k0, kc), ot);
    brgemm_packed(C, A.narrow(1, k0, kc), pb, beta != 0.f || k0 > 0);
  }
  if (alpha != 1.f) C.mul_(alpha);  // beta == 0 here
}

// Whether the low-precision tile products are faster than fp32 tiles on this CPU, so that
// bf16/fp16 inputs take them by default:
//  * bf16: brgemm available and the CPU has AVX512-BF16 or AMX-BF16. Measured on a 2-core AMD
//    EPYC (AVX512-BF16, no AMX): brgemm bf16 tiles 2.4x sgemm (see above). Without brgemm (MKL's
//    cblas_gemm_bf16bf16f32 only) it needs AMX: on AVX512-BF16 alone that ran no faster than
//    sgemm and the bf16 PAM forward took 1.24x the fp32-tile time.
//  * fp16: AVX512-FP16 or AMX-FP16 (brgemm's fp16 needs AVX512-FP16 anyway).
// DANET_OPS_CPU_LOWP=0|1 overrides (use_lowp).
inline bool lowp_native(at::ScalarType t) {
  static const bool amx = (cpu_has("amx_bf16") || cpu_has("amx_fp16")) && at::cpu::init_amx();
  if (t == at::kBFloat16) {
    if (amx && cpu_has("amx_bf16")) return true;
    return cpu_has("avx512_bf16") && brgemm_available<at::BFloat16>();
  }
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
