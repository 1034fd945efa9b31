// The ISA level the CPU kernels dispatch to (implemented in vec_loops.cpp): the best the CPU and
// OS support (avx512: AVX-512F; avx2; default: the baseline of the build's architecture), capped
// by DANET_OPS_CPU_ISA = avx512 | avx2 | default, read on every call (case-insensitive; unset or
// empty: no cap; any other value: a RuntimeError). It decides
//  * the element loops of the key-major kernels (vec_loops.h): the AVX-512 build at avx512;
//  * the low-precision paths (select_path in lowp_gemm.h): below avx512 bf16/fp16 default to
//    fp32 tiles and brgemm is never used, as on a CPU without AVX512-BF16 (so avx2 and default
//    select the same kernels today; avx2 names what an AVX2-only CPU reports).
// On other architectures the level is always default.
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
