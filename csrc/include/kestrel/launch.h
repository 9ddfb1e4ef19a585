// Host-callable CUDA launchers: plain C++ signatures (no CUDA or torch types), so that the torch-facing
// launchers compile with the host compiler and the .cu files never include torch.
#pragma once

#include <stdint.h>

#include "kestrel/common.h"

namespace kestrel {
namespace cuda {

// Each returns a cudaError_t value (0 on success); `stream` is a cudaStream_t.
int quantize_blockwise(DType dtype, const void* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                       int blocksize, void* stream);
int dequantize_blockwise(DType dtype, const uint8_t* codes, const float* absmax, const float* code, void* out,
                         int64_t n, int blocksize, void* stream);

// Architectures this library's device code was compiled for, e.g. "sm_80/sm_90a".
const char* compiled_archs();

}  // namespace cuda
}  // namespace kestrel
