// Host-callable CUDA launchers: plain C++ signatures (no CUDA or torch types), so that the torch-facing
// launchers compile with the host compiler and the .cu files never include torch.
#pragma once

#include <stdint.h>

#include "kestrel/common.h"
#include "kestrel/optim.h"

namespace kestrel {
namespace cuda {

// Each returns a cudaError_t value (0 on success); `stream` is a cudaStream_t.
int quantize_blockwise(DType dtype, const void* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                       int blocksize, void* stream);
int dequantize_blockwise(DType dtype, const uint8_t* codes, const float* absmax, const float* code, void* out,
                         int64_t n, int blocksize, void* stream);

// One fused step of a two-state optimizer (Adam, AdEMAMix) over `num_tensors` parameters of one dtype: `meta`
// (device memory) describes them, block offsets ascending; `total_blocks` is the sum of their 256-element block
// counts. `qmap1`/`qmap2` (device, 256 floats each) are the signed and unsigned maps of the 8-bit states; ignored
// when !eight_bit.
int two_state_step(DType dtype, optim::TwoState kind, bool eight_bit, const optim::TensorMeta* meta,
                   int num_tensors, int64_t total_blocks, const float* qmap1, const float* qmap2, void* stream);

// The same for a one-state optimizer (state2/absmax2 of the metadata unused; qmap1 the signed map).
int one_state_step(DType dtype, optim::OneState kind, bool eight_bit, const optim::TensorMeta* meta,
                   int num_tensors, int64_t total_blocks, const float* qmap1, void* stream);

// LAMB (adam) / LARS norm pass over `num_tensors` parameters: each meta[i].norms_out (device, 2 floats) receives
// {sum u^2, sum p^2}; `block_sums` (device, 2 * total_blocks floats) is scratch. Deterministic.
int update_norms(DType dtype, bool adam, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                 int64_t total_blocks, const float* qmap1, const float* qmap2, float* block_sums, void* stream);

// Architectures this library's device code was compiled for, e.g. "sm_80/sm_90a".
const char* compiled_archs();

}  // namespace cuda
}  // namespace kestrel
