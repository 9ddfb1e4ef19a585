// kestrel_sim stand-in for c10/cuda/CUDAException.h.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const cudaError_t kestrel_sim_error = (EXPR);                                     \
    TORCH_CHECK(kestrel_sim_error == cudaSuccess,                                     \
                "CUDA error (kestrel_sim): ", cudaGetErrorString(kestrel_sim_error)); \
  } while (0)
