// Host-callable CUDA launchers: plain C++ signatures (no CUDA or torch types), so that the torch-facing
// launchers compile with the host compiler and the .cu files never include torch.
#pragma once

#include <stdint.h>

#include "kestrel/common.h"
#include "kestrel/optim.h"
#include "kestrel/tree_verify.h"

namespace kestrel {
namespace cuda {

// Each returns a cudaError_t value (0 on success); `stream` is a cudaStream_t.
// Any positive blocksize; the powers of two in [64, 4096] take the register-resident kernel.
int quantize_blockwise(DType dtype, const void* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                       int64_t blocksize, void* stream);
int dequantize_blockwise(DType dtype, const uint8_t* codes, const float* absmax, const float* code, void* out,
                         int64_t n, int64_t blocksize, void* stream);

// One fused step of a two-state optimizer (Adam, AdEMAMix) over `num_tensors` parameters of one dtype: `meta`
// (device memory) describes them, block offsets ascending; `total_blocks` is the sum of their 256-element block
// counts. `qmap1`/`qmap2` (device, 256 floats each) are the signed and unsigned maps of the 8-bit states; ignored
// when !eight_bit.
int two_state_step(DType dtype, optim::TwoState kind, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                   int64_t total_blocks, const float* qmap1, const float* qmap2, void* stream);

// The same for a one-state optimizer (state2/absmax2 of the metadata unused; qmap1 the signed map).
int one_state_step(DType dtype, optim::OneState kind, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                   int64_t total_blocks, const float* qmap1, void* stream);

// LAMB (adam) / LARS norm pass over `num_tensors` parameters: each meta[i].norms_out (device, 2 floats) receives
// {sum u^2, sum p^2}; `block_sums` (device, 2 * total_blocks floats) is scratch. Deterministic.
int update_norms(DType dtype, bool adam, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                 int64_t total_blocks, const float* qmap1, const float* qmap2, float* block_sums, void* stream);

// Draft-tree verification (kestrel/tree_verify.h), one launch each; contiguous (B, T[, V]) inputs.
// accept_index (B, max_depth + 1) is written whole. verify_tree_sample: draft_probs and scratch (B, V floats) are
// null for deterministic drafts; excluded is (B, T) int64 scratch.
int verify_tree_greedy(const int64_t* candidates, const int64_t* target_ids, const int32_t* first_child,
                       const int32_t* next_sibling, int64_t batch, int64_t num_nodes, int64_t max_depth,
                       int32_t* accept_index, int32_t* accept_len, int64_t* next_token, void* stream);
int verify_tree_sample(const int64_t* candidates, const float* target_probs, const float* draft_probs,
                       const int32_t* first_child, const int32_t* next_sibling, const float* uniform,
                       const float* uniform_final, float* scratch, int64_t* excluded, int64_t batch, int64_t num_nodes,
                       int64_t vocab, int64_t max_depth, int32_t* accept_index, int32_t* accept_len,
                       int64_t* next_token, void* stream);
// KV-cache compaction of k and v (one launch for every layer and head) and cache_seqlens += 1 + accept_len (a
// second, one-thread-per-sequence launch); rows outside [0, max_len) are skipped.
int compact_kv_cache(int element_size, const tree::CacheView& k, const tree::CacheView& v, int32_t* cache_seqlens,
                     const int32_t* accept_index, int64_t width, int64_t layers, int64_t batch, int64_t heads,
                     int64_t max_len, void* stream);

// Architectures this library's device code was compiled for, e.g. "sm_80/sm_90a".
const char* compiled_archs();

}  // namespace cuda
}  // namespace kestrel
