// The runtime every CPU kernel of danet_ops runs in:
//
//  * TaskScope: each parallel task runs below autograd and with denormals flushed (FTZ/DAZ on
//    x86, FPCR.FZ on AArch64), so exp(s - m) that would be denormal becomes 0 and the GEMMs that
//    read P never hit the (orders of magnitude slower) denormal path; torch.set_flush_denormal
//    reaches only the calling thread, not at::parallel_for's workers. On leaving, the brgemm
//    hardware context (AMX tile configuration) is released if the task used brgemm.
//  * parallel_tasks / parallel_dynamic: at::parallel_for over the tasks, static or dynamic.
//  * Tile sizes from the environment, read and validated on every call (env_block).
//  * Denormal-free exp on tensors (exp_clamped_, exp_flush_).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>

#include "isa.h"

#if defined(DANET_OPS_X86)
#include <xmmintrin.h>
#endif

namespace danet_ops {
namespace cpu {

// ---- Denormals --------------------------------------------------------------------------------
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(DANET_OPS_X86)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    fpcr |= uint64_t(1) << 24;  // FZ: flush denormal inputs and results to zero
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ~FlushDenormals() {
#if defined(DANET_OPS_X86)
    _mm_setcsr(static_cast<unsigned int>(saved_));
#elif defined(__aarch64__)
    __asm__ volatile("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  uint64_t saved_ = 0;
};

// The tile ops are ATen calls on views of the op's inputs, which may require grad: they must
// dispatch below autograd (in every worker thread: the guard is thread-local).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// Whether this thread has called brgemm since its last release (set by brgemm_call).
inline thread_local bool brgemm_used = false;

// The scope of every parallel task: below autograd, FTZ/DAZ, brgemm context released on exit
// (fp32/fp64 tasks never touch it).
class TaskScope {
 public:
  TaskScope() = default;
  ~TaskScope() {
    if (brgemm_used) {
      brgemm_used = false;
      at::native::cpublas::brgemm_release(true);
    }
  }
  TaskScope(const TaskScope&) = delete;
  TaskScope& operator=(const TaskScope&) = delete;

 private:
  BelowAutograd below_autograd_;
  FlushDenormals ftz_;
};

// ---- Parallel loops ---------------------------------------------------------------------------
// at::parallel_for over tasks [0, n) (grain 1), each chunk fn(begin, end) in a TaskScope.
template <class F>
void parallel_tasks(int64_t n, const F& fn) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    TaskScope scope;
    fn(begin, end);
  });
}

// Like parallel_tasks, but the tasks are handed out one at a time from a shared counter
// (dynamic scheduling): fn(next) runs once per worker, sets up its buffers and then loops
// `for (int64_t t; next(t);)`. On a shared or busy machine a descheduled worker then delays
// the op by one task, not by half of it. The result does not depend on which worker ran a task.
template <class F>
void parallel_dynamic(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> counter{0};
  auto next = [&](int64_t& t) {
    t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < n;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    TaskScope scope;
    if (begin < end) fn(next);
  });
}

// ---- Tile sizes -------------------------------------------------------------------------------
// A tile size from the environment, read on every call (so a change between calls takes
// effect) and validated: unset or empty -> dflt; otherwise an integer in [lo, hi], else a
// RuntimeError naming the variable. The bounds keep the memory contract: a block is a constant
// independent of N (the upper bound stops a "block of N", which would make a tile N x N), and
// the lower bound keeps tiles big enough for the GEMMs to be GEMMs.
inline int64_t env_block(const char* name, int64_t dflt, int64_t lo, int64_t hi) {
  const char* s = std::getenv(name);
  if (s == nullptr || s[0] == '\0') return dflt;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s, &end, 10);
  const bool ok = errno == 0 && end != s && *end == '\0' && v >= lo && v <= hi;
  TORCH_CHECK(ok, name, " must be an integer in [", lo, ", ", hi, "] (a tile size; the bounds keep "
              "the O(N) memory contract and tiles worth a GEMM); got '", s, "'");
  return static_cast<int64_t>(v);
}

// PAM: query block BM (one task of the forward) and key block BN, DANET_OPS_CPU_BLOCK_M / _N in
// [16, 1024]. 256 keeps a task's working set ([Cv, BM] accumulator + [BM, BN] tile) in L2 for
// Cv = 512; the cap 1024 bounds a task's scratch (a 4 MB fp32 tile) independently of N.
inline int64_t pam_block_m() { return env_block("DANET_OPS_CPU_BLOCK_M", 256, 16, 1024); }
inline int64_t pam_block_n() { return env_block("DANET_OPS_CPU_BLOCK_N", 256, 16, 1024); }
// CAM: channel block of the Gram / dA products, DANET_OPS_CPU_CAM_BLOCK_C in [8, 4096], and N
// block of O / da, DANET_OPS_CPU_CAM_BLOCK_N in [16, 65536]. A task's scratch is O(C * block).
inline int64_t cam_block_c() { return env_block("DANET_OPS_CPU_CAM_BLOCK_C", 128, 8, 4096); }
inline int64_t cam_block_n() { return env_block("DANET_OPS_CPU_CAM_BLOCK_N", 512, 16, 65536); }

// ---- Numerics shared by the kernels -----------------------------------------------------------
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor as_type(const at::Tensor& t, at::ScalarType st) {
  return t.scalar_type() == st ? t : t.to(st);
}

// Denormal-free exp. ATen's vectorised exp leaves its fast path for any lane whose result
// underflows to a denormal or to 0 (and for -inf): on a 256x256 tile whose logits span a few
// hundred, exp_ alone cost 30-80x the normal case on AMD EPYC (5.2 ms vs 0.07 ms), more than the
// tile's GEMMs. So the argument is clamped first: exp(max(t, -87)) >= 1.65e-38, a normal fp32
// (fp64: -700). NaN stays NaN.
inline void exp_clamped_(at::Tensor& t) {
  t.clamp_min_(t.scalar_type() == at::kDouble ? -700.0 : -87.0).exp_();
}

// exp_clamped_ and then every result below e^-86.5 (2.7e-38) set to exactly 0, as FTZ would
// flush it: a -inf logit gets weight 0. Also zeroes NaN: only for tiles whose NaN rows are
// already NaN through their row max (the forward's online softmax).
inline void exp_flush_(at::Tensor& t) {
  const bool f64 = t.scalar_type() == at::kDouble;
  exp_clamped_(t);
  at::threshold_(t, f64 ? 1e-304 : 2.7e-38, 0.0);
}

}  // namespace cpu
}  // namespace danet_ops
