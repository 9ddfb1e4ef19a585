// Argument checks for the tree verification and KV-cache compaction ops, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>

namespace kestrel {

// The one place these ops' arguments are checked (kestrel.ops.tree_verify only unpacks a TreeBuffers): ValueError
// for shapes and devices, TypeError for dtypes, in Python's spelling ("(1, 3)", "torch.float32").
inline std::string py_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

inline std::string py_dtype(c10::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

inline void check_tree_tensor(const char* op, const char* name, const at::Tensor& t, c10::ScalarType dtype,
                              at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", py_shape(shape), ", got ",
                    py_shape(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", py_dtype(dtype), ", got ",
                   py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

// candidates (B, T) int64, first_child / next_sibling (B, T) int32 (a TreeBuffers' fields), 0 <= max_depth < T.
inline void check_tree_args(const char* op, const at::Tensor& candidates, const at::Tensor& first_child,
                            const at::Tensor& next_sibling, int64_t max_depth) {
  TORCH_CHECK_VALUE(candidates.dim() == 2 && candidates.size(1) >= 1, op,
                    ": candidates must be (B, T) with T >= 1, got ", py_shape(candidates.sizes()));
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kLong, op, ": candidates must be int64 (or int32) token ids, got ",
                   py_dtype(candidates.scalar_type()));
  const int64_t B = candidates.size(0), T = candidates.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"tree.first_child", first_child},
                                {"tree.next_sibling", next_sibling}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.sizes() == candidates.sizes(), op, ": ", name,
                      " must be an int32 tensor of shape (", B, ", ", T, ") like candidates, got ",
                      py_dtype(t.scalar_type()), " of shape ", py_shape(t.sizes()));
    TORCH_CHECK_VALUE(t.device() == candidates.device(), op, ": ", name, " must be on ", candidates.device(), ", got ",
                      t.device());
  }
  TORCH_CHECK_VALUE(max_depth >= 0 && max_depth < T, op, ": tree.max_depth must be in [0, T - 1] = [0, ", T - 1,
                    "], got ", max_depth);
}

inline void check_greedy_args(const at::Tensor& candidates, const at::Tensor& target_ids, const at::Tensor& first_child,
                              const at::Tensor& next_sibling, int64_t max_depth) {
  constexpr const char* op = "verify_tree_greedy";
  check_tree_args(op, candidates, first_child, next_sibling, max_depth);
  check_tree_tensor(op, "target_ids", target_ids, at::kLong, candidates.sizes(), candidates);
}

inline void check_sample_args(const at::Tensor& candidates, const at::Tensor& target_probs,
                              const at::Tensor& first_child, const at::Tensor& next_sibling, const at::Tensor& uniform,
                              const at::Tensor& uniform_final, const c10::optional<at::Tensor>& draft_probs,
                              int64_t max_depth) {
  constexpr const char* op = "verify_tree_sample";
  check_tree_args(op, candidates, first_child, next_sibling, max_depth);
  const int64_t B = candidates.size(0), T = candidates.size(1);
  TORCH_CHECK_VALUE(
      target_probs.dim() == 3 && target_probs.size(0) == B && target_probs.size(1) == T && target_probs.size(2) >= 1,
      op, ": target_probs must be (B, T, V) = (", B, ", ", T, ", V), got ", py_shape(target_probs.sizes()));
  check_tree_tensor(op, "target_probs", target_probs, at::kFloat, target_probs.sizes(), candidates);
  if (draft_probs.has_value())
    check_tree_tensor(op, "draft_probs", *draft_probs, at::kFloat, target_probs.sizes(), candidates);
  check_tree_tensor(op, "uniform", uniform, at::kFloat, candidates.sizes(), candidates);
  check_tree_tensor(op, "uniform_final", uniform_final, at::kFloat, {B}, candidates);
}

// k_cache / v_cache (B, H, Lmax, D) or (NL, B, H, Lmax, D) (D may differ between them), cache_seqlens (B,) int32,
// accept_index (B, W) int32 with W <= Lmax.
inline void check_compact_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                               const at::Tensor& accept_index) {
  constexpr const char* op = "compact_kv_cache";
  TORCH_CHECK_VALUE(k_cache.dim() == 4 || k_cache.dim() == 5, op,
                    ": k_cache must be (B, H, Lmax, D) or (NL, B, H, Lmax, D), got ", py_shape(k_cache.sizes()));
  TORCH_CHECK_VALUE(v_cache.dim() == k_cache.dim() &&
                        v_cache.sizes().slice(0, k_cache.dim() - 1) == k_cache.sizes().slice(0, k_cache.dim() - 1),
                    op, ": v_cache must match k_cache ", py_shape(k_cache.sizes()), " but for the last dim, got ",
                    py_shape(v_cache.sizes()));
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type() && v_cache.device() == k_cache.device(), op,
                   ": v_cache must have k_cache's dtype and device (", py_dtype(k_cache.scalar_type()), ", ",
                   k_cache.device(), "), got ", py_dtype(v_cache.scalar_type()), ", ", v_cache.device());
  const int64_t B = k_cache.size(k_cache.dim() - 4);
  check_tree_tensor(op, "cache_seqlens", cache_seqlens, at::kInt, {B}, k_cache);
  TORCH_CHECK_VALUE(accept_index.dim() == 2 && accept_index.size(0) == B && accept_index.size(1) >= 1, op,
                    ": accept_index must be (B, Dmax + 1) with B = ", B, ", got ", py_shape(accept_index.sizes()));
  check_tree_tensor(op, "accept_index", accept_index, at::kInt, accept_index.sizes(), k_cache);
  const auto elem = k_cache.element_size();
  TORCH_CHECK(elem == 1 || elem == 2 || elem == 4 || elem == 8, op, ": unsupported element size ", elem);
  // the same memory as K and V would have its rows moved twice
  const auto overlap = at::get_overlap_status(k_cache, v_cache);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
              ": k_cache and v_cache overlap in memory (the same tensor or views of one storage that share "
              "elements); pass two separate caches");
  if (overlap == at::MemOverlapStatus::TooHard && k_cache.numel() > 0 && v_cache.numel() > 0 &&
      k_cache.storage().is_alias_of(v_cache.storage())) {
    // strides too irregular for ATen's test: reject any intersection of the two byte ranges
    auto range = [](const at::Tensor& t) {
      int64_t last = 0;
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
      const auto begin = reinterpret_cast<intptr_t>(t.data_ptr());
      return std::make_pair(begin, begin + (last + 1) * static_cast<int64_t>(t.element_size()));
    };
    const auto k = range(k_cache), v = range(v_cache);
    TORCH_CHECK(k.second <= v.first || v.second <= k.first, op,
                ": k_cache and v_cache share a storage in overlapping byte ranges; pass two separate caches");
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache},
                                {"v_cache", v_cache},
                                {"cache_seqlens", cache_seqlens}})
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                " has elements that share memory (an expanded tensor); it is written in place");
}

}  // namespace kestrel
