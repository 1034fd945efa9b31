// CAM on tiles (cam_kernels.h has the formulas). Forward: the Gram matrix is symmetric, so only
// its upper-triangle channel blocks are multiplied (about half the products) and mirrored; O = A a
// is computed per N-block with the epilogue y = gamma*O + a applied while the block is in cache.
// Backward: the two Gram-side products become one product with dE + dE^T, accumulated into the
// same N-block of da as the value-side product A^T dO (one pass over a and dO).
#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cam_kernels.h"

namespace danet_ops {
namespace cpu {
namespace {

// E[b] = a[b] a[b]^T for every batch into E [B, C, C] (contiguous), upper-triangle blocks only.
void gram_symmetric(const at::Tensor& a, int64_t BC, Engine engine, at::Tensor& E) {
  const int64_t B = a.size(0), C = a.size(1);
  const int64_t nb = (C + BC - 1) / BC;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (I, J) with I <= J
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) pairs.emplace_back(I, J);
  const int64_t P = static_cast<int64_t>(pairs.size());
  parallel_tasks(B * P, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / P;
      const auto [I, J] = pairs[t % P];
      const int64_t i0 = I * BC, bi = std::min(BC, C - i0);
      const int64_t j0 = J * BC, bj = std::min(BC, C - j0);
      at::Tensor e = E[b].narrow(0, i0, bi).narrow(1, j0, bj);
      gemm(e, a[b].narrow(0, i0, bi), a[b].narrow(0, j0, bj).t(), 1.0, 0.0, engine);  // [bi,N]x[N,bj]
      if (I != J) E[b].narrow(0, j0, bj).narrow(1, i0, bi).copy_(e.t());   // mirror
    }
  });
}

// E <- softmax(s * E) over the last dim, by row blocks in FTZ/DAZ tasks. softmax(-E) equals the
// released softmax(rowmax(E) - E) (softmax is shift invariant); the row max is subtracted
// first, then exp with weights below e^-86.5 flushed to 0.
void softmax_rows(at::Tensor& E, double s) {
  const int64_t B = E.size(0), C = E.size(1), R = 64, nR = (C + R - 1) / R;
  parallel_tasks(B * nR, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nR, r0 = (t % nR) * R, br = std::min(R, C - r0);
      at::Tensor e = E[b].narrow(0, r0, br);
      if (s != 1.0) e.mul_(s);
      e.sub_(at::amax(e, 1, /*keepdim=*/true));
      exp_flush_(e);                 // no denormal (and no slow exp) for sharp rows
      e.div_(e.sum(1, /*keepdim=*/true));
    }
  });
}

}  // namespace

void cam_forward_tiles(CamForward& f, Engine engine) {
  const at::Tensor& a = f.a;
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2), BN = f.BN;
  gram_symmetric(a, f.BC, engine, f.attn);
  softmax_rows(f.attn, f.s);                                  // [B, C, C] in the compute dtype
  const at::Tensor Aop = as_type(f.attn, a.scalar_type());    // A rounded to the operand dtype
  const bool write_o = f.o.defined();
  const auto fopt = f.attn.options();
  const int64_t nN = (N + BN - 1) / BN;
  parallel_tasks(B * nN, [&](int64_t begin, int64_t end) {
    at::Tensor obuf = write_o ? at::Tensor() : at::empty({C, BN}, fopt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nN, n0 = (t % nN) * BN, bn = std::min(BN, N - n0);
      at::Tensor ob = write_o ? f.o[b].narrow(1, n0, bn) : obuf.narrow(1, 0, bn);
      gemm(ob, Aop[b], a[b].narrow(1, n0, bn), 1.0, 0.0, engine);   // [C,C] x [C,bn]
      if (f.residual) {
        at::Tensor yb = f.y[b].narrow(1, n0, bn);
        at::add_out(yb, f.x[b].narrow(1, n0, bn), ob, f.gamma);     // y = gamma*O + a
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cam_backward_tiles(const CamBackward& k, Engine engine) {
  const at::Tensor &a = k.a, &dy = k.dy_op, &A = k.attn;
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2), BC = k.BC, BN = k.BN;
  const auto ct = A.scalar_type(), ot = a.scalar_type();
  const auto fopt = a.options().dtype(ct);
  const double g = k.g;

  // dA = g * dy a^T  [B, C, C], by channel row blocks (full product: dA is not symmetric).
  const int64_t nb = (C + BC - 1) / BC;
  at::Tensor dA = at::empty({B, C, C}, fopt);
  parallel_tasks(B * nb, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nb, i0 = (t % nb) * BC, bi = std::min(BC, C - i0);
      at::Tensor d = dA[b].narrow(0, i0, bi);
      gemm(d, dy[b].narrow(0, i0, bi), a[b].t(), g, 0.0, engine);  // [bi,N] x [N,C]
    }
  });
  // Softmax backward, the sign of the mode, and the symmetrised Gram gradient M = dE + dE^T.
  at::Tensor dE = at::_softmax_backward_data(dA, A, -1, A.scalar_type()).mul_(k.s);
  const at::Tensor M = as_type(dE + dE.transpose(1, 2), ot);
  const at::Tensor At = as_type(A, ot).transpose(1, 2);

  // da = M a + g A^T dy (+ dy), one pass over N-blocks of a and dy; the same pass gives the
  // per-block partial sums of dy*o for dgamma (summed in a fixed order: deterministic).
  at::Tensor dx = at::empty({B, C, N}, fopt);
  const int64_t nN = (N + BN - 1) / BN;
  at::Tensor dgamma_part = at::zeros({B * nN}, fopt);
  parallel_tasks(B * nN, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nN, n0 = (t % nN) * BN, bn = std::min(BN, N - n0);
      at::Tensor d = dx[b].narrow(1, n0, bn);
      const at::Tensor dyb = dy[b].narrow(1, n0, bn);
      gemm(d, M[b], a[b].narrow(1, n0, bn), 1.0, 0.0, engine);  // Gram side, both uses of a
      gemm(d, At[b], dyb, g, 1.0, engine);                      // value side
      if (k.residual) {
        const at::Tensor dyf = as_type(k.dy[b].narrow(1, n0, bn), ct);
        d.add_(dyf);
        dgamma_part[t].copy_((dyf * as_type(k.o[b].narrow(1, n0, bn), ct)).sum());
      }
    }
  });
  at::Tensor dgamma = k.residual ? dgamma_part.sum().reshape({1}) : at::empty({0}, fopt);
  return {dx, dgamma};
}

}  // namespace cpu
}  // namespace danet_ops
