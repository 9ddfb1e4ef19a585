// CPU kernel of the codebook grouping used by vq_topk and kv_bottleneck_lookup (kestrel/ops/vq_topk.py,
// duplicate_groups): the identical codes of every head, so that copies can share one score and follow the
// lower-index tie rule. One pass per head (heads in parallel): a 64-bit hash of each code's bits (after + 0, so -0
// equals +0), the codes sorted by (hash, id), and neighbours compared by value (a code holding NaN equals nothing;
// banned codes are never grouped). The outputs mean what the Python twin's do (which the CUDA path runs); the order
// of the groups in `members` may differ, as it follows the hash.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace kestrel {
namespace {

template <typename T>
uint64_t value_bits(T v) {
  const T w = static_cast<T>(static_cast<double>(v) + 0.0);  // -0 -> +0 (exact for every float dtype)
  if constexpr (sizeof(T) == 8) {
    uint64_t u;
    std::memcpy(&u, &w, 8);
    return u;
  } else if constexpr (sizeof(T) == 4) {
    uint32_t u;
    std::memcpy(&u, &w, 4);
    return u;
  } else {
    uint16_t u;
    std::memcpy(&u, &w, 2);
    return u;
  }
}

template <typename T>
void group_head(const T* codes, const bool* banned, int64_t C, int64_t d, bool* alias, int32_t* members, int32_t* start,
                int32_t* size) {
  std::vector<uint64_t> key(C);
  for (int64_t c = 0; c < C; ++c) {
    uint64_t h = 0x6b657374726c0001ull;
    const T* row = codes + c * d;
    for (int64_t j = 0; j < d; ++j) {
      h = (h ^ value_bits(row[j])) * 0x9e3779b97f4a7c15ull;
      h ^= h >> 29;
    }
    key[c] = h;
  }
  std::vector<int32_t> order(C);
  std::iota(order.begin(), order.end(), 0);
  // banned codes first (each its own group, by id), then by (hash, id)
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const bool ba = banned != nullptr && banned[a], bb = banned != nullptr && banned[b];
    if (ba != bb) return ba;
    if (ba) return a < b;
    return key[a] != key[b] ? key[a] < key[b] : a < b;
  });
  const auto same_row = [&](int32_t a, int32_t b) {
    if (banned != nullptr && (banned[a] || banned[b])) return false;
    if (key[a] != key[b]) return false;
    const T* x = codes + (int64_t)a * d;
    const T* y = codes + (int64_t)b * d;
    for (int64_t j = 0; j < d; ++j)
      if (!(static_cast<double>(x[j]) == static_cast<double>(y[j]))) return false;  // NaN equals nothing
    return true;
  };
  for (int64_t c = 0; c < C; ++c) size[c] = 0;
  int32_t leader = 0;
  for (int64_t p = 0; p < C; ++p) {
    const int32_t id = order[p];
    if (p == 0 || !same_row(order[p - 1], id)) leader = id;
    members[p] = id;
    start[id] = (int32_t)p;
    alias[id] = leader != id;
    size[leader] += 1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> duplicate_groups_cpu(
    const at::Tensor& codebook_in, const std::optional<at::Tensor>& banned_in) {
  TORCH_CHECK(codebook_in.dim() == 3, "duplicate_groups: codebook must be (H, C, d), got ", codebook_in.sizes());
  TORCH_CHECK(codebook_in.is_floating_point(), "duplicate_groups: codebook must be a float tensor, got ",
              codebook_in.scalar_type());
  const int64_t H = codebook_in.size(0), C = codebook_in.size(1), d = codebook_in.size(2);
  TORCH_CHECK(C < (int64_t)1 << 31, "duplicate_groups: at most 2^31 - 1 codes per head, got ", C);
  at::Tensor banned;
  if (banned_in.has_value()) {
    TORCH_CHECK(banned_in->scalar_type() == at::kBool && banned_in->dim() == 2 && banned_in->size(0) == H &&
                    banned_in->size(1) == C,
                "duplicate_groups: banned must be a bool tensor of shape (", H, ", ", C, "), got ",
                banned_in->scalar_type(), " of shape ", banned_in->sizes());
    banned = banned_in->contiguous();
  }
  const at::Tensor codebook = codebook_in.contiguous();
  const auto ints = at::TensorOptions().dtype(at::kInt);
  at::Tensor alias = at::empty({H, C}, at::TensorOptions().dtype(at::kBool));
  at::Tensor members = at::empty({H, C}, ints), start = at::empty({H, C}, ints), size = at::empty({H, C}, ints);
  const bool* ban = banned.defined() ? banned.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "duplicate_groups", [&] {
    const scalar_t* cb = codebook.data_ptr<scalar_t>();
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h)
        group_head(cb + h * C * d, ban ? ban + h * C : nullptr, C, d, alias.data_ptr<bool>() + h * C,
                   members.data_ptr<int32_t>() + h * C, start.data_ptr<int32_t>() + h * C,
                   size.data_ptr<int32_t>() + h * C);
    });
  });
  return {alias, members, start, size};
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("duplicate_groups", &duplicate_groups_cpu);
}

}  // namespace kestrel
