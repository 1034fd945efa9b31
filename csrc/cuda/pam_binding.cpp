// Torch binding of the CUDA PAM kernels (csrc/cuda/pam_kernels.cu): checks, output allocation,
// current stream, TF32 setting. Implements danet_ops::pam_forward / pam_backward for the CUDA
// dispatch key; the schemas are defined in csrc/register.cpp. Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::, without the cuBLAS/cuSPARSE headers)
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "binding_utils.h"

namespace danet_ops {
namespace {

using namespace cuda_binding;

// The sizes the kernels index safely (danet_cuda::pam_sizes_ok): the contract's Cq / Cv range
// and the grid / step-counter limits of danet_cuda.cuh. Checked here to name them in the error.
void check_pam_sizes(int64_t B, int64_t Cq, int64_t Cv, int64_t Nq, int64_t Nk, const char* op) {
  namespace ct = danet_ops::contract;
  TORCH_CHECK(ct::kCqMin <= Cq && Cq <= ct::kCqMax, op, ": Cq = ", Cq, " outside ", ct::kCqMin,
              "..", ct::kCqMax);
  TORCH_CHECK(ct::kCvMin <= Cv && Cv <= ct::kCvMax, op, ": Cv = ", Cv, " outside ", ct::kCvMin,
              "..", ct::kCvMax);
  TORCH_CHECK(B <= danet_cuda::kMaxBatch, op, ": batch ", B, " > ", danet_cuda::kMaxBatch,
              " is not supported");
  TORCH_CHECK(Nq <= danet_cuda::kPamMaxPositions && Nk <= danet_cuda::kPamMaxPositions, op,
              ": Nq = ", Nq, ", Nk = ", Nk, ": more than ", danet_cuda::kPamMaxPositions,
              " positions is not supported");
}

void check_cuda_3d(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
              like.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [B, C, N]; got shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pam_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& gamma, double scale) {
  constexpr const char* op = "danet_ops::pam_forward (cuda)";
  check_cuda_3d(q, q, op, "q");
  check_cuda_3d(k, q, op, "k");
  check_cuda_3d(v, q, op, "v");
  const int64_t B = q.size(0), Cq = q.size(1), Nq = q.size(2), Nk = k.size(2), Cv = v.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(1) == Cq, op, ": k must be [B, Cq, Nk] with q's B and Cq; got q ",
              q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(2) == Nk, op, ": v must be [B, Cv, Nk] with k's B and Nk; got k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  check_pam_sizes(B, Cq, Cv, Nq, Nk, op);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  TORCH_CHECK(x.has_value() == gamma.has_value(), op, ": give both x and gamma or neither");
  const c10::cuda::CUDAGuard guard(q.device());

  danet_cuda::PamForwardParams p;
  p.B = B;
  p.Cq = Cq;
  p.Cv = Cv;
  p.Nq = Nq;
  p.Nk = Nk;
  p.scale = scale;
  p.dtype = kernel_dtype(v, op, "v");
  // O in fp32 whatever the input dtype (stats_dtype, as the CPU kernel and the fake in
  // danet_ops/_fake_and_autograd.py): the backward's Delta = sum_c dO*O from a 16-bit O is the
  // one fp16/bf16 rounding that a sharp softmax does not cancel (dk errors several times the
  // fp32-compute-then-cast ones). Costs 2 more bytes per element of O for fp16/bf16 (saved for
  // the backward); danet_ops casts the O it returns to v's dtype.
  p.o_dtype = danet_cuda::DType::kFloat32;
  at::Tensor o = at::empty({B, Cv, Nq}, v.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, Nq}, v.options().dtype(at::kFloat));
  at::Tensor y, g;
  if (x.has_value()) {
    check_cuda_3d(*x, q, op, "x");
    TORCH_CHECK(x->size(0) == B && x->size(1) == Cv && x->size(2) == Nq, op,
                ": x must be [B, Cv, Nq] = [", B, ", ", Cv, ", ", Nq, "]; got ", x->sizes());
    g = gamma_f32(*gamma, q, op, "the inputs are");
    y = at::empty({B, Cv, Nq}, v.options().dtype(contract::output_dtype(
                                   v.scalar_type(), x->scalar_type(), gamma->scalar_type())));
    p.x = view3(*x, op, "x");
    p.gamma = g.data_ptr<float>();
    p.y = y.data_ptr();
    p.y_dtype = kernel_dtype(y, op, "y = gamma*O + x");
  } else {
    y = at::empty({0}, v.options());
  }
  if (B == 0 || Nq == 0) return {o, lse, y};
  if (Nk == 0) {  // softmax over no keys: O = 0 (an empty sum), lse = log 0
    o.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    if (x.has_value()) y.copy_(g * o + *x);
    return {o, lse, y};
  }
  p.q = view3(q, op, "q");
  p.k = view3(k, op, "k");
  p.v = view3(v, op, "v");
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.allow_tf32 = allow_tf32();
  check_launch(danet_cuda::pam_forward(p, c10::cuda::getCurrentCUDAStream()), op);
  return {o, lse, y};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pam_backward_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, const std::optional<at::Tensor>& gamma,
    double scale) {
  constexpr const char* op = "danet_ops::pam_backward (cuda)";
  check_cuda_3d(q, q, op, "q");
  check_cuda_3d(k, q, op, "k");
  check_cuda_3d(v, q, op, "v");
  check_cuda_3d(dy, q, op, "dy");
  check_cuda_3d(o, q, op, "o");
  const int64_t B = q.size(0), Cq = q.size(1), Nq = q.size(2), Nk = k.size(2), Cv = v.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(1) == Cq && v.size(0) == B && v.size(2) == Nk, op,
              ": expected q [B, Cq, Nq], k [B, Cq, Nk] and v [B, Cv, Nk]; got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  const std::vector<int64_t> out_shape{B, Cv, Nq};
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(out_shape) && o.sizes() == at::IntArrayRef(out_shape),
              op, ": dy and o must be [B, Cv, Nq] = ", at::IntArrayRef(out_shape), "; got dy ",
              dy.sizes(), ", o ", o.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype");
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.dim() == 2 && lse.size(0) == B &&
                  lse.size(1) == Nq,
              op, ": lse must be a [B, Nq] tensor on ", q.device(), "; got ", lse.sizes());
  check_pam_sizes(B, Cq, Cv, Nq, Nk, op);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dgamma = at::zeros({gamma.has_value() ? 1 : 0}, q.options().dtype(at::kFloat));
  if (B == 0 || Nq == 0 || Nk == 0)  // nothing flows (Nk == 0: O == 0, so dgamma = 0 too)
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options()), dgamma};
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());

  danet_cuda::PamBackwardParams p;
  p.B = B;
  p.Cq = Cq;
  p.Cv = Cv;
  p.Nq = Nq;
  p.Nk = Nk;
  p.scale = scale;
  p.dtype = kernel_dtype(v, op, "v");
  // dy arrives in y's dtype (e.g. fp32 under autocast); the matmuls need it in v's dtype.
  const at::Tensor dy_mma = dy.scalar_type() == v.scalar_type() ? dy : dy.to(v.scalar_type());
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor g;
  if (gamma.has_value()) {
    g = gamma_f32(*gamma, q, op, "the inputs are");
    p.gamma = g.data_ptr<float>();
    p.dgamma = dgamma.data_ptr<float>();
  }
  p.dy = view3(dy, op, "dy");
  p.dy_mma = view3(dy_mma, op, "dy");
  p.q = view3(q, op, "q");
  p.k = view3(k, op, "k");
  p.v = view3(v, op, "v");
  p.o = view3(o, op, "o");
  p.lse = lse_f.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.allow_tf32 = allow_tf32();
  at::Tensor ws = at::empty({(int64_t)danet_cuda::pam_backward_workspace_bytes(p)},
                            q.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  check_launch(danet_cuda::pam_backward(p, c10::cuda::getCurrentCUDAStream()), op);
  return {dq, dk, dv, dgamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(danet_ops, CUDA, m) {
  m.impl("pam_forward", &pam_forward_cuda);
  m.impl("pam_backward", &pam_backward_cuda);
}

}  // namespace danet_ops
