// C++ unit test (CTest): the registered CPU ops, called through the dispatcher as a C++ user
// would, against the naive ATen computation (the released code's bmm) in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <utility>

namespace {
int failures = 0;

void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got - want).abs().max().item<double>();
  const bool ok = err <= tol;
  std::printf("%s %-48s max err %.3e (tol %.1e)\n", ok ? "PASS" : "FAIL", what, err, tol);
  if (!ok) ++failures;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}
}  // namespace

int main() {
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 2, Cq = 3, Cv = 5, N = 300;  // N ragged against the 256 tile

  // PAM: O = v softmax(scale * q^T k)^T, y = gamma*O + x; gradients from the naive graph.
  // DANet (Nk = N, scale 1), then keys/values of their own length with a scale.
  auto gamma = at::full({1}, 0.7, f64);
  auto fwd = op("danet_ops::pam_forward").typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, double)>();
  auto bwd = op("danet_ops::pam_backward").typed<
      std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double)>();
  for (const auto& [Nk, scale] : {std::pair<int64_t, double>{N, 1.0}, {77, 0.4}, {1, 2.0}}) {
    const std::string tag = " Nk=" + std::to_string(Nk) + " scale=" + std::to_string(scale);
    auto q = at::randn({B, Cq, N}, f64).mul_(0.5).requires_grad_();
    auto k = at::randn({B, Cq, Nk}, f64).mul_(0.5).requires_grad_();
    auto v = at::randn({B, Cv, Nk}, f64).requires_grad_();
    auto x = at::randn({B, Cv, N}, f64);
    at::Tensor o, lse, y;
    {
      at::NoGradGuard no_grad;
      std::tie(o, lse, y) = fwd.call(q, k, v, x, gamma, scale);
    }
    auto E = at::bmm(q.transpose(1, 2), k) * scale;
    auto o_ref = at::bmm(v, at::softmax(E, -1).transpose(1, 2));
    auto y_ref = gamma * o_ref + x;
    expect_close(("pam_forward y" + tag).c_str(), y, y_ref, 1e-12);
    expect_close(("pam_forward lse" + tag).c_str(), lse, at::logsumexp(E, -1), 1e-12);
    auto dy = at::randn({B, Cv, N}, f64);
    auto grads = torch::autograd::grad({y_ref}, {q, k, v}, {dy});
    at::Tensor dq, dk, dv, dgamma;
    {
      at::NoGradGuard no_grad;
      std::tie(dq, dk, dv, dgamma) = bwd.call(dy, q, k, v, o, lse, gamma, scale);
    }
    expect_close(("pam_backward dq" + tag).c_str(), dq, grads[0], 1e-11);
    expect_close(("pam_backward dk" + tag).c_str(), dk, grads[1], 1e-11);
    expect_close(("pam_backward dv" + tag).c_str(), dv, grads[2], 1e-11);
    expect_close(("pam_backward dgamma" + tag).c_str(), dgamma, (dy * o_ref).sum().reshape({1}),
                 1e-10);
  }

  // CAM, both modes.
  auto cam_fwd = op("danet_ops::cam_forward").typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view)>();
  auto cam_bwd = op("danet_ops::cam_backward").typed<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, c10::string_view)>();
  for (const std::string mode : {"original", "paper"}) {
    auto a = at::randn({B, 70, 40}, f64).mul_(0.2).requires_grad_();
    auto E = at::bmm(a, a.transpose(1, 2));
    auto A = at::softmax(mode == "original" ? std::get<0>(E.max(-1, true)) - E : E, -1);
    auto y_cam_ref = gamma * at::bmm(A, a) + a;
    at::Tensor co, cattn, cy;
    {
      at::NoGradGuard no_grad;
      std::tie(co, cattn, cy) = cam_fwd.call(a, gamma, mode);
    }
    expect_close(("cam_forward y " + mode).c_str(), cy, y_cam_ref, 1e-12);
    auto dyc = at::randn_like(a);
    auto da = torch::autograd::grad({y_cam_ref}, {a}, {dyc})[0];
    at::Tensor dx, dg;
    {
      at::NoGradGuard no_grad;
      std::tie(dx, dg) = cam_bwd.call(dyc, a, cattn, co, gamma, mode);
    }
    expect_close(("cam_backward dx " + mode).c_str(), dx, da, 1e-11);
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
