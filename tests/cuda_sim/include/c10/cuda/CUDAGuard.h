// kestrel_sim stand-in for c10/cuda/CUDAGuard.h: the torch-facing CUDA launchers run on CPU tensors (tests/cuda_sim).
#pragma once
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
