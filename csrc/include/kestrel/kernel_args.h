// The argument of every CUDA kernel, one struct per kernel family, and the launch constants (block sizes, work
// splits) that both the kernels and their launch plans (kestrel/launch_plan.h) use.
//
// Each kernel takes exactly one of these structs by value. The native launchers (csrc/cuda/*.cu) pass it to
// kernel<<<...>>>(args); the JIT path (python/kestrel/_jit.py) passes the same struct's bytes, filled by the same C++
// code, as the kernel's parameter buffer (cuLaunchKernel's CU_LAUNCH_PARAM_BUFFER_POINTER). One layout, written once,
// so the two paths cannot disagree on an argument's order or type. Framework-free; compiled by the host compiler,
// nvcc and NVRTC.
#pragma once

#include "kestrel/common.h"
#include "kestrel/optim.h"
#include "kestrel/tree_verify.h"

namespace kestrel {
namespace cuda {

// Block-wise quantization (kestrel/quantize.cuh).
constexpr int kQuantizeThreads = 256;
constexpr int kDequantizeThreads = 256;
constexpr int kDequantizeItems = 4;
constexpr int64_t kMaxGridStrideCtas = 65536;  // grid-stride kernels launch at most this many CTAs

// Work split for one quantization block of BLOCK elements (a power of two in [64, 4096]): TPB threads, ITEMS
// elements each, strided by TPB so that a group's loads are coalesced; a CTA of kQuantizeThreads threads covers
// QB_PER_CTA blocks.
template <int BLOCK>
struct QuantizeShape {
  static constexpr int ITEMS = BLOCK / kQuantizeThreads > 4 ? BLOCK / kQuantizeThreads : 4;
  static constexpr int TPB = BLOCK / ITEMS;
  static constexpr int QB_PER_CTA = kQuantizeThreads / TPB;
  static_assert(TPB * ITEMS == BLOCK && TPB * QB_PER_CTA == kQuantizeThreads, "unsupported blocksize");
};

// QuantizeShape<block>::QB_PER_CTA for a run-time block (a power of two in [64, 4096]).
KESTREL_HD int quantize_blocks_per_cta(int64_t block) {
  const int64_t items = block / kQuantizeThreads > 4 ? block / kQuantizeThreads : 4;
  return static_cast<int>(kQuantizeThreads / (block / items));
}

struct QuantizeArgs {
  const void* x;  // float32, float16 or bfloat16 (the kernel's T)
  const float* code;
  uint8_t* codes;
  float* absmax;
  int64_t n;
  int64_t blocksize;   // quantize_blockwise_any_kernel (the other kernel's BLOCK is a template argument)
  int64_t num_blocks;  // ceil(n / blocksize)
};

struct DequantizeArgs {
  const uint8_t* codes;
  const float* absmax;
  const float* code;
  void* out;  // the kernel's T
  int64_t n;
  int64_t blocksize;
  int log2_blocksize;  // -1: not a power of two (the kernel divides)
};

// The fused optimizer steps and the norm pass (kestrel/optim.cuh): kStepThreads per CTA, a warp per 256-element
// block.
constexpr int kStepThreads = 256;
constexpr int kStepWarps = kStepThreads / 32;

struct StepArgs {
  const optim::TensorMeta* meta;  // device memory, num_tensors entries, block offsets ascending
  int num_tensors;
  int64_t total_blocks;
  const float* qmap1;  // 8-bit states: the signed map
  const float* qmap2;  // two-state 8-bit: the unsigned map; unused otherwise
  float* block_sums;   // the norm pass only: 2 * total_blocks floats of scratch
};

// Draft-tree verification and KV-cache compaction (kestrel/tree_verify.cuh).
constexpr int kGreedyThreads = 128;
constexpr int kCompactThreads = 128;
constexpr int kSeqlensThreads = 128;

struct VerifyGreedyArgs {
  const int64_t* candidates;
  const int64_t* target_ids;
  const int32_t* first_child;
  const int32_t* next_sibling;
  int64_t batch, num_nodes, max_depth;
  int32_t* accept_index;
  int32_t* accept_len;
  int64_t* next_token;
};

struct VerifySampleArgs {
  const int64_t* candidates;
  const float* target_probs;
  const float* draft_probs;  // nullptr: deterministic drafts
  const int32_t* first_child;
  const int32_t* next_sibling;
  const float* uniform;
  const float* uniform_final;
  float* scratch;     // (B, V) with sampled drafts, else nullptr
  int64_t* excluded;  // (B, T)
  int64_t batch, num_nodes, vocab, max_depth;
  int32_t* accept_index;
  int32_t* accept_len;
  int64_t* next_token;
};

struct CompactArgs {
  tree::CacheView k, v;
  int32_t* cache_seqlens;
  const int32_t* accept_index;
  int64_t width, layers, batch, heads, max_len;
};

}  // namespace cuda
}  // namespace kestrel
