// select_path and the two low-precision GEMM engines (lowp_gemm.h): oneDNN's brgemm with B packed
// in the VNNI layout, and MKL's CBLAS bf16/fp16 GEMMs. Also the kernels of danet_ops::cpu_path and
// danet_ops::cpu_isa (schemas in csrc/register.cpp): the same select_path / isa() the kernels call,
// so the answer honours DANET_OPS_CPU_LOWP and DANET_OPS_CPU_ISA as they are set at the query.
#include "lowp_gemm.h"

#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(DANET_OPS_X86)
extern "C" {
// MKL's CBLAS (LP64: MKL_INT = int). Weak: absent in torch builds without MKL.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}
#endif

namespace danet_ops {
namespace cpu {
namespace {

using CblasGemm = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                           const uint16_t*, int, float, float*, int);

// MKL's low-precision GEMM for t, or nullptr (no MKL in this torch, or not x86: torch's ARM
// builds have no MKL).
CblasGemm cblas_for(at::ScalarType t) {
#if defined(DANET_OPS_X86)
  if (t == at::kBFloat16) return cblas_gemm_bf16bf16f32;
  if (t == at::kHalf) return cblas_gemm_f16f16f32;
#endif
  (void)t;
  return nullptr;
}

// CPU features from torch's cpuinfo ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16").
bool cpu_has(const std::string& what) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(what);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

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
// VNNI layout) and isa() >= avx512.
template <class T>
bool brgemm_works() {
  static const bool ok = [] {
    try {
      return brgemm_probe<T>(33, 256, 64) && brgemm_probe<T>(5, 37, 7);
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

bool brgemm_available(at::ScalarType t, Isa level) {
  if (level < Isa::kAvx512 || !at::globalContext().userEnabledMkldnn()) return false;
  if (t == at::kBFloat16) return brgemm_works<at::BFloat16>();
  if (t == at::kHalf) return brgemm_works<at::Half>();
  return false;
}

// Whether the low-precision tile products are faster than fp32 tiles on this CPU, so that
// bf16/fp16 inputs take them by default:
//  * bf16: AMX-BF16, or AVX512-BF16 with brgemm. Measured on a 2-core AMD EPYC (AVX512-BF16, no
//    AMX): brgemm bf16 tiles 2.4x sgemm. Without brgemm (MKL's cblas_gemm_bf16bf16f32 only) it
//    needs AMX: on AVX512-BF16 alone that ran no faster than sgemm and the bf16 PAM forward took
//    1.24x the fp32-tile time.
//  * fp16: AVX512-FP16 or AMX-FP16 (brgemm's fp16 needs AVX512-FP16 anyway).
// All of these are AVX-512-era units: none below isa() = avx512.
bool lowp_native(at::ScalarType t, Isa level, bool brgemm) {
  if (level < Isa::kAvx512) return false;
  static const bool amx = (cpu_has("amx_bf16") || cpu_has("amx_fp16")) && at::cpu::init_amx();
  if (t == at::kBFloat16) return (amx && cpu_has("amx_bf16")) || (cpu_has("avx512_bf16") && brgemm);
  if (t == at::kHalf) return cpu_has("avx512_fp16") || (amx && cpu_has("amx_fp16"));
  return false;
}

// ---- Engines ----------------------------------------------------------------------------------
// B [K, N] (a 2-D view, low-precision or fp32) packed once for brgemm.
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

void pack_b(PackedB& pb, const at::Tensor& B, at::ScalarType ot) {
  if (ot == at::kBFloat16) pack_b_into<at::BFloat16>(pb, B, ot);
  else pack_b_into<at::Half>(pb, B, ot);
}

// C [m, n] fp32 (unit stride along n) = A [m, K] (operand dtype, unit stride along K; else a
// contiguous copy is made) x packed B, + C when add.
void brgemm_packed(at::Tensor& C, const at::Tensor& A_, const PackedB& pb, bool add) {
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

// C = alpha * A B + beta * C on brgemm. K is split into chunks of kKChunk (a packed B chunk stays
// in L2: CAM's products have K = N); alpha != 1 with beta != 0 goes through a temporary.
void gemm_brgemm(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, float alpha,
                 float beta) {
  const int64_t m = C.size(0), n = C.size(1), k = A.size(1);
  if (alpha != 1.f && beta != 0.f) {
    at::Tensor T = at::empty({m, n}, C.options());
    gemm_brgemm(T, A, B, 1.f, 0.f);
    if (beta != 1.f) C.mul_(beta);
    C.add_(T, alpha);
    return;
  }
  if (beta != 0.f && beta != 1.f) C.mul_(beta);
  constexpr int64_t kKChunk = 1024;
  thread_local PackedB pb;
  for (int64_t k0 = 0; k0 < k; k0 += kKChunk) {
    const int64_t kc = std::min(kKChunk, k - k0);
    pack_b(pb, B.narrow(0, k0, kc), A.scalar_type());
    brgemm_packed(C, A.narrow(1, k0, kc), pb, beta != 0.f || k0 > 0);
  }
  if (alpha != 1.f) C.mul_(alpha);  // beta == 0 here
}

// X: a 2-D view [r, c] as a row-major CBLAS operand: (transposed?, leading dimension).
// False when neither dimension has unit stride (the caller then passes a contiguous copy).
bool as_operand(const at::Tensor& X, bool& trans, int64_t& ld) {
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

// C = alpha * A B + beta * C through MKL's CBLAS. B is rounded to A's dtype first if fp32.
void gemm_cblas(at::Tensor& C, const at::Tensor& A_, const at::Tensor& B_, float alpha,
                float beta) {
  const auto ot = A_.scalar_type();
  const at::Tensor Bo = as_type(B_, ot);
  const int64_t m = C.size(0), n = C.size(1), k = A_.size(1);
  bool ta = false, tb = false;
  int64_t lda = 0, ldb = 0;
  const at::Tensor A = as_operand(A_, ta, lda) ? A_ : A_.contiguous();
  const at::Tensor B = as_operand(Bo, tb, ldb) ? Bo : Bo.contiguous();
  if (!A.is_same(A_)) as_operand(A, ta, lda);
  if (!B.is_same(Bo)) as_operand(B, tb, ldb);
  const int64_t ldc = m == 1 ? std::max<int64_t>(n, 1) : C.stride(0);
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  const CblasGemm fn = cblas_for(ot);
  TORCH_INTERNAL_ASSERT(fn != nullptr);
  fn(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
     static_cast<int>(n), static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(A.const_data_ptr()),
     static_cast<int>(lda), reinterpret_cast<const uint16_t*>(B.const_data_ptr()),
     static_cast<int>(ldb), beta, C.mutable_data_ptr<float>(), static_cast<int>(ldc));
}

}  // namespace

Path select_path(at::ScalarType t) {
  const Isa level = isa();  // first: a bad DANET_OPS_CPU_ISA fails every call alike
  if (t == at::kDouble) return Path::kFp64Tiles;
  if (t != at::kBFloat16 && t != at::kHalf) return Path::kFp32Tiles;
  const bool brgemm = brgemm_available(t, level);
  if (!brgemm && cblas_for(t) == nullptr) return Path::kFp32Tiles;  // no low-precision engine
  const char* env = std::getenv("DANET_OPS_CPU_LOWP");  // per call: tests flip it between calls
  const bool lowp = env != nullptr && env[0] != '\0' ? env[0] != '0' : lowp_native(t, level, brgemm);
  if (!lowp) return Path::kFp32Tiles;
  const bool bf16 = t == at::kBFloat16;
  if (brgemm) return bf16 ? Path::kBf16Brgemm : Path::kFp16Brgemm;
  return bf16 ? Path::kBf16Cblas : Path::kFp16Cblas;
}

const char* path_name(Path p) {
  switch (p) {
    case Path::kFp64Tiles: return "fp64-tiles";
    case Path::kFp32Tiles: return "fp32-tiles";
    case Path::kBf16Brgemm: return "bf16-brgemm";
    case Path::kFp16Brgemm: return "fp16-brgemm";
    case Path::kBf16Cblas: return "bf16-cblas";
    case Path::kFp16Cblas: return "fp16-cblas";
  }
  return "?";
}

Engine engine_of(Path p) {
  switch (p) {
    case Path::kBf16Brgemm:
    case Path::kFp16Brgemm: return Engine::kBrgemm;
    case Path::kBf16Cblas:
    case Path::kFp16Cblas: return Engine::kCblas;
    default: return Engine::kAten;
  }
}

at::ScalarType operand_type(Path p, at::ScalarType t) {
  switch (p) {
    case Path::kBf16Brgemm:
    case Path::kBf16Cblas: return at::kBFloat16;
    case Path::kFp16Brgemm:
    case Path::kFp16Cblas: return at::kHalf;
    default: return compute_type(t);
  }
}

void gemm(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double alpha, double beta,
          Engine engine) {
  if (engine == Engine::kAten) {
    if (beta == 0.0) {
      at::mm_out(C, A, B);
      if (alpha != 1.0) C.mul_(alpha);
    } else {
      C.addmm_(A, B, beta, alpha);
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(A.scalar_type() == at::kBFloat16 || A.scalar_type() == at::kHalf);
  const int64_t m = C.size(0), n = C.size(1), k = A.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0) C.zero_(); else C.mul_(beta);
    return;
  }
  TORCH_INTERNAL_ASSERT(C.scalar_type() == at::kFloat && (C.stride(1) == 1 || n == 1));
  const float a = static_cast<float>(alpha), b = static_cast<float>(beta);
  if (engine == Engine::kBrgemm) gemm_brgemm(C, A, B, a, b);
  else gemm_cblas(C, A, B, a, b);
}

}  // namespace cpu
}  // namespace danet_ops

namespace danet_ops {
namespace {

// op "pam" | "cam"; dtype of the inputs (all of one dtype) -> the path's name (lowp_gemm.h):
// fp64-tiles, fp32-tiles, bf16-brgemm, fp16-brgemm, bf16-cblas, fp16-cblas.
std::string cpu_path(c10::string_view op, at::ScalarType dtype) {
  TORCH_CHECK(op == "pam" || op == "cam", "danet_ops::cpu_path: op must be 'pam' or 'cam'; got '",
              std::string(op), "'");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "danet_ops::cpu_path: dtype must be float16, bfloat16, float32 or float64; got ",
              dtype);
  return cpu::path_name(cpu::select_path(dtype));
}

// The ISA level the CPU kernels dispatch to (isa.h): "avx512", "avx2" or "default".
std::string cpu_isa() { return cpu::isa_name(cpu::isa()); }

}  // namespace

// No tensor arguments: one kernel for every dispatch key.
TORCH_LIBRARY_IMPL(danet_ops, CompositeExplicitAutograd, m) {
  m.impl("cpu_path", &cpu_path);
  m.impl("cpu_isa", &cpu_isa);
}

}  // namespace danet_ops
