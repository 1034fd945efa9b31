// The precision paths of the CPU kernels and the GEMM engines behind them.
//
// select_path(dtype) decides, per call, which path a PAM / CAM call with inputs of that dtype
// takes (the op files switch on it; danet_ops::cpu_path reports it by path_name):
//   fp64-tiles   fp64 inputs: tiles in fp64 through ATen's BLAS.
//   fp32-tiles   fp32 inputs; bf16/fp16 inputs where the low-precision path is off (converted
//                once to fp32).
//   bf16-brgemm  bf16 operands, fp32 accumulation, through oneDNN's brgemm micro-kernel
//   fp16-brgemm  (libtorch_cpu's at::native::cpublas::brgemm, B packed in the VNNI layout here).
//                PAM runs its key-major kernels (pam_keymajor.cpp; the fp16 backward the tile
//                loop), CAM its tile loops on brgemm products.
//   bf16-cblas   bf16/fp16 operands, fp32 accumulation, through MKL's cblas_gemm_bf16bf16f32 /
//   fp16-cblas   cblas_gemm_f16f16f32 (weak symbols; x86 torch builds with MKL), in the tile loops.
// bf16/fp16 take a low-precision path when DANET_OPS_CPU_LOWP=1, or by default on a CPU with
// matrix units for them (lowp_native); DANET_OPS_CPU_LOWP=0 forces fp32-tiles. brgemm is used
// only at isa() = avx512 (isa.h: so never off x86, and DANET_OPS_CPU_ISA=avx2 behaves like a CPU
// without AVX512-BF16), while oneDNN is enabled and where its probe computes the dtype right;
// else the CBLAS engine, else fp32-tiles.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "runtime.h"

namespace danet_ops {
namespace cpu {

enum class Path { kFp64Tiles, kFp32Tiles, kBf16Brgemm, kFp16Brgemm, kBf16Cblas, kFp16Cblas };

Path select_path(at::ScalarType dtype);
const char* path_name(Path p);

// How a path's tile products are computed: ATen's mm/addmm on fp32/fp64, or low-precision
// operands (bf16/fp16, fp32 accumulation) through brgemm or MKL's CBLAS.
enum class Engine { kAten, kBrgemm, kCblas };
Engine engine_of(Path p);
// The dtype the tile products read on path p for inputs of dtype t.
at::ScalarType operand_type(Path p, at::ScalarType t);

// ---- brgemm and the VNNI layout ---------------------------------------------------------------
// brgemm wants A row-major and B packed in the VNNI layout [ceil(K/2)][N][2] (pairs of
// consecutive K rows interleaved; an odd K is zero-padded in B, A is never read past K). Measured
// on a 2-core AMD EPYC (AVX512-BF16, no AMX), 1 thread: 205-225 GFLOP/s on the PAM tile shapes
// (256x64x256 .. 512x256x256), 2.4x sgemm (84-91 GFLOP/s) and 1.2-2.9x at::mm in bf16; MKL's
// cblas_gemm_bf16bf16f32 ran 77-89, no faster than sgemm.

// C [M, N] (ldc) (+)= A [M, K] (lda, row-major) x B (VNNI-packed, ldb = N): every brgemm product
// of our kernels goes through here, so the task's scope knows to release the hardware context.
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

// ---- The product of the tile loops ------------------------------------------------------------
// C = alpha * A B + beta * C, in place on C, with the engine of the call's path:
//  * kAten: A, B, C in the compute dtype (fp32 / fp64), ATen's mm / addmm.
//  * kBrgemm / kCblas: A [m, k] bf16 or fp16, B [k, n] in A's dtype or fp32 (rounded to A's
//    dtype, while packing on brgemm), C an fp32 [m, n] view with unit stride along n; fp32
//    accumulation.
void gemm(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double alpha, double beta,
          Engine engine);

}  // namespace cpu
}  // namespace danet_ops
