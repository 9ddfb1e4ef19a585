// Host-callable CUDA launchers: plain C++ signatures (no CUDA or torch types), so that the torch-facing
// launchers compile with the host compiler and the .cu files never include torch. Each takes its kernels' argument
// struct (kestrel/kernel_args.h), launches what kestrel/launch_plan.h plans for it on `stream` (a cudaStream_t) and
// returns a cudaError_t value (0 on success; cudaErrorInvalidValue for sizes the plan cannot launch).
#pragma once

#include <stdint.h>

#include "kestrel/common.h"
#include "kestrel/kernel_args.h"

namespace kestrel {
namespace cuda {

// Block-wise quantization of args.n elements in blocks of args.blocksize (any positive blocksize; the powers of
// two in [64, 4096] take the register-resident kernel).
int quantize_blockwise(DType dtype, const QuantizeArgs& args, void* stream);
int dequantize_blockwise(DType dtype, const DequantizeArgs& args, void* stream);

// One fused step of a two-state (kind: optim::TwoState) or one-state (optim::OneState) optimizer over
// args.num_tensors parameters of one dtype; args.meta (device memory) describes them, block offsets ascending.
int step(DType dtype, bool two_state, int kind, bool eight_bit, const StepArgs& args, void* stream);

// LAMB (adam) / LARS norm pass: each meta[i].norms_out (device, 2 floats) receives {sum u^2, sum p^2};
// args.block_sums (device, 2 * total_blocks floats) is scratch. Deterministic.
int update_norms(DType dtype, bool adam, bool eight_bit, const StepArgs& args, void* stream);

// Draft-tree verification (kestrel/tree_verify.h), contiguous (B, T[, V]) inputs; accept_index (B, max_depth + 1)
// is written whole.
int verify_tree_greedy(const VerifyGreedyArgs& args, void* stream);
int verify_tree_sample(const VerifySampleArgs& args, void* stream);
// KV-cache compaction of k and v (one launch for every layer and head) and cache_seqlens += 1 + accept_len (a
// second, one-thread-per-sequence launch); rows outside [0, max_len) are skipped.
int compact_kv_cache(int element_size, const CompactArgs& args, void* stream);

// Architectures this library's device code was compiled for, e.g. "sm_80/sm_90a".
const char* compiled_archs();

}  // namespace cuda
}  // namespace kestrel
