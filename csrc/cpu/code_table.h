// CPU lookup tables for a 256-entry quantization map: the midpoints and the bucket table of kestrel/quantize.h,
// built once per distinct map and cached (the optimizers requantize with the same two maps every step).
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "kestrel/quantize.h"

namespace kestrel {
namespace cpu {

constexpr int kMaxBucketSteps = 4;

struct CodeTable {
  float code[quant::kCodeSize];
  float midpoints[quant::kMidpointsSize];
  uint8_t bucket_start[quant::kNumBuckets + 4];  // +4: a vector gather may read a dword at the last entry
  int bucket_steps;  // comparisons after the bucket lookup; -1 when the map needs the binary search

  explicit CodeTable(const float* values) {
    std::memcpy(code, values, sizeof(code));
    for (int j = 0; j < quant::kCodeSize - 1; ++j) midpoints[j] = quant::midpoint(code, j);
    midpoints[quant::kCodeSize - 1] = std::numeric_limits<float>::infinity();
    const int steps = quant::build_bucket_table(midpoints, bucket_start);
    std::memset(bucket_start + quant::kNumBuckets, 0, 4);
    bucket_steps = steps <= kMaxBucketSteps ? steps : -1;
  }

  // The nearest code's index for a normalised value (exactly the definition in kestrel/quantize.h).
  inline int nearest(float v) const {
    if (bucket_steps == 1) return quant::nearest_code_bucketed<1>(midpoints, bucket_start, v);
    if (bucket_steps >= 0) return quant::nearest_code_bucketed<kMaxBucketSteps>(midpoints, bucket_start, v);
    return quant::nearest_code_bsearch(midpoints, v);
  }
};

// The table for `values` (a sorted, finite map), from a small cache keyed by the map's contents.
inline std::shared_ptr<const CodeTable> code_table_for(const float* values) {
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const CodeTable>> cache;  // most recently used last
  constexpr size_t kCapacity = 8;
  std::lock_guard<std::mutex> lock(mutex);
  for (size_t i = 0; i < cache.size(); ++i) {
    if (std::memcmp(cache[i]->code, values, sizeof(cache[i]->code)) == 0) {
      auto hit = cache[i];
      cache.erase(cache.begin() + i);
      cache.push_back(hit);
      return hit;
    }
  }
  auto table = std::make_shared<const CodeTable>(values);
  if (cache.size() == kCapacity) cache.erase(cache.begin());
  cache.push_back(table);
  return table;
}

}  // namespace cpu
}  // namespace kestrel
