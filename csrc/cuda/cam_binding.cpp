// Torch binding of the CUDA CAM kernels (csrc/cuda/cam_kernels.cu): checks, output and
// workspace allocation, current stream, TF32 setting. Implements danet_ops::cam_forward /
// cam_backward for the CUDA dispatch key; the schemas are defined in csrc/register.cpp.
// Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::, without the cuBLAS/cuSPARSE headers)
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "binding_utils.h"

namespace danet_ops {
namespace {

using namespace cuda_binding;

bool cam_paper(c10::string_view mode, const char* op) {
  namespace ct = danet_ops::contract;
  TORCH_CHECK(mode == ct::kCamModeOriginal || mode == ct::kCamModePaper, op, ": mode must be '",
              ct::kCamModeOriginal, "' or '", ct::kCamModePaper, "'; got '", std::string(mode), "'");
  return mode == ct::kCamModePaper;
}

void cam_check_input(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(),
              "; got ", t.sizes());
}

void cam_check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor; got device ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, C, N]; got shape ", x.sizes());
  // the sizes the kernels index safely (danet_cuda::cam_sizes_ok), named in the error
  namespace ct = danet_ops::contract;
  TORCH_CHECK(x.size(1) >= ct::kCamCMin && x.size(1) <= ct::kCamCMaxCuda, op, ": C = ", x.size(1),
              " outside ", ct::kCamCMin, "..", ct::kCamCMaxCuda, " (the CUDA kernels keep a [C] "
              "fp32 row in shared memory)");
  TORCH_CHECK(x.size(0) <= danet_cuda::kMaxBatch, op, ": batch ", x.size(0), " > ",
              danet_cuda::kMaxBatch, " is not supported");
  TORCH_CHECK(x.size(2) <= danet_cuda::kCamMaxPositions, op, ": N = ", x.size(2), " > ",
              danet_cuda::kCamMaxPositions, " is not supported");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& gamma, c10::string_view mode) {
  constexpr const char* op = "danet_ops::cam_forward (cuda)";
  cam_check_x(x, op);
  const bool paper = cam_paper(mode, op);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const c10::cuda::CUDAGuard guard(x.device());

  danet_cuda::CamForwardParams p;
  p.B = B;
  p.C = C;
  p.N = N;
  p.paper = paper;
  p.dtype = kernel_dtype(x, op, "x");
  at::Tensor o = at::empty({B, C, N}, x.options());
  at::Tensor attn = at::empty({B, C, C}, x.options().dtype(at::kFloat));
  at::Tensor y, g;
  if (gamma.has_value()) {
    g = gamma_f32(*gamma, x, op, "x is");
    y = at::empty({B, C, N}, x.options().dtype(contract::output_dtype(
                                 x.scalar_type(), x.scalar_type(), gamma->scalar_type())));
    p.gamma = g.data_ptr<float>();
    p.y = y.data_ptr();
    p.y_dtype = kernel_dtype(y, op, "y = gamma*O + x");
  } else {
    y = at::empty({0}, x.options());
  }
  if (B == 0) return {o, attn, y};
  p.x = view3(x, op, "x");
  p.o = o.data_ptr();
  p.attn = attn.data_ptr<float>();
  p.allow_tf32 = allow_tf32();
  at::Tensor ws = at::empty({(int64_t)danet_cuda::cam_forward_workspace_bytes(p)},
                            x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  check_launch(danet_cuda::cam_forward(p, c10::cuda::getCurrentCUDAStream()), op);
  return {o, attn, y};
}

std::tuple<at::Tensor, at::Tensor> cam_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& attn, const at::Tensor& o,
                                                     const std::optional<at::Tensor>& gamma,
                                                     c10::string_view mode) {
  constexpr const char* op = "danet_ops::cam_backward (cuda)";
  cam_check_x(x, op);
  const bool paper = cam_paper(mode, op);
  cam_check_input(dy, x, op, "dy");
  cam_check_input(o, x, op, "o");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  TORCH_CHECK(attn.is_cuda() && attn.device() == x.device() && attn.dim() == 3 &&
                  attn.size(0) == B && attn.size(1) == C && attn.size(2) == C,
              op, ": attn must be [B, C, C] = [", B, ", ", C, ", ", C, "] on ", x.device(),
              "; got ", attn.sizes());
  const c10::cuda::CUDAGuard guard(x.device());

  at::Tensor dx = at::empty({B, C, N}, x.options());
  at::Tensor dgamma = at::zeros({gamma.has_value() ? 1 : 0}, x.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {dx, dgamma};

  danet_cuda::CamBackwardParams p;
  p.B = B;
  p.C = C;
  p.N = N;
  p.paper = paper;
  p.dtype = kernel_dtype(x, op, "x");
  // dy arrives in y's dtype (fp32 when gamma is fp32 and x is fp16/bf16); the matmuls need x's.
  const at::Tensor dy_mma = dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type());
  const at::Tensor attn_f = attn.to(at::kFloat).contiguous();
  at::Tensor g;
  if (gamma.has_value()) {
    g = gamma_f32(*gamma, x, op, "x is");
    p.gamma = g.data_ptr<float>();
    p.dgamma = dgamma.data_ptr<float>();
  }
  p.dy = view3(dy, op, "dy");
  p.dy_mma = view3(dy_mma, op, "dy");
  p.x = view3(x, op, "x");
  p.o = view3(o, op, "o");
  p.attn = attn_f.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.allow_tf32 = allow_tf32();
  at::Tensor ws = at::empty({(int64_t)danet_cuda::cam_backward_workspace_bytes(p)},
                            x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  check_launch(danet_cuda::cam_backward(p, c10::cuda::getCurrentCUDAStream()), op);
  return {dx, dgamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(danet_ops, CUDA, m) {
  m.impl("cam_forward", &cam_forward_cuda);
  m.impl("cam_backward", &cam_backward_cuda);
}

}  // namespace danet_ops
