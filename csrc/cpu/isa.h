// The ISA the CPU kernels' element loops dispatch to (vec_loops.h), implemented in vec_loops.cpp.
// The loops are compiled for AVX-512, AVX2 and the baseline on x86 and chosen per call: the best
// the CPU (and OS) supports, capped by DANET_OPS_CPU_ISA = avx512 | avx2 | default
// (case-insensitive; unset or empty: no cap; any other value: a RuntimeError). Below avx512 the
// low-precision paths are not taken by default and brgemm is never used (select_path in
// lowp_gemm.h), as on a CPU without AVX512-BF16. On other architectures: always kDefault.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define DANET_OPS_X86 1  // x86-only code (intrinsics, target attributes) is guarded by this
#endif

namespace danet_ops {
namespace cpu {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
Isa isa_detected();  // the CPU's best, detected once
Isa isa();           // isa_detected() capped by DANET_OPS_CPU_ISA, read on every call
const char* isa_name(Isa level);  // "avx512", "avx2", "default"

}  // namespace cpu
}  // namespace danet_ops
