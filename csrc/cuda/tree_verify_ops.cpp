// The native CUDA registrations of verify_tree_greedy, verify_tree_sample and compact_kv_cache: the op bodies of
// csrc/tree_verify_op.h with the NativeLauncher (the kernels in tree_verify.cu). Compiled by the host compiler.
#include <torch/library.h>

#include "../tree_verify_op.h"
#include "native_launcher.h"

namespace kestrel {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_cuda(const at::Tensor& candidates,
                                                                       const at::Tensor& target_ids,
                                                                       const at::Tensor& first_child,
                                                                       const at::Tensor& next_sibling,
                                                                       int64_t max_depth) {
  NativeLauncher launcher;
  return verify_tree_greedy_op(launcher, candidates, target_ids, first_child, next_sibling, max_depth);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_sample_cuda(
    const at::Tensor& candidates, const at::Tensor& target_probs, const at::Tensor& first_child,
    const at::Tensor& next_sibling, const at::Tensor& uniform, const at::Tensor& uniform_final,
    const c10::optional<at::Tensor>& draft_probs, int64_t max_depth) {
  NativeLauncher launcher;
  return verify_tree_sample_op(launcher, candidates, target_probs, first_child, next_sibling, uniform, uniform_final,
                               draft_probs, max_depth);
}

void compact_kv_cache_cuda(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& cache_seqlens,
                           const at::Tensor& accept_index) {
  NativeLauncher launcher;
  compact_kv_cache_op(launcher, k_cache, v_cache, cache_seqlens, accept_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CUDA, m) {
  m.impl("verify_tree_greedy", &verify_tree_greedy_cuda);
  m.impl("verify_tree_sample", &verify_tree_sample_cuda);
  m.impl("compact_kv_cache", &compact_kv_cache_cuda);
}

}  // namespace kestrel
