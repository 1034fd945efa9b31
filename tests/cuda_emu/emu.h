// Host emulation of the CUDA subset used by csrc/cuda (for logic checks without a GPU).
// One cooperative fiber per CUDA thread, blocks run one after another; warp collectives
// (ldmatrix, mma.sync, shfl, syncwarp) exchange data through per-warp buffers between barriers.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <ucontext.h>

namespace emu {
// Cooperative fibers (ucontext) in one OS thread: each CUDA thread runs until it reaches a
// barrier (warp collective or __syncthreads), then the next runnable fiber resumes. One core.
inline uint3 t_idx, b_idx;
inline dim3 b_dim, g_dim;
inline unsigned char* dyn_smem = nullptr;
inline long n_collectives = 0;  // emulated ldmatrix + mma.sync calls (per thread)

struct Barrier {
  int size = 0, count = 0;
  long gen = 0;
};
struct Copy {
  void* dst;
  const void* src;
  int bytes;
};
struct Fiber {
  std::vector<std::vector<Copy>> groups;  // committed, not yet waited (oldest first)
  std::vector<Copy> open;                 // issued since the last commit
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 idx;
  bool done = false;
  const long* wait_gen = nullptr;
  long wait_val = 0;
};
inline ucontext_t sched_ctx;
inline std::vector<Fiber>* fibers = nullptr;
inline int cur = -1;

struct Warp {
  Barrier bar;
  const void* addr[32];
  uint32_t ra[32][4];
  uint32_t rb[32][2];
  float fv[32];
};
inline std::vector<Warp> warps;
inline Barrier block_bar;

inline int ltid() { return (int)(t_idx.x + b_dim.x * (t_idx.y + b_dim.y * t_idx.z)); }
inline int lane() { return ltid() & 31; }
inline Warp& warp() { return warps[ltid() / 32]; }

inline void arrive_and_wait(Barrier& b) {
  if (++b.count == b.size) {  // last one releases the others
    b.count = 0;
    ++b.gen;
    return;
  }
  Fiber& f = (*fibers)[cur];
  f.wait_gen = &b.gen;
  f.wait_val = b.gen;
  swapcontext(&f.ctx, &sched_ctx);
}

inline Fiber& self() { return (*fibers)[cur]; }
inline void do_copy(const Copy& c) {
  if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
}
inline float h2f(uint16_t b, bool bf) {
  if (bf) { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f; }
  __half h; std::memcpy(&h, &b, 2); return __half2float(h);
}

inline std::function<void()> fiber_body;
inline void fiber_entry() {
  fiber_body();
  (*fibers)[cur].done = true;
  swapcontext(&(*fibers)[cur].ctx, &sched_ctx);
}

template <class F, class... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, F kernel, Args... args) {
  const int nt = block.x * block.y * block.z;
  if (nt % 32) { std::fprintf(stderr, "emu: block not a multiple of 32\n"); std::abort(); }
  constexpr size_t kCanary = 4096;
  std::vector<unsigned char> buf(smem + kCanary + 16, 0xFF);
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(buf.data()) + 15) & ~uintptr_t(15));
  std::vector<Fiber> fs(nt);
  for (auto& f : fs) f.stack.resize(256 * 1024);
  fiber_body = [&]() { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(base, 0xFF, smem + kCanary);  // garbage (NaN bytes): uninitialised reads show
        dyn_smem = base;
        b_dim = block;
        g_dim = grid;
        b_idx = uint3{x, y, z};
        warps.assign(nt / 32, Warp{});
        for (auto& w : warps) w.bar.size = 32;
        block_bar = Barrier{};
        block_bar.size = nt;
        fibers = &fs;
        for (int t = 0; t < nt; ++t) {
          Fiber& f = fs[t];
          f.idx = uint3{(unsigned)(t % block.x), (unsigned)((t / block.x) % block.y), (unsigned)(t / (block.x * block.y))};
          f.done = false;
          f.wait_gen = nullptr;
          f.groups.clear();
          f.open.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        int alive = nt;
        while (alive > 0) {
          bool progressed = false;
          for (int t = 0; t < nt; ++t) {
            Fiber& f = fs[t];
            if (f.done || (f.wait_gen && *f.wait_gen == f.wait_val)) continue;
            f.wait_gen = nullptr;
            cur = t;
            t_idx = f.idx;
            swapcontext(&sched_ctx, &f.ctx);
            progressed = true;
            if (f.done) --alive;
          }
          if (!progressed) { std::fprintf(stderr, "emu: deadlock (barrier mismatch) in block %u %u %u\n", x, y, z); std::abort(); }
        }
        for (auto& f : fs)
          if (!f.groups.empty() || !f.open.empty()) { std::fprintf(stderr, "emu: cp.async never waited for\n"); std::abort(); }
        for (size_t i = smem; i < smem + kCanary; ++i)
          if (base[i] != 0xFF) { std::fprintf(stderr, "emu: shared memory overflow at byte %zu (smem %zu)\n", i, smem); std::abort(); }
      }
}
}  // namespace emu

#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx emu::t_idx
#define blockIdx emu::b_idx
#define blockDim emu::b_dim
#define gridDim emu::g_dim

inline void __syncthreads() { emu::arrive_and_wait(emu::block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::arrive_and_wait(emu::warp().bar); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  auto& w = emu::warp();
  const int l = emu::lane();
  w.fv[l] = v;
  emu::arrive_and_wait(w.bar);
  const float r = w.fv[l ^ o];
  emu::arrive_and_wait(w.bar);
  return r;
}
inline void __trap() { std::abort(); }

// ---- fake CUDA runtime (the launchers' queries)
namespace emu_rt {
inline cudaError_t get_device(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t device_get_attribute(int* v, cudaDeviceAttr a, int) {
  const char* sms = std::getenv("EMU_SMS");
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = sms ? std::atoi(sms) : 4; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 166912; break;  // A100 (sm_80) limit
    case cudaDevAttrComputeCapabilityMajor: *v = 8; break;
    default: *v = 0;
  }
  return cudaSuccess;
}
template <class K>
inline cudaError_t func_set_attribute(K, cudaFuncAttribute, int v) {
  return v <= 166912 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t memset_async(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t get_last_error() { return cudaSuccess; }
}  // namespace emu_rt
