// The contract's output-dtype rule for the C++ ops (CPU kernels and CUDA bindings). Its Python
// twin is danet_ops/_contract.py output_dtype; tests/test_contract.py checks the compiled ops
// against it for every dtype combination. Torch-side (at::ScalarType): never included by a .cu.
#pragma once

#include <ATen/ATen.h>

namespace danet_ops {
namespace contract {

// y = gamma * O + x has the reference's dtype promote(promote(value, x), gamma): gamma is a [1]
// tensor, so it takes part. (CAM: value = x.) O alone keeps the compute dtype.
inline at::ScalarType output_dtype(at::ScalarType value, at::ScalarType x, at::ScalarType gamma) {
  return at::promote_types(at::promote_types(value, x), gamma);
}

}  // namespace contract
}  // namespace danet_ops
