// The ISA dispatch of the CPU kernels (isa.h) and the element loops of vec_loops.h, built per ISA
// and picked at run time: an AVX-512 build on x86 (the key-major kernels, the loops' only users,
// run only at isa() = avx512: brgemm needs it) and the baseline build everywhere (on AArch64 it
// vectorises with NEON, part of the baseline). Torch-free but for TORCH_CHECK: no ATen header, so
// this unit compiles fast.
#include "vec_loops.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <string>

#if defined(__GNUC__) && !defined(__clang__)
#define DANET_OPS_NO_TRAP __attribute__((optimize("no-trapping-math")))
#else
#define DANET_OPS_NO_TRAP  // clang: FP exceptions are ignored by default
#endif

namespace danet_ops {
namespace cpu {
namespace {

#if defined(DANET_OPS_X86)
#define DANET_OPS_VEC_NS avx512
#define DANET_OPS_VEC_ATTR __attribute__((target("avx512f"))) DANET_OPS_NO_TRAP
#include "vec_loops_impl.h"
#undef DANET_OPS_VEC_NS
#undef DANET_OPS_VEC_ATTR
#endif

#define DANET_OPS_VEC_NS baseline
#define DANET_OPS_VEC_ATTR DANET_OPS_NO_TRAP
#include "vec_loops_impl.h"
#undef DANET_OPS_VEC_NS
#undef DANET_OPS_VEC_ATTR

}  // namespace

Isa isa_detected() {
#if defined(DANET_OPS_X86)
  // The test GCC's target_clones resolver makes (CPUID and the OS's XSAVE state).
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return best;
#else
  return Isa::kDefault;
#endif
}

const char* isa_name(Isa level) {
  switch (level) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kDefault: return "default";
  }
  return "default";
}

Isa isa() {
  const Isa best = isa_detected();
  const char* s = std::getenv("DANET_OPS_CPU_ISA");
  if (s == nullptr || s[0] == '\0') return best;
  std::string v(s);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  Isa cap = Isa::kDefault;
  if (v == "avx512") cap = Isa::kAvx512;
  else if (v == "avx2") cap = Isa::kAvx2;
  else TORCH_CHECK(v == "default", "DANET_OPS_CPU_ISA must be avx512, avx2 or default (the highest "
                   "ISA the danet_ops CPU kernels may use); got '", s, "'");
  return std::min(best, cap);
}

const VecLoops& vec_loops(Isa level) {
#if defined(DANET_OPS_X86)
  if (level == Isa::kAvx512) return avx512::table;
#endif
  (void)level;
  return baseline::table;
}

}  // namespace cpu
}  // namespace danet_ops
