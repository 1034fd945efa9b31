// Device building blocks shared by pam_kernels.cu and cam_kernels.cu (sm_80+, torch-free).
//
// Everything is organised around 64 x 64 shared-memory tiles and a warp tile of
// 16 rows x 64 columns of fp32 accumulators held in the mma.sync C-fragment layout:
//   lane = 4*g + t (g = lane/4 in 0..7, t = lane%4 in 0..3), n-tile nt in 0..7:
//   acc[nt][0] = (row g,   col 8nt+2t)   acc[nt][1] = (row g,   col 8nt+2t+1)
//   acc[nt][2] = (row g+8, col 8nt+2t)   acc[nt][3] = (row g+8, col 8nt+2t+1)
// Three interchangeable engines compute acc += A*B on those tiles:
//   fp16/bf16 : mma.sync m16n8k16 (fp32 accumulate), operands via ldmatrix
//   TF32      : mma.sync m16n8k8 .tf32 on fp32 tiles (only when the caller allows TF32)
//   SIMT      : fp32 FMAs producing exactly the same fragment layout
// so the softmax/epilogue code above them is written once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "danet_cuda.cuh"

namespace danet_cuda {
namespace dev {

constexpr int kThreads = 128;  // 4 warps per block, each owns 16 rows of a 64-row tile
constexpr int kTile = 64;      // every smem tile is 64 x 64 elements
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Row pitch of a 64-wide smem tile, in elements: 64 + 16 bytes. Rows stay 16-byte
// aligned (cp.async / ldmatrix) and the 8 rows read by one ldmatrix phase fall in
// distinct bank groups (pitch = 144 B for 16-bit types, 272 B for fp32).
template <class T>
struct Tile {
  static constexpr int kPitch = kTile + 16 / (int)sizeof(T);
  static constexpr int kElems = kTile * kPitch;
  static constexpr int kBytes = kElems * (int)sizeof(T);
};
constexpr int kStagePitch = kTile + 4;  // fp32 staging tiles (epilogues, P for fp32 engines)

// ------------------------------------------------------------- conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Loads/stores of tensors whose dtype is only known at run time (epilogues, reductions).
__device__ __forceinline__ float load_any(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_any(void* p, int64_t i, DType dt, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}
__device__ __forceinline__ float load_view(const View3& t, int64_t b, int64_t c, int64_t n) {
  return load_any(t.data, b * t.sb + c * t.sc + n * t.sn, t.dtype);
}

// Two fp32 values -> one 32-bit register of two 16-bit values (low half = first).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ----------------------------------------------------------------- PTX
// cp.async, ldmatrix and bf16 mma need sm_80. If a build also targets older GPUs the PTX is
// replaced by a trap there; the launchers refuse those devices first (require_sm80).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define DANET_SM80 1
#else
#define DANET_SM80 0
#endif
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared; bytes < 16 zero-fills the tail (0 = all zeros).
__device__ __forceinline__ void cp_async_16(void* s, const void* g, int bytes) {
#if DANET_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(s)), "l"(g),
               "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if DANET_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if DANET_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if !DANET_SM80
  r[0] = r[1] = r[2] = r[3] = 0u;
  __trap();
#else
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
  }
#endif
}

// c[4] += A(16x16) * B(16x8), fp32 accumulate.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if !DANET_SM80
  __trap();
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}
// c[4] += A(16x8) * B(8x8) in TF32 (operands already rounded with to_tf32).
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
#if !DANET_SM80
  __trap();
#else
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if DANET_SM80
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return __float_as_uint(x);
#endif
}

// ------------------------------------------------------------- tile loads
// Copies the window [r0, r0+64) x [c0, c0+64) of a strided matrix (element (r, c) at
// base[r*s_r + c*s_c], valid for r < r_end and c < c_end) into a smem tile
// s[64][Tile<T>::kPitch]; everything outside the valid range becomes 0, so padded rows and
// ragged columns never inject garbage/NaN into the MMAs.
//   vec (host-checked: s_c == 1, 16-byte aligned base and row strides): cp.async 16-byte
//   chunks, the ragged tail zero-filled by the src-size operand. The caller commits/waits.
//   otherwise: element-wise loads, consecutive threads along the unit-stride dimension.
template <class T>
__device__ __forceinline__ void load_tile(T* s, const T* base, int64_t s_r, int64_t s_c,
                                          int64_t r0, int64_t r_end, int64_t c0, int64_t c_end,
                                          bool vec) {
  constexpr int P = Tile<T>::kPitch;
  const int tid = threadIdx.x;
  if (vec) {
    constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte chunk
    constexpr int CPR = kTile / VEC;          // chunks per tile row
#pragma unroll
    for (int it = 0; it < kTile * CPR / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int r = i / CPR, cc = (i % CPR) * VEC;
      const int64_t gr = r0 + r, gc = c0 + cc;
      const T* src = base;
      int bytes = 0;
      if (gr < r_end && gc < c_end) {
        const int64_t left = c_end - gc;
        bytes = (int)(left < VEC ? left : VEC) * (int)sizeof(T);
        src = base + gr * s_r + gc;
      }
      cp_async_16(s + r * P + cc, src, bytes);
    }
  } else {
    const bool r_fast = s_r < s_c;  // channels_last-like: walk rows with consecutive threads
#pragma unroll 4
    for (int it = 0; it < kTile * kTile / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int r = r_fast ? (i & (kTile - 1)) : (i / kTile);
      const int c = r_fast ? (i / kTile) : (i & (kTile - 1));
      const int64_t gr = r0 + r, gc = c0 + c;
      T v = from_float<T>(0.f);
      if (gr < r_end && gc < c_end) v = base[gr * s_r + gc * s_c];
      s[r * P + c] = v;
    }
  }
}

// True when a [*, rows, cols] operand with element strides (s_b, s_r, s_c) can use the
// 16-byte cp.async path of load_tile (host side).
inline bool tile_vec_ok(const void* p, int64_t B, int64_t rows, int64_t cols, int64_t s_b,
                        int64_t s_r, int64_t s_c, size_t esize) {
  const int64_t vec = 16 / (int64_t)esize;
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  if (cols > 1 && s_c != 1) return false;
  if (rows > 1 && s_r % vec != 0) return false;
  if (B > 1 && s_b % vec != 0) return false;
  return true;
}

// A strided [B, C, N] operand as the kernels see it.
struct Operand {
  const void* p;       // element (b, c, n) at p + b*sb + c*sc + n*sn
  int64_t sb, sc, sn;  // element strides
  bool vec;            // cp.async-eligible (tile_vec_ok)
};
inline Operand make_operand(const View3& v, int64_t B, int64_t C, int64_t N) {
  return Operand{v.data, v.sb, v.sc, v.sn,
                 tile_vec_ok(v.data, B, C, N, v.sb, v.sc, v.sn, dtype_size(v.dtype))};
}

// ------------------------------------------------------------------ engines
// acc[16 x 64] += A[16 x K] * B[K x 64], K = 16*k16 (k16 <= 4); tiles in smem, pitch P:
//   A_KM = false: A(m, k) = sA[m*P + k]     A_KM = true: A(m, k) = sA[k*P + m]
//   B_KN = false: B(k, n) = sB[n*P + k]     B_KN = true: B(k, n) = sB[k*P + n]
// sA points at the warp's row 0, sB at column 0.
template <class T, bool TF32, bool A_KM, bool B_KN>
__device__ __forceinline__ void warp_gemm(float (&acc)[8][4], const T* sA, const T* sB, int k16) {
  constexpr int P = Tile<T>::kPitch;
  const int lane = threadIdx.x & 31;
  if constexpr (sizeof(T) == 2) {
    // ldmatrix.x4: lane l addresses row (l&7) of 8x8 matrix q = l>>3.
    const int q = lane >> 3, r = lane & 7;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      if (ks < k16) {
        const int k0 = ks * 16;
        // A fragment: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15)
        uint32_t a[4];
        if constexpr (A_KM)
          ldmatrix_x4<true>(a, sA + (k0 + (q >> 1) * 8 + r) * P + (q & 1) * 8);
        else
          ldmatrix_x4<false>(a, sA + ((q & 1) * 8 + r) * P + k0 + (q >> 1) * 8);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          // B fragments of n-tiles 2np, 2np+1: matrices (nt0, k 0-7), (nt0, k 8-15), (nt1, ...), (nt1, ...)
          uint32_t b[4];
          if constexpr (B_KN)
            ldmatrix_x4<true>(b, sB + (k0 + (q & 1) * 8 + r) * P + np * 16 + (q >> 1) * 8);
          else
            ldmatrix_x4<false>(b, sB + (np * 16 + (q >> 1) * 8 + r) * P + k0 + (q & 1) * 8);
          mma_16816<T>(acc[2 * np], a, b[0], b[1]);
          mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
    auto A = [&](int m, int k) -> float { return A_KM ? sA[k * P + m] : sA[m * P + k]; };
    auto B = [&](int k, int n) -> float { return B_KN ? sB[k * P + n] : sB[n * P + k]; };
    if constexpr (TF32) {
      // m16n8k8 fragments: a = (g,t) (g+8,t) (g,t+4) (g+8,t+4); b = (k=t, n=g) (k=t+4, n=g)
#pragma unroll
      for (int ks = 0; ks < 8; ++ks) {
        if (ks < 2 * k16) {
          const int k0 = ks * 8;
          uint32_t a[4];
          a[0] = to_tf32(A(g, k0 + t));
          a[1] = to_tf32(A(g + 8, k0 + t));
          a[2] = to_tf32(A(g, k0 + t + 4));
          a[3] = to_tf32(A(g + 8, k0 + t + 4));
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
            mma_1688_tf32(acc[nt], a, to_tf32(B(k0 + t, nt * 8 + g)),
                          to_tf32(B(k0 + t + 4, nt * 8 + g)));
        }
      }
    } else {
      const int K = 16 * k16;
#pragma unroll 1  // 32 independent FMAs per k already; unrolling only adds register pressure
      for (int k = 0; k < K; ++k) {
        const float a0 = A(g, k), a1 = A(g + 8, k);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const float b0 = B(k, nt * 8 + 2 * t), b1 = B(k, nt * 8 + 2 * t + 1);
          acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
          acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
          acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
          acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
        }
      }
    }
  }
}

// A 16 x 64 left operand produced in registers (softmax probabilities P or dS) and then
// multiplied with a smem tile stored [n][k]: acc[16 x 64] += X[16 x 64] * B, B(k, n) = sB[n*P + k].
// fp16/bf16: X is kept as packed A fragments (the FlashAttention-2 register reuse).
// fp32 engines: X is staged in a per-warp fp32 smem tile [16][kStagePitch].
template <class T, bool TF32>
struct RegA {
  uint32_t f[4][4];  // [k16 step][A fragment register]
  __device__ __forceinline__ explicit RegA(float*) {}
  __device__ __forceinline__ void set(const float (&x)[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      f[kk][0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);          // row g,   k 2t..2t+1
      f[kk][1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);          // row g+8, k 2t..2t+1
      f[kk][2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);  // row g,   k 2t+8..
      f[kk][3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);  // row g+8, k 2t+8..
    }
  }
  __device__ __forceinline__ void gemm(float (&acc)[8][4], const T* sB) const {
    constexpr int P = Tile<T>::kPitch;
    const int lane = threadIdx.x & 31, q = lane >> 3, r = lane & 7;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        ldmatrix_x4<false>(b, sB + (np * 16 + (q >> 1) * 8 + r) * P + kk * 16 + (q & 1) * 8);
        mma_16816<T>(acc[2 * np], f[kk], b[0], b[1]);
        mma_16816<T>(acc[2 * np + 1], f[kk], b[2], b[3]);
      }
    }
  }
};
template <bool TF32>
struct RegA<float, TF32> {
  float* s;  // this warp's [16][kStagePitch] fp32 staging tile
  __device__ __forceinline__ explicit RegA(float* warp_stage) : s(warp_stage) {}
  __device__ __forceinline__ void set(const float (&x)[8][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    __syncwarp();  // previous gemm() reads of the staging tile are done
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      s[g * kStagePitch + nt * 8 + 2 * t] = x[nt][0];
      s[g * kStagePitch + nt * 8 + 2 * t + 1] = x[nt][1];
      s[(g + 8) * kStagePitch + nt * 8 + 2 * t] = x[nt][2];
      s[(g + 8) * kStagePitch + nt * 8 + 2 * t + 1] = x[nt][3];
    }
    __syncwarp();
  }
  __device__ __forceinline__ void gemm(float (&acc)[8][4], const float* sB) const {
    // Same math as warp_gemm<float, TF32, A_KM=false, B_KN=false> with A pitch kStagePitch.
    constexpr int P = Tile<float>::kPitch;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (TF32) {
#pragma unroll
      for (int ks = 0; ks < 8; ++ks) {
        const int k0 = ks * 8;
        uint32_t a[4];
        a[0] = to_tf32(s[g * kStagePitch + k0 + t]);
        a[1] = to_tf32(s[(g + 8) * kStagePitch + k0 + t]);
        a[2] = to_tf32(s[g * kStagePitch + k0 + t + 4]);
        a[3] = to_tf32(s[(g + 8) * kStagePitch + k0 + t + 4]);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          mma_1688_tf32(acc[nt], a, to_tf32(sB[(nt * 8 + g) * P + k0 + t]),
                        to_tf32(sB[(nt * 8 + g) * P + k0 + t + 4]));
      }
    } else {
#pragma unroll 1
      for (int k = 0; k < kTile; ++k) {
        const float a0 = s[g * kStagePitch + k], a1 = s[(g + 8) * kStagePitch + k];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const float b0 = sB[(nt * 8 + 2 * t) * P + k], b1 = sB[(nt * 8 + 2 * t + 1) * P + k];
          acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
          acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
          acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
          acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
        }
      }
    }
  }
};

// ------------------------------------------------------------------ pipeline
constexpr int kStages = 3;  // smem stages of the cp.async pipeline (prefetch distance 2)

// Runs steps 0..total-1 of a kernel through a kStages-deep cp.async pipeline. issue(s) starts
// the loads of step s into stage s % kStages (cp.async, or plain stores on the element-wise
// path); compute(s) consumes that stage. One commit group per step (empty ones included) keeps
// the group count aligned with the step index, so wait_group<kStages - 2> means "step s has
// landed". A single barrier per step both publishes step s and proves that every warp is done
// with step s - 1, whose stage is the one issue(s + kStages - 1) then overwrites.
template <class Issue, class Compute>
__device__ __forceinline__ void run_pipeline(int total, Issue&& issue, Compute&& compute) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) issue(s);
    cp_async_commit();
  }
  for (int s = 0; s < total; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (s + kStages - 1 < total) issue(s + kStages - 1);
    cp_async_commit();
    compute(s);
  }
  cp_async_wait<0>();
  __syncthreads();  // the caller may now reuse the stages (epilogue staging)
}

// ------------------------------------------------------------------ misc
__device__ __forceinline__ void zero_acc(float (&acc)[8][4]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
}

// Writes a warp's 16x64 accumulator tile (rows row0.., cols col0..) times per-row scales into
// an fp32 staging tile with pitch `sp`: st[col][row] when TRANSPOSE, else st[row][col].
template <bool TRANSPOSE>
__device__ __forceinline__ void stage_acc(float* st, int sp, const float (&acc)[8][4], int row0,
                                          int col0, float scale_lo, float scale_hi) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + g + (e >> 1) * 8, col = col0 + nt * 8 + 2 * t + (e & 1);
      const float v = acc[nt][e] * ((e >> 1) ? scale_hi : scale_lo);
      if (TRANSPOSE)
        st[col * sp + row] = v;
      else
        st[row * sp + col] = v;
    }
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Block-wide reductions (fixed order: deterministic). `red` holds >= 32 floats; all threads
// of the block must call; blockDim.x a multiple of 32.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  __syncthreads();  // `red` may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < nw; ++i) r = MAX ? fmaxf(r, red[i]) : r + red[i];
  return r;
}

// r[b, n] = sum_c u[b, c, n] * w[b, c, n] over C channels (fp32). Optionally writes
// delta[b*N + n] = scale * r (scale = *gamma or 1), and always the block's partial sum of r
// to partial[b*gridDim.x + blockIdx.x] (for dgamma = sum dy*O, reduced deterministically by
// finalize_sum_kernel). Block (32, 8): x walks n (coalesced for N-major), y splits channels.
static __global__ void __launch_bounds__(256) dot_rows_kernel(View3 u, View3 w, int64_t C, int64_t N,
                                                       const float* gamma, float* delta,
                                                       float* partial) {
  __shared__ float red[8][33];
  const int64_t b = blockIdx.y, n = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (n < N)
    for (int64_t c = threadIdx.y; c < C; c += 8) s += load_view(u, b, c, n) * load_view(w, b, c, n);
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0) {
    float r = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) r += red[i][threadIdx.x];
    if (delta != nullptr && n < N) delta[b * N + n] = (gamma ? *gamma : 1.f) * r;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = r;
  }
}

// out[0] = sum_i partial[i], fixed order (single block of 256 threads).
static __global__ void __launch_bounds__(256) finalize_sum_kernel(const float* partial, int64_t n,
                                                           float* out) {
  __shared__ float red[32];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  s = block_reduce<false>(s, red);
  if (threadIdx.x == 0) out[0] = s;
}

// Launch helper: opt in to > 48 KB of dynamic smem when needed and check it fits.
template <class K>
inline cudaError_t prepare_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0, max_optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  if (bytes > (size_t)max_optin) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

// The kernels use sm_80 instructions (cp.async, ldmatrix, bf16/tf32 mma.sync).
inline cudaError_t require_sm80() {
  int dev = 0, major = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  return major >= 8 ? cudaSuccess : cudaErrorNoKernelImageForDevice;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

}  // namespace dev
}  // namespace danet_cuda
