// danet_ops CUDA kernels: the torch-free host API (params structs + launchers).
//
// This header is included by the kernel sources (*.cu) and by the torch binding
// (*_binding.cpp, compiled by the host compiler), so it holds no device code and no
// torch/ATen/c10 include. Every tensor is a raw pointer plus int64 sizes/strides
// (in elements); all offsets are computed in 64 bits. Launchers enqueue on the given
// stream and return the first CUDA error (configuration or launch), never throw.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../contract.h"  // the op contract's limits (Cq, Cv, CAM's C), generated from danet_ops/_contract.py

namespace danet_cuda {

namespace contract = danet_ops::contract;

// Limits that the kernels' structure implies (beyond the op contract's): the batch is a grid
// dimension (<= 65535); PAM's flat step counter (column blocks x steps per block) and CAM's
// per-split step count are ints. The launchers return cudaErrorInvalidValue beyond them and the
// bindings raise an error that names them.
constexpr int64_t kMaxBatch = 65535;
constexpr int64_t kPamMaxPositions = int64_t(1) << 26;       // Nq, Nk: 2^20 blocks x <= 70 steps
constexpr int64_t kCamMaxPositions = int64_t(0x7fffffff) * 64;  // N: steps of 64 positions in an int

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// A read-only strided 3-D view [B, C, N]: element (b, c, n) lives at
// data + b*sb + c*sc + n*sn (element units). Any strides: contiguous (sn == 1),
// channels_last (sc == 1), channel slices.
struct View3 {
  const void* data = nullptr;  // nullptr = absent
  int64_t sb = 0;              // stride of B
  int64_t sc = 0;              // stride of C
  int64_t sn = 0;              // stride of N
  DType dtype = DType::kFloat32;
};

// ---------------------------------------------------------------- PAM ----
// E = scale * q^T k (DANet: scale = 1), A = softmax_j(E[i, :]), O[c, i] = sum_j v[c, j] A[i, j],
// y = gamma*O + x. Queries have Nq positions, keys/values their own Nk (pooled, regions, ...).
struct PamForwardParams {
  int64_t B = 0, Cq = 0, Cv = 0, Nq = 0, Nk = 0;  // sizes: contract::kCq*/kCv* limits; Nk >= 1 if Nq >= 1
  double scale = 1.0;     // E = scale * q^T k (1.0: bit for bit the scale-less kernels)
  View3 q;                // [B, Cq, Nq], dtype `dtype`
  View3 k;                // [B, Cq, Nk], dtype `dtype`
  View3 v;                // [B, Cv, Nk], dtype `dtype`
  View3 x;                // [B, Cv, Nq], any of the 3 dtypes; data == nullptr: no y
  const float* gamma = nullptr;  // [1] fp32 on the device; nullptr: no y
  void* o = nullptr;      // out [B, Cv, Nq] contiguous, dtype `o_dtype`
  float* lse = nullptr;   // out [B, Nq] contiguous fp32, natural-log log-sum-exp of E[i, :]
  void* y = nullptr;      // out [B, Cv, Nq] contiguous, dtype `y_dtype` (only with x and gamma)
  DType dtype = DType::kFloat32;    // of q, k, v
  // of o: `dtype`, or kFloat32 for any `dtype`. The binding keeps O in fp32 for fp16/bf16 inputs:
  // the backward's Delta = sum_c dO*O then carries no 16-bit rounding of O (see pam_kernels.cu).
  // y is made from the stored O.
  DType o_dtype = DType::kFloat32;
  DType y_dtype = DType::kFloat32;  // of y
  bool allow_tf32 = false;          // fp32 only: TF32 tensor cores instead of the SIMT path
};

// dO = gamma*dy (dy if no gamma); Delta_i = sum_c dO[c,i] O[c,i];
// dv = P^T dO, dS = scale*P*(dO^T v - Delta) (scale applied once, to dq and dk),
// dq = dS k^T, dk = dS^T q, dgamma = sum dy*O.
struct PamBackwardParams {
  int64_t B = 0, Cq = 0, Cv = 0, Nq = 0, Nk = 0;  // sizes as in the forward
  double scale = 1.0;  // the forward's scale
  View3 dy;        // [B, Cv, Nq] gradient of the forward result, any of the 3 dtypes
  View3 dy_mma;    // [B, Cv, Nq] the same values in dtype `dtype` (may alias dy)
  View3 q;         // [B, Cq, Nq], dtype `dtype`
  View3 k;         // [B, Cq, Nk], dtype `dtype`
  View3 v;         // [B, Cv, Nk], dtype `dtype`
  View3 o;         // [B, Cv, Nq] forward output O, any of the 3 dtypes (fp32 from the binding)
  const float* lse = nullptr;    // [B, Nq] contiguous fp32 from the forward
  const float* gamma = nullptr;  // [1] fp32 on the device; nullptr: dO = dy, no dgamma
  void* dq = nullptr;            // out [B, Cq, Nq] contiguous, dtype `dtype`
  void* dk = nullptr;            // out [B, Cq, Nk] contiguous, dtype `dtype`
  void* dv = nullptr;            // out [B, Cv, Nk] contiguous, dtype `dtype`
  float* dgamma = nullptr;       // out [1] fp32 (written only when gamma != nullptr)
  void* workspace = nullptr;     // pam_backward_workspace_bytes(...) bytes, 256-aligned
  DType dtype = DType::kFloat32;
  bool allow_tf32 = false;
};

size_t pam_backward_workspace_bytes(const PamBackwardParams& p);
cudaError_t pam_forward(const PamForwardParams& p, cudaStream_t stream);
cudaError_t pam_backward(const PamBackwardParams& p, cudaStream_t stream);

// ---------------------------------------------------------------- CAM ----
// a = x [B, C, N]; E = a a^T (fp32); A = softmax(rowmax(E) - E) ("original") or softmax(E)
// ("paper"); O = A a; y = gamma*O + a.
struct CamForwardParams {
  int64_t B = 0, C = 0, N = 0;   // sizes
  View3 x;                       // [B, C, N], dtype `dtype`
  const float* gamma = nullptr;  // [1] fp32 on the device; nullptr: no y
  bool paper = false;            // false: "original" softmax(-E); true: "paper" softmax(E)
  void* o = nullptr;             // out [B, C, N] contiguous, dtype `dtype`
  float* attn = nullptr;         // out [B, C, C] contiguous fp32 (A)
  void* y = nullptr;             // out [B, C, N] contiguous, dtype `y_dtype` (only with gamma)
  void* workspace = nullptr;     // cam_forward_workspace_bytes(...) bytes, 256-aligned
  DType dtype = DType::kFloat32;    // of x, o
  DType y_dtype = DType::kFloat32;  // of y
  bool allow_tf32 = false;
};

// dO = gamma*dy; dA = dO a^T; dE = s*A*(dA - rowsum(dA*A)) (s = -1 original, +1 paper);
// dx = dy (residual, with gamma) + A^T dO + (dE + dE^T) a; dgamma = sum dy*O.
struct CamBackwardParams {
  int64_t B = 0, C = 0, N = 0;   // sizes
  View3 dy;                      // [B, C, N], any of the 3 dtypes
  View3 dy_mma;                  // [B, C, N] the same values in dtype `dtype` (may alias dy)
  View3 x;                       // [B, C, N], dtype `dtype`
  const float* attn = nullptr;   // [B, C, C] contiguous fp32 (A from the forward)
  View3 o;                       // [B, C, N] forward O, any of the 3 dtypes
  const float* gamma = nullptr;  // [1] fp32 on the device; nullptr: dO = dy, no residual
  bool paper = false;
  void* dx = nullptr;            // out [B, C, N] contiguous, dtype `dtype`
  float* dgamma = nullptr;       // out [1] fp32 (written only when gamma != nullptr)
  void* workspace = nullptr;     // cam_backward_workspace_bytes(...) bytes, 256-aligned
  DType dtype = DType::kFloat32;
  bool allow_tf32 = false;
};

size_t cam_forward_workspace_bytes(const CamForwardParams& p);
size_t cam_backward_workspace_bytes(const CamBackwardParams& p);
cudaError_t cam_forward(const CamForwardParams& p, cudaStream_t stream);
cudaError_t cam_backward(const CamBackwardParams& p, cudaStream_t stream);

}  // namespace danet_cuda
