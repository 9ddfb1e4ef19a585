// CPU kernels for draft-tree verification and KV-cache compaction: rows in parallel (at::parallel_for), each row's
// walk from kestrel/tree_verify.h, the same code the CUDA kernels run.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../tree_verify_checks.h"
#include "kestrel/tree_verify.h"

namespace kestrel {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_cpu(const at::Tensor& candidates_in,
                                                                      const at::Tensor& target_ids_in,
                                                                      const at::Tensor& first_child_in,
                                                                      const at::Tensor& next_sibling_in,
                                                                      int64_t max_depth) {
  check_greedy_args(candidates_in, target_ids_in, first_child_in, next_sibling_in, max_depth);
  const at::Tensor candidates = candidates_in.contiguous(), target_ids = target_ids_in.contiguous();
  const at::Tensor first_child = first_child_in.contiguous(), next_sibling = next_sibling_in.contiguous();
  const int64_t B = candidates.size(0), T = candidates.size(1), W = max_depth + 1;
  at::Tensor accept_index = at::empty({B, W}, candidates.options().dtype(at::kInt));
  at::Tensor accept_len = at::empty({B}, candidates.options().dtype(at::kInt));
  at::Tensor next_token = at::empty({B}, candidates.options().dtype(at::kLong));
  const int64_t* cand = candidates.data_ptr<int64_t>();
  const int64_t* target = target_ids.data_ptr<int64_t>();
  const int32_t* fc = first_child.data_ptr<int32_t>();
  const int32_t* ns = next_sibling.data_ptr<int32_t>();
  int32_t* ai = accept_index.data_ptr<int32_t>();
  int32_t* al = accept_len.data_ptr<int32_t>();
  int64_t* nt = next_token.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      tree::verify_greedy_row(cand + b * T, target + b * T, fc + b * T, ns + b * T, T, max_depth, ai + b * W, al + b,
                              nt + b);
  });
  return {accept_index, accept_len, next_token};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_sample_cpu(
    const at::Tensor& candidates_in, const at::Tensor& target_probs_in, const at::Tensor& first_child_in,
    const at::Tensor& next_sibling_in, const at::Tensor& uniform_in, const at::Tensor& uniform_final_in,
    const c10::optional<at::Tensor>& draft_probs_in, int64_t max_depth) {
  check_sample_args(candidates_in, target_probs_in, first_child_in, next_sibling_in, uniform_in, uniform_final_in,
                    draft_probs_in, max_depth);
  const at::Tensor candidates = candidates_in.contiguous(), target_probs = target_probs_in.contiguous();
  const at::Tensor first_child = first_child_in.contiguous(), next_sibling = next_sibling_in.contiguous();
  const at::Tensor uniform = uniform_in.contiguous(), uniform_final = uniform_final_in.contiguous();
  const at::Tensor draft_probs = draft_probs_in.has_value() ? draft_probs_in->contiguous() : at::Tensor();
  const int64_t B = candidates.size(0), T = candidates.size(1), V = target_probs.size(2), W = max_depth + 1;
  at::Tensor accept_index = at::empty({B, W}, candidates.options().dtype(at::kInt));
  at::Tensor accept_len = at::empty({B}, candidates.options().dtype(at::kInt));
  at::Tensor next_token = at::empty({B}, candidates.options().dtype(at::kLong));
  const int64_t* cand = candidates.data_ptr<int64_t>();
  const float* p = target_probs.data_ptr<float>();
  const float* q = draft_probs.defined() ? draft_probs.data_ptr<float>() : nullptr;
  const int32_t* fc = first_child.data_ptr<int32_t>();
  const int32_t* ns = next_sibling.data_ptr<int32_t>();
  const float* u = uniform.data_ptr<float>();
  const float* uf = uniform_final.data_ptr<float>();
  int32_t* ai = accept_index.data_ptr<int32_t>();
  int32_t* al = accept_len.data_ptr<int32_t>();
  int64_t* nt = next_token.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(q ? V : 0);
    std::vector<int64_t> excluded(T);
    float seg[tree::kSegments];
    tree::TeamSerial team{V};
    for (int64_t b = begin; b < end; ++b) {
      const tree::SampleRow row{cand + b * T,
                                p + b * T * V,
                                q ? q + b * T * V : nullptr,
                                fc + b * T,
                                ns + b * T,
                                u + b * T,
                                uf[b],
                                scratch.data(),
                                T,
                                V,
                                max_depth};
      tree::verify_sample_row(team, row, excluded.data(), seg, ai + b * W, al + b, nt + b);
    }
  });
  return {accept_index, accept_len, next_token};
}

template <typename Elem>
void compact_rows(at::Tensor& cache, const int32_t* lens, const int32_t* ai, int64_t W) {
  const bool layered = cache.dim() == 5;
  const int64_t NL = layered ? cache.size(0) : 1;
  const int64_t off = layered ? 1 : 0;
  const int64_t B = cache.size(off), H = cache.size(off + 1), D = cache.size(off + 3);
  const int64_t sl = layered ? cache.stride(0) : 0, sb = cache.stride(off), sh = cache.stride(off + 1);
  const int64_t sp = cache.stride(off + 2), sd = cache.stride(off + 3);
  Elem* base = static_cast<Elem*>(cache.data_ptr());
  at::parallel_for(0, NL * B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t l = r / (B * H), b = (r / H) % B, h = r % H;
      const int32_t* index = ai + b * W;
      const int32_t accepted = tree::accepted_length(index, W);
      Elem* rows = base + l * sl + b * sb + h * sh + static_cast<int64_t>(lens[b]) * sp;
      for (int32_t j = 1; j <= accepted; ++j) {  // ascending j: see kestrel/tree_verify.h
        if (index[j] == j) continue;
        const Elem* src = rows + index[j] * sp;
        Elem* dst = rows + j * sp;
        if (sd == 1) {
          std::memcpy(dst, src, D * sizeof(Elem));
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d * sd] = src[d * sd];
        }
      }
    }
  });
}

void compact_one(at::Tensor& cache, const int32_t* lens, const int32_t* ai, int64_t W) {
  switch (cache.element_size()) {
    case 1:
      compact_rows<uint8_t>(cache, lens, ai, W);
      break;
    case 2:
      compact_rows<uint16_t>(cache, lens, ai, W);
      break;
    case 4:
      compact_rows<uint32_t>(cache, lens, ai, W);
      break;
    default:
      compact_rows<uint64_t>(cache, lens, ai, W);
      break;
  }
}

void compact_kv_cache_cpu(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& cache_seqlens,
                          const at::Tensor& accept_index_in) {
  constexpr const char* op = "compact_kv_cache";
  check_compact_args(k_cache, v_cache, cache_seqlens, accept_index_in);
  const at::Tensor accept_index = accept_index_in.contiguous();
  const int64_t B = accept_index.size(0), W = accept_index.size(1);
  const int64_t Lmax = k_cache.size(k_cache.dim() - 2);
  int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  const int64_t len_stride = cache_seqlens.stride(0);
  std::vector<int32_t> len_copy(B);
  const int32_t* ai = accept_index.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // every row is checked before any is moved
    const int32_t* index = ai + b * W;
    const int32_t len = lens[b * len_stride];
    int64_t j = 0;
    switch (tree::check_compaction_row(index, W, len, Lmax, &j)) {
      case tree::kRowOk:
        break;
      case tree::kRootNotZero:
        TORCH_CHECK(false, op, ": accept_index[", b, ", 0] must be 0 (the root), got ", index[0]);
      case tree::kNotAscending:
        TORCH_CHECK(false, op, ": accept_index[", b, "] must ascend from the root and end in -1 padding, got ",
                    index[j - 1], " then ", index[j], " at position ", j);
      case tree::kBadPadding:
        TORCH_CHECK(false, op, ": accept_index[", b, "] must be -1 after the path, got ", index[j], " at position ", j);
      case tree::kNegativeLength:
        TORCH_CHECK(false, op, ": cache_seqlens[", b, "] must be >= 0, got ", len);
      case tree::kOutsideCache:
        TORCH_CHECK(false, op, ": cache_seqlens[", b, "] = ", len, " plus accepted node ", index[j],
                    " is outside the cache (Lmax = ", Lmax, ")");
      case tree::kLengthOverflow:
        TORCH_CHECK(false, op, ": cache_seqlens[", b, "] = ", len, " plus ", 1 + j,
                    " accepted tokens passes the cache (Lmax = ", Lmax, ") or int32");
    }
    len_copy[b] = len;
  }
  compact_one(k_cache, len_copy.data(), ai, W);
  compact_one(v_cache, len_copy.data(), ai, W);
  for (int64_t b = 0; b < B; ++b) lens[b * len_stride] = len_copy[b] + 1 + tree::accepted_length(ai + b * W, W);
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("verify_tree_greedy", &verify_tree_greedy_cpu);
  m.impl("verify_tree_sample", &verify_tree_sample_cpu);
  m.impl("compact_kv_cache", &compact_kv_cache_cpu);
}

}  // namespace kestrel
