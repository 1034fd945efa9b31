"""The op contract in one place: size limits, CAM modes, the dtype rules.

Python (validation, modules, fake kernels, Triton hosts) imports it; the C++/CUDA sources get the
same numbers from csrc/contract.h, which is generated from this file
(`python -m danet_ops._contract > csrc/contract.h`) and checked against it by
tests/test_contract.py. C++ keeps only memory-safety checks with these constants.
"""
import torch

# PAM: E = scale * q^T k with Cq channels, values with Cv channels (any N >= 0, 64-bit offsets).
CQ_MIN, CQ_MAX = 1, 256
CV_MIN, CV_MAX = 1, 4096
# CAM: any C >= 1 on the CPU and Triton backends; the CUDA kernels keep one [C] fp32 row of the
# softmax in shared memory, which caps C there.
CAM_C_MIN = 1
CAM_C_MAX = {"cuda": 16384}
CAM_MODES = ("original", "paper")    # "original": softmax(rowmax(E) - E) (released code); "paper": softmax(E)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def output_dtype(value_dtype, x_dtype=None, gamma_dtype=None):
    """dtype of the result: the reference's gamma * O + x, i.e. promote(v, x, gamma) (gamma is a
    [1] tensor, so it takes part); O alone keeps v's dtype."""
    if x_dtype is None:
        return value_dtype
    return torch.promote_types(torch.promote_types(value_dtype, x_dtype), gamma_dtype)


def stats_dtype(dtype):
    """dtype of the softmax statistics (lse, CAM's A), dgamma, and of pam_forward's O on every
    fused backend (the backward's Delta = sum dO*O reads it): fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def header():
    """csrc/contract.h: the constants above for C++/CUDA (generated; do not edit by hand)."""
    lines = [
        "// Generated from danet_ops/_contract.py by `python -m danet_ops._contract`: do not edit.",
        "// tests/test_contract.py checks that this file matches the Python contract.",
        "#pragma once",
        "#include <cstdint>",
        "",
        "namespace danet_ops {",
        "namespace contract {",
        f"constexpr int64_t kCqMin = {CQ_MIN}, kCqMax = {CQ_MAX};",
        f"constexpr int64_t kCvMin = {CV_MIN}, kCvMax = {CV_MAX};",
        f"constexpr int64_t kCamCMin = {CAM_C_MIN}, kCamCMaxCuda = {CAM_C_MAX['cuda']};",
        f'constexpr const char* kCamModeOriginal = "{CAM_MODES[0]}";',
        f'constexpr const char* kCamModePaper = "{CAM_MODES[1]}";',
        "}  // namespace contract",
        "}  // namespace danet_ops",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(header(), end="")
