// Helpers shared by the torch bindings of the CUDA kernels (pam_binding.cpp, cam_binding.cpp):
// dtype and stride translation into danet_cuda's params, gamma as fp32, launch-error messages.
// Torch-facing, so it lives beside the bindings and is never included by a .cu.
#pragma once

#include <ATen/ATen.h>

#include "../dtype_rules.h"  // y's dtype: the contract's output_dtype
#include "danet_cuda.cuh"

namespace danet_ops {
namespace cuda_binding {

inline danet_cuda::DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return danet_cuda::DType::kFloat32;
    case at::kHalf: return danet_cuda::DType::kFloat16;
    case at::kBFloat16: return danet_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; backend 'cuda' supports float32, float16 and bfloat16");
  }
}

// t [B, C, N] (any strides) -> the kernels' strided view.
inline danet_cuda::View3 view3(const at::Tensor& t, const char* op, const char* name) {
  return danet_cuda::View3{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2),
                           kernel_dtype(t, op, name)};
}

// gamma as a [1] fp32 device tensor (it may arrive in the module's dtype). `like_is` names the
// tensor gamma must share a device with, for the error ("x is", "the inputs are").
inline at::Tensor gamma_f32(const at::Tensor& gamma, const at::Tensor& like, const char* op,
                            const char* like_is) {
  TORCH_CHECK(gamma.numel() == 1, op, ": gamma must have one element; got shape ", gamma.sizes());
  TORCH_CHECK(gamma.device() == like.device(), op, ": gamma is on ", gamma.device(), " but ",
              like_is, " on ", like.device());
  return gamma.reshape({1}).to(at::kFloat).contiguous();
}

inline void check_launch(cudaError_t e, const char* op) {
  if (e == cudaErrorNoKernelImageForDevice)
    TORCH_CHECK(false, op, ": the danet_ops CUDA kernels need an sm_80+ GPU (Ampere or newer) "
                "and a build that targets it; use backend='triton' or 'reference' here");
  if (e == cudaErrorInvalidConfiguration)
    TORCH_CHECK(false, op, ": launch configuration rejected by this GPU (the float32 kernels "
                "use up to 137 KB of shared memory per block, which sm_86/sm_89 GPUs do not "
                "offer); use float16/bfloat16, or backend='triton' or 'reference' here");
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(e), " (",
              cudaGetErrorString(e), ")");
}

inline bool allow_tf32() { return at::globalContext().allowTF32CuBLAS(); }

}  // namespace cuda_binding
}  // namespace danet_ops
