// kestrel_sim stand-in for c10/cuda/CUDAStream.h: one (null) stream; launches run synchronously on the CPU.
#pragma once
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) {
  return {};
}
}  // namespace cuda
}  // namespace c10
