// CUDA kernels of draft-tree verification and KV-cache compaction. The walks are kestrel/tree_verify.h's, the same
// code the CPU kernels run. Framework-free; compiled by nvcc (csrc/cuda/tree_verify.cu) and by NVRTC (the JIT path).
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#endif

#include "kestrel/kernel_args.h"
#include "kestrel/tree_verify.h"

namespace kestrel {
namespace cuda {

// The block sizes and the argument structs: kestrel/kernel_args.h.
// Greedy: the walk is one scalar chain of dependent loads per row, so one thread per row.
__global__ void __launch_bounds__(kGreedyThreads) verify_greedy_kernel(const VerifyGreedyArgs a) {
  const int64_t* candidates = a.candidates;
  const int64_t* target_ids = a.target_ids;
  const int32_t* first_child = a.first_child;
  const int32_t* next_sibling = a.next_sibling;
  const int64_t batch = a.batch, num_nodes = a.num_nodes, max_depth = a.max_depth;
  int32_t* accept_index = a.accept_index;
  int32_t* accept_len = a.accept_len;
  int64_t* next_token = a.next_token;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t o = b * num_nodes;
  tree::verify_greedy_row(candidates + o, target_ids + o, first_child + o, next_sibling + o, num_nodes, max_depth,
                          accept_index + b * (max_depth + 1), accept_len + b, next_token + b);
}

// The threads of one block as the sampling walk's team: thread s owns vocabulary segment s.
struct TeamBlock {
  int64_t vocab;
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ float sums(const tree::Residual& weight, float* seg) const {
    __syncthreads();  // nobody still reads the previous sums
    seg[threadIdx.x] = tree::segment_sum_of(weight, vocab, threadIdx.x);
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < tree::kSegments; ++i) total += seg[i];
    return total;
  }
  template <typename Fn>
  __device__ void update(const Fn& fn) const {
    const int s = threadIdx.x;
    const int64_t end = tree::segment_end(vocab, s);
    for (int64_t v = tree::segment_begin(vocab, s); v < end; ++v) fn(v);
  }
};

// Sampling: one block of kSegments threads per row; every thread runs the walk's scalar steps.
__global__ void __launch_bounds__(tree::kSegments) verify_sample_kernel(const VerifySampleArgs a) {
  const int64_t* candidates = a.candidates;
  const float* target_probs = a.target_probs;
  const float* draft_probs = a.draft_probs;
  const int32_t* first_child = a.first_child;
  const int32_t* next_sibling = a.next_sibling;
  const float* uniform = a.uniform;
  const float* uniform_final = a.uniform_final;
  float* scratch = a.scratch;
  int64_t* excluded = a.excluded;
  const int64_t num_nodes = a.num_nodes, vocab = a.vocab, max_depth = a.max_depth;
  int32_t* accept_index = a.accept_index;
  int32_t* accept_len = a.accept_len;
  int64_t* next_token = a.next_token;
  __shared__ float seg[tree::kSegments];
  const int64_t b = blockIdx.x;
  const int64_t o = b * num_nodes;
  const tree::SampleRow row{candidates + o,
                            target_probs + o * vocab,
                            draft_probs ? draft_probs + o * vocab : nullptr,
                            first_child + o,
                            next_sibling + o,
                            uniform + o,
                            uniform_final[b],
                            scratch ? scratch + b * vocab : nullptr,
                            num_nodes,
                            vocab,
                            max_depth};
  TeamBlock team{vocab};
  tree::verify_sample_row(team, row, excluded + o, seg, accept_index + b * (max_depth + 1), accept_len + b,
                          next_token + b);
}

// Compaction: block (layer * B + b) * H + h of blockIdx.x, blockIdx.y picks k or v; threads split the columns and
// each runs the rows in ascending order (safe in place, see kestrel/tree_verify.h).
template <typename Elem>
__global__ void __launch_bounds__(kCompactThreads) compact_kernel(const CompactArgs a) {
  const int32_t* cache_seqlens = a.cache_seqlens;
  const int32_t* accept_index = a.accept_index;
  const int64_t width = a.width, batch = a.batch, heads = a.heads, max_len = a.max_len;
  const tree::CacheView& c = blockIdx.y == 0 ? a.k : a.v;
  const int64_t r = blockIdx.x;
  const int64_t l = r / (batch * heads), b = (r / heads) % batch, h = r % heads;
  const int32_t* index = accept_index + b * width;
  const int32_t accepted = tree::accepted_length(index, width);
  const int64_t len = cache_seqlens[b];
  int64_t where;
  // the CPU rejects an invalid row; on the GPU (no sync to report) neither the row nor its length changes
  if (tree::check_compaction_row(index, width, len, max_len, &where) != tree::kRowOk) return;
  Elem* rows =
      static_cast<Elem*>(c.data) + l * c.stride_layer + b * c.stride_batch + h * c.stride_head + len * c.stride_pos;
  for (int64_t d = threadIdx.x; d < c.head_dim; d += blockDim.x) {
    for (int32_t j = 1; j <= accepted; ++j) {
      const int64_t node = index[j];
      if (node == j) continue;
      rows[j * c.stride_pos + d * c.stride_dim] = rows[node * c.stride_pos + d * c.stride_dim];
    }
  }
}

__global__ void __launch_bounds__(kSeqlensThreads) advance_seqlens_kernel(const CompactArgs a) {
  int32_t* cache_seqlens = a.cache_seqlens;
  const int32_t* accept_index = a.accept_index;
  const int64_t width = a.width, batch = a.batch, max_len = a.max_len;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int32_t* index = accept_index + b * width;
  int64_t where;
  if (tree::check_compaction_row(index, width, cache_seqlens[b], max_len, &where) == tree::kRowOk)
    cache_seqlens[b] += 1 + tree::accepted_length(index, width);
}

}  // namespace cuda
}  // namespace kestrel
