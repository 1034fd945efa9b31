// The CPU kernels of danet_ops::cam_forward, cam_backward and cam_forward_inference (schemas in
// csrc/register.cpp): checks and allocation; the tile loops are in cam_tiles.cpp (formulas in
// cam_kernels.h). Every path runs the same tile loops: the path select_path chose (lowp_gemm.h)
// gives their operand dtype and GEMM engine. fp32 / fp64 compute in their own dtype; bf16 / fp16
// with bf16 / fp16 operands and fp32 accumulation on a low-precision path, else converted once
// to fp32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../contract.h"     // CAM modes, generated from danet_ops/_contract.py
#include "../dtype_rules.h"  // y's dtype: the contract's output_dtype
#include "cam_kernels.h"

namespace danet_ops {
namespace {

using cpu::as_type;
using cpu::compute_type;

double mode_sign(c10::string_view mode_) {
  const std::string mode(mode_);
  using contract::kCamModeOriginal;
  using contract::kCamModePaper;
  TORCH_CHECK(mode == kCamModeOriginal || mode == kCamModePaper, "cam: mode must be '",
              kCamModeOriginal, "' or '", kCamModePaper, "'; got '", mode, "'");
  return mode == kCamModeOriginal ? -1.0 : 1.0;
}

// The forward shared by cam_forward (keep_o) and cam_forward_inference (O only per block when
// there is a residual).
void cam_forward_impl(const at::Tensor& x, const std::optional<at::Tensor>& gamma, double s,
                      bool keep_o, at::Tensor& o, at::Tensor& attn, at::Tensor& y) {
  TORCH_CHECK(x.dim() == 3, "cam: x must be [B, C, N]; got ", x.sizes());
  cpu::CamForward f;
  f.BC = cpu::cam_block_c();  // checked before any work
  f.BN = cpu::cam_block_n();
  const cpu::Path path = cpu::select_path(x.scalar_type());
  const auto ct = compute_type(x.scalar_type());
  f.x = x;
  f.a = as_type(x, cpu::operand_type(path, x.scalar_type()));
  f.s = s;
  f.residual = gamma.has_value();
  f.gamma = f.residual ? gamma->item<double>() : 0.0;
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const auto fopt = f.a.options().dtype(ct);
  attn = f.attn = at::empty({B, C, C}, fopt);
  if (keep_o || !f.residual) o = f.o = at::empty({B, C, N}, fopt);
  if (f.residual) {
    y = f.y = at::empty({B, C, N}, fopt.dtype(contract::output_dtype(
                                        x.scalar_type(), x.scalar_type(), gamma->scalar_type())));
  }
  cpu::cam_forward_tiles(f, cpu::engine_of(path));
}

// x: [B, C, N] (any strides); gamma: [1] | None.
// -> o [B, C, N] (x's dtype), attn [B, C, C] (stats dtype: fp32, fp64 for fp64),
//    y = gamma*o + x or [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& gamma, c10::string_view mode) {
  cpu::BelowAutograd below_autograd;
  const double s = mode_sign(mode);
  at::Tensor o, attn, y;
  cam_forward_impl(x, gamma, s, /*keep_o=*/true, o, attn, y);
  if (!gamma.has_value()) y = at::empty({0}, x.options());
  return {as_type(o, x.scalar_type()), attn, y};
}

// Inference (no gradient will be taken): gamma*O + x with gamma, else O; nothing else kept.
at::Tensor cam_forward_inference_cpu(const at::Tensor& x, const std::optional<at::Tensor>& gamma,
                                     c10::string_view mode) {
  cpu::BelowAutograd below_autograd;
  const double s = mode_sign(mode);
  at::Tensor o, attn, y;
  cam_forward_impl(x, gamma, s, /*keep_o=*/false, o, attn, y);
  return gamma.has_value() ? y : as_type(o, x.scalar_type());
}

// dy: [B, C, N] gradient of y (gamma given) or of o; attn, o from the forward.
// -> dx [B, C, N] (x's dtype; the full gradient of x), dgamma [1] (stats dtype) or [0].
std::tuple<at::Tensor, at::Tensor> cam_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& attn, const at::Tensor& o,
    const std::optional<at::Tensor>& gamma, c10::string_view mode) {
  cpu::BelowAutograd below_autograd;
  TORCH_CHECK(x.dim() == 3 && dy.sizes() == x.sizes() && o.sizes() == x.sizes(),
              "cam_backward: dy, x, o must be [B, C, N] of one shape; got dy ", dy.sizes(),
              ", x ", x.sizes(), ", o ", o.sizes());
  cpu::CamBackward k;
  k.s = mode_sign(mode);
  k.BC = cpu::cam_block_c();
  k.BN = cpu::cam_block_n();
  const cpu::Path path = cpu::select_path(x.scalar_type());
  const auto ct = compute_type(x.scalar_type());
  const auto ot = cpu::operand_type(path, x.scalar_type());
  k.o = o;
  k.dy = dy;
  k.a = as_type(x, ot);
  k.dy_op = as_type(dy, ot);
  k.attn = as_type(attn, ct);
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(k.attn.sizes() == at::IntArrayRef({B, C, C}),
              "cam_backward: attn must be [B, C, C]; got ", k.attn.sizes());
  k.residual = gamma.has_value();
  k.g = k.residual ? gamma->item<double>() : 1.0;
  auto [dx, dgamma] = cpu::cam_backward_tiles(k, cpu::engine_of(path));
  return {dx.to(x.scalar_type()), dgamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(danet_ops, CPU, m) {
  m.impl("cam_forward", &cam_forward_cpu);
  m.impl("cam_backward", &cam_backward_cpu);
  m.impl("cam_forward_inference", &cam_forward_inference_cpu);
}

}  // namespace danet_ops
