// Generated from danet_ops/_contract.py by `python -m danet_ops._contract`: do not edit.
// tests/test_contract.py checks that this file matches the Python contract.
#pragma once
#include <cstdint>

namespace danet_ops {
namespace contract {
constexpr int64_t kCqMin = 1, kCqMax = 256;
constexpr int64_t kCvMin = 1, kCvMax = 4096;
constexpr int64_t kCamCMin = 1, kCamCMaxCuda = 16384;
constexpr const char* kCamModeOriginal = "original";
constexpr const char* kCamModePaper = "paper";
}  // namespace contract
}  // namespace danet_ops
