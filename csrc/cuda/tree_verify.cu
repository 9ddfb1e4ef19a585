// CUDA kernels for draft-tree verification and KV-cache compaction. The walks are kestrel/tree_verify.h's, the
// same code the CPU kernels run. Never includes torch.
#include "kestrel/cuda_launch.h"
#include "kestrel/launch.h"
#include "kestrel/tree_verify.h"

namespace kestrel {
namespace cuda {
namespace {

constexpr int kGreedyThreads = 128;
constexpr int kCompactThreads = 128;

// Greedy: the walk is one scalar chain of dependent loads per row, so one thread per row.
__global__ void verify_greedy_kernel(const int64_t* candidates, const int64_t* target_ids, const int32_t* first_child,
                                     const int32_t* next_sibling, int64_t batch, int64_t num_nodes, int64_t max_depth,
                                     int32_t* accept_index, int32_t* accept_len, int64_t* next_token) {
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
__global__ void __launch_bounds__(tree::kSegments)
    verify_sample_kernel(const int64_t* candidates, const float* target_probs, const float* draft_probs,
                         const int32_t* first_child, const int32_t* next_sibling, const float* uniform,
                         const float* uniform_final, float* scratch, int64_t* excluded, int64_t num_nodes,
                         int64_t vocab, int64_t max_depth, int32_t* accept_index, int32_t* accept_len,
                         int64_t* next_token) {
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
__global__ void compact_kernel(tree::CacheView k, tree::CacheView v, const int32_t* cache_seqlens,
                               const int32_t* accept_index, int64_t width, int64_t batch, int64_t heads,
                               int64_t max_len) {
  const tree::CacheView& c = blockIdx.y == 0 ? k : v;
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

__global__ void advance_seqlens_kernel(int32_t* cache_seqlens, const int32_t* accept_index, int64_t width,
                                       int64_t batch, int64_t max_len) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int32_t* index = accept_index + b * width;
  int64_t where;
  if (tree::check_compaction_row(index, width, cache_seqlens[b], max_len, &where) == tree::kRowOk)
    cache_seqlens[b] += 1 + tree::accepted_length(index, width);
}

template <typename Elem>
cudaError_t launch_compact(const tree::CacheView& k, const tree::CacheView& v, int32_t* cache_seqlens,
                           const int32_t* accept_index, int64_t width, int64_t layers, int64_t batch, int64_t heads,
                           int64_t max_len, cudaStream_t stream) {
  const int64_t blocks = layers * batch * heads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (blocks > 0) {
    KESTREL_LAUNCH((dim3(static_cast<unsigned>(blocks), 2)), kCompactThreads, 0, stream, compact_kernel<Elem>)(
        k, v, cache_seqlens, accept_index, width, batch, heads, max_len);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (batch == 0) return cudaSuccess;  // an empty grid is an invalid launch
  KESTREL_LAUNCH(static_cast<unsigned>((batch + 127) / 128), 128, 0, stream, advance_seqlens_kernel)(
      cache_seqlens, accept_index, width, batch, max_len);
  return cudaGetLastError();
}

}  // namespace

int verify_tree_greedy(const int64_t* candidates, const int64_t* target_ids, const int32_t* first_child,
                       const int32_t* next_sibling, int64_t batch, int64_t num_nodes, int64_t max_depth,
                       int32_t* accept_index, int32_t* accept_len, int64_t* next_token, void* stream) {
  if (batch == 0) return cudaSuccess;
  const int64_t blocks = (batch + kGreedyThreads - 1) / kGreedyThreads;
  KESTREL_LAUNCH(static_cast<unsigned>(blocks), kGreedyThreads, 0, static_cast<cudaStream_t>(stream),
                 verify_greedy_kernel)(candidates, target_ids, first_child, next_sibling, batch, num_nodes, max_depth,
                                       accept_index, accept_len, next_token);
  return cudaGetLastError();
}

int verify_tree_sample(const int64_t* candidates, const float* target_probs, const float* draft_probs,
                       const int32_t* first_child, const int32_t* next_sibling, const float* uniform,
                       const float* uniform_final, float* scratch, int64_t* excluded, int64_t batch, int64_t num_nodes,
                       int64_t vocab, int64_t max_depth, int32_t* accept_index, int32_t* accept_len,
                       int64_t* next_token, void* stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 0x7fffffffLL) return cudaErrorInvalidValue;
  KESTREL_LAUNCH(static_cast<unsigned>(batch), tree::kSegments, 0, static_cast<cudaStream_t>(stream),
                 verify_sample_kernel)(candidates, target_probs, draft_probs, first_child, next_sibling, uniform,
                                       uniform_final, scratch, excluded, num_nodes, vocab, max_depth, accept_index,
                                       accept_len, next_token);
  return cudaGetLastError();
}

int compact_kv_cache(int element_size, const tree::CacheView& k, const tree::CacheView& v, int32_t* cache_seqlens,
                     const int32_t* accept_index, int64_t width, int64_t layers, int64_t batch, int64_t heads,
                     int64_t max_len, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (element_size) {
    case 1:
      return launch_compact<uint8_t>(k, v, cache_seqlens, accept_index, width, layers, batch, heads, max_len, s);
    case 2:
      return launch_compact<uint16_t>(k, v, cache_seqlens, accept_index, width, layers, batch, heads, max_len, s);
    case 4:
      return launch_compact<uint32_t>(k, v, cache_seqlens, accept_index, width, layers, batch, heads, max_len, s);
    case 8:
      return launch_compact<uint64_t>(k, v, cache_seqlens, accept_index, width, layers, batch, heads, max_len, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kestrel
