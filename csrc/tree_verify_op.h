// The device (CUDA) implementations of verify_tree_greedy, verify_tree_sample and compact_kv_cache, written once for
// the native launchers (csrc/cuda/tree_verify_ops.cpp) and the JIT path (csrc/jit_ops.cpp): checks, outputs, the
// kernels' argument structs; the Launcher runs what kestrel/launch_plan.h plans (see optim_op.h for the Launcher).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <tuple>

#include "kestrel/kernel_args.h"
#include "tree_verify_checks.h"

namespace kestrel {

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_op(
    Launcher& launcher, const at::Tensor& candidates_in, const at::Tensor& target_ids_in,
    const at::Tensor& first_child_in, const at::Tensor& next_sibling_in, int64_t max_depth) {
  check_greedy_args(candidates_in, target_ids_in, first_child_in, next_sibling_in, max_depth);
  const c10::DeviceGuard guard(candidates_in.device());
  const at::Tensor candidates = candidates_in.contiguous(), target_ids = target_ids_in.contiguous();
  const at::Tensor first_child = first_child_in.contiguous(), next_sibling = next_sibling_in.contiguous();
  const int64_t B = candidates.size(0), T = candidates.size(1);
  at::Tensor accept_index = at::empty({B, max_depth + 1}, candidates.options().dtype(at::kInt));
  at::Tensor accept_len = at::empty({B}, candidates.options().dtype(at::kInt));
  at::Tensor next_token = at::empty({B}, candidates.options().dtype(at::kLong));
  cuda::VerifyGreedyArgs args{candidates.data_ptr<int64_t>(),
                              target_ids.data_ptr<int64_t>(),
                              first_child.data_ptr<int32_t>(),
                              next_sibling.data_ptr<int32_t>(),
                              B,
                              T,
                              max_depth,
                              accept_index.data_ptr<int32_t>(),
                              accept_len.data_ptr<int32_t>(),
                              next_token.data_ptr<int64_t>()};
  for (const at::Tensor& t : {candidates, target_ids, first_child, next_sibling}) launcher.hold(t);
  launcher.verify_greedy(args);
  return {accept_index, accept_len, next_token};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_sample_op(
    Launcher& launcher, const at::Tensor& candidates_in, const at::Tensor& target_probs_in,
    const at::Tensor& first_child_in, const at::Tensor& next_sibling_in, const at::Tensor& uniform_in,
    const at::Tensor& uniform_final_in, const std::optional<at::Tensor>& draft_probs_in, int64_t max_depth) {
  check_sample_args(candidates_in, target_probs_in, first_child_in, next_sibling_in, uniform_in, uniform_final_in,
                    draft_probs_in, max_depth);
  const c10::DeviceGuard guard(candidates_in.device());
  const at::Tensor candidates = candidates_in.contiguous(), target_probs = target_probs_in.contiguous();
  const at::Tensor first_child = first_child_in.contiguous(), next_sibling = next_sibling_in.contiguous();
  const at::Tensor uniform = uniform_in.contiguous(), uniform_final = uniform_final_in.contiguous();
  const bool sampled = draft_probs_in.has_value();
  const at::Tensor draft_probs = sampled ? draft_probs_in->contiguous() : at::Tensor();
  const int64_t B = candidates.size(0), T = candidates.size(1), V = target_probs.size(2);
  at::Tensor accept_index = at::empty({B, max_depth + 1}, candidates.options().dtype(at::kInt));
  at::Tensor accept_len = at::empty({B}, candidates.options().dtype(at::kInt));
  at::Tensor next_token = at::empty({B}, candidates.options().dtype(at::kLong));
  at::Tensor excluded = at::empty({B, T}, candidates.options().dtype(at::kLong));
  at::Tensor scratch = sampled ? at::empty({B, V}, target_probs.options()) : at::Tensor();
  cuda::VerifySampleArgs args{candidates.data_ptr<int64_t>(),
                              target_probs.data_ptr<float>(),
                              sampled ? draft_probs.data_ptr<float>() : nullptr,
                              first_child.data_ptr<int32_t>(),
                              next_sibling.data_ptr<int32_t>(),
                              uniform.data_ptr<float>(),
                              uniform_final.data_ptr<float>(),
                              sampled ? scratch.data_ptr<float>() : nullptr,
                              excluded.data_ptr<int64_t>(),
                              B,
                              T,
                              V,
                              max_depth,
                              accept_index.data_ptr<int32_t>(),
                              accept_len.data_ptr<int32_t>(),
                              next_token.data_ptr<int64_t>()};
  for (const at::Tensor& t : {candidates, target_probs, first_child, next_sibling, uniform, uniform_final, excluded})
    launcher.hold(t);
  if (sampled) {
    launcher.hold(draft_probs);
    launcher.hold(scratch);
  }
  launcher.verify_sample(args);
  return {accept_index, accept_len, next_token};
}

inline tree::CacheView cache_view(const at::Tensor& cache) {
  const int64_t off = cache.dim() == 5 ? 1 : 0;
  return tree::CacheView{cache.data_ptr(),      off ? cache.stride(0) : 0, cache.stride(off),  cache.stride(off + 1),
                         cache.stride(off + 2), cache.stride(off + 3),     cache.size(off + 3)};
}

template <typename Launcher>
void compact_kv_cache_op(Launcher& launcher, at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& cache_seqlens,
                         const at::Tensor& accept_index_in) {
  check_compact_args(k_cache, v_cache, cache_seqlens, accept_index_in);
  TORCH_CHECK(cache_seqlens.is_contiguous(), "compact_kv_cache: cache_seqlens must be contiguous");
  const c10::DeviceGuard guard(k_cache.device());
  const at::Tensor accept_index = accept_index_in.contiguous();
  const int64_t off = k_cache.dim() == 5 ? 1 : 0;
  cuda::CompactArgs args{cache_view(k_cache),
                         cache_view(v_cache),
                         cache_seqlens.data_ptr<int32_t>(),
                         accept_index.data_ptr<int32_t>(),
                         accept_index.size(1),
                         off ? k_cache.size(0) : 1,
                         k_cache.size(off),
                         k_cache.size(off + 1),
                         k_cache.size(off + 2)};
  launcher.hold(accept_index);
  launcher.compact(static_cast<int>(k_cache.element_size()), args);
}

}  // namespace kestrel
