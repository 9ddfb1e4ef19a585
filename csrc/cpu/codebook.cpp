// CPU kernel of the codebook grouping used by vq_topk and kv_bottleneck_lookup (kestrel/ops/vq_topk.py,
// duplicate_groups): the identical codes of every head, so that copies can share one score and follow the
// lower-index tie rule. One pass per head (heads in parallel): a 64-bit hash of each code's bits (after + 0, so -0
// equals +0), the codes in id order into a hash table of group leaders, a code equal by value to a leader joining its
// group (a code holding NaN equals nothing; banned codes are never grouped): O(C d) per head, no sort. The outputs
// mean what the Python twin's do (which the CUDA path runs); `members` holds the groups in their leaders' id order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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
  // the hash: a sum of each value's bits times an odd multiplier of its position (independent products, no serial
  // chain), then a final mix; a collision only costs a full comparison
  std::vector<uint64_t> key(C);
  for (int64_t c = 0; c < C; ++c) {
    uint64_t h = 0x6b657374726c0001ull;
    const T* row = codes + c * d;
    for (int64_t j = 0; j < d; ++j)
      h += value_bits(row[j]) * (0x9e3779b97f4a7c15ull + 0xc6a4a7935bd1e99aull * (uint64_t)j);
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    key[c] = h;
  }
  const auto same_row = [&](int32_t a, int32_t b) {
    if (key[a] != key[b]) return false;
    const T* x = codes + (int64_t)a * d;
    const T* y = codes + (int64_t)b * d;
    for (int64_t j = 0; j < d; ++j)
      if (!(static_cast<double>(x[j]) == static_cast<double>(y[j]))) return false;  // NaN equals nothing
    return true;
  };
  // Each code's leader, the lowest id of its copies: codes in id order into an open-addressing table of leaders
  // (linear probing on the hash); a banned code leads its own group and stays out of the table.
  int64_t slots = 16;
  while (slots < 2 * C) slots <<= 1;
  std::vector<int32_t> table(slots, -1);
  std::vector<int32_t> leader(C);
  for (int64_t c = 0; c < C; ++c) {
    size[c] = 0;
    leader[c] = (int32_t)c;
    if (banned != nullptr && banned[c]) continue;
    for (uint64_t s = key[c] & (uint64_t)(slots - 1);; s = (s + 1) & (uint64_t)(slots - 1)) {
      const int32_t e = table[s];
      if (e < 0) {
        table[s] = (int32_t)c;
        break;
      }
      if (same_row(e, (int32_t)c)) {
        leader[c] = e;
        break;
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) size[leader[c]] += 1;
  // members: the groups in their leaders' id order, ids ascending within a group
  int32_t offset = 0;
  for (int64_t c = 0; c < C; ++c)
    if (leader[c] == c) start[c] = offset, offset += size[c];
  std::vector<int32_t> filled(C, 0);
  for (int64_t c = 0; c < C; ++c) {
    const int32_t l = leader[c];
    const int32_t p = start[l] + filled[l]++;
    members[p] = (int32_t)c;
    alias[c] = l != c;
    if (l != c) start[c] = p;
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
