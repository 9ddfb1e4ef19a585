// CPU lookup tables for a 256-entry quantization map: the midpoints and the bucket table of kestrel/quantize.h (the
// scalar loops), the step tables of the vector paths' requantization and the byte planes of their dequantization,
// built once per distinct map and cached (the optimizers requantize with the same two maps every step).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "kestrel/optim.h"
#include "kestrel/quantize.h"

namespace kestrel {
namespace cpu {

constexpr int kMaxBucketSteps = 4;

// The rounding of a requantized state after the nearest code (kestrel/optim.h): bnb's sign fix for first moments and
// signed-map states, plain nearest rounding for robust numerators, the next code up for robust denominators.
enum Requant : int { kPlain = 0, kSignFix = 1, kRoundUp = 2 };

// The code of a normalised state v under MODE, by the scalar definition (the count of midpoints below v, then the
// rule): what every path must give.
inline int requantized_code(const float* code, const float* midpoints, int mode, float v) {
  const int idx = quant::nearest_code_bsearch(midpoints, v);
  if (mode == kSignFix) return optim::round_numerator_code(code, idx, v, false);
  if (mode == kRoundUp) return optim::round_denominator_code(code, idx, v, true);
  return idx;
}

// Requantization by one table lookup (the vector paths). The code of v under a MODE is a non-decreasing step function
// of v, so a table of where it steps gives it. With t = |v|'s bits, v's bucket is r = clamp((t >> shift) - lo, 0,
// span - 1) on v's side -- negative when the sign bit is set; for kRoundUp when v <= 0, so that +0 shares -0's code --
// at entry span + r (positive side) or span - 1 - r (negative side): the buckets in value order. Within a bucket, v's
// position is t's low `shift` bits, complemented on the negative side (so positions ascend with v). Every bucket holds
// at most one step: its entry is code | thr << 8, the code at the bucket's first position and the last position before
// the step (0x7FFFFF: none), and v's code is code + (position << 8 > entry). The two clamped buckets of each side (all
// |v| below (lo + 1) << shift, all |v| from 1.0 up, inf and NaN included) hold no step. Per vector: one gather and a
// few integer operations (optim_avx512.h, optim_avx2.h), the sign fix or round-up folded into the table.
//
// build() makes the table from requantized_code, exactly: in each bucket it evaluates the code at the first and the
// last position (the clamped buckets: their whole range) -- equal, no step; one apart, the step found by bisection;
// more, the next finer `shift` is tried -- and it checks that the codes ascend from bucket to bucket. Monotone step
// functions agree everywhere when they agree at every step, so the table is exact; tests/test_optim_vector_paths.py
// compares each path with the scalar definition on all 2,130,706,434 float32 bit patterns in [-1, 1] for both
// dynamic maps and every MODE. The dynamic maps take shift 17 (signed, 11 KiB) and 16 (unsigned, 23 KiB).
struct StepTable {
  static constexpr uint32_t kNoStep = 0x7fffffu;
  bool ok = false;
  int shift = 16, lo = 0, span = 1;
  std::vector<uint32_t> entries;  // 2 * span

  const uint32_t* center() const { return entries.data() + span; }
  uint32_t position_mask8() const { return ((1u << shift) - 1u) << 8; }

  void build(const float* code, const float* midpoints, int mode) {
    for (int sh : {18, 17, 16, 15}) {
      // lo: the bucket below the smallest nonzero |midpoint|'s, so the clamped buckets hold no midpoint
      int first = (int)(0x3f800000u >> sh);
      for (int j = 0; j < quant::kCodeSize - 1; ++j) {
        const int e = (int)((float_bits(midpoints[j]) & 0x7fffffffu) >> sh);
        if (e > 0 && e < first) first = e;
      }
      if (build_with(code, midpoints, mode, sh, first > 0 ? first - 1 : 0)) return;
    }
    ok = false;
    entries.clear();
  }

 private:
  bool build_with(const float* code, const float* midpoints, int mode, int sh, int lo_) {
    shift = sh;
    lo = lo_;
    span = (int)(0x3f800000u >> sh) - lo + 1;  // the last bucket starts at 1.0's
    if (span < 3) return false;
    entries.assign(2 * (size_t)span, 0);
    const uint32_t last = (1u << sh) - 1u;
    const float inf = std::numeric_limits<float>::infinity();
    const auto f = [&](float v) { return requantized_code(code, midpoints, mode, v); };
    // the value at position l of bucket b (b >= 0: the positive side's r = b; b < 0: the negative side's r = -1 - b)
    const auto value = [&](int b, uint32_t l) {
      if (b >= 0) return float_from_bits(((uint32_t)(lo + b) << sh) | l);
      return float_from_bits(0x80000000u | ((uint32_t)(lo - 1 - b) << sh) | (l ^ last));
    };
    const float below = float_from_bits(((uint32_t)(lo + 1) << sh) - 1u);  // the clamped-below buckets' largest |v|
    int previous = -1;
    for (int b = -span; b < span; ++b) {
      const int r = b >= 0 ? b : -1 - b;
      float lowest, highest;
      if (r == 0) {  // |v| < (lo + 1) << shift on this side
        const bool round_up = mode == kRoundUp;
        lowest = b >= 0 ? (round_up ? float_from_bits(1u) : 0.0f) : -below;
        highest = b >= 0 ? below : (round_up ? 0.0f : -0.0f);
        if (b < 0 && round_up && f(-0.0f) != f(0.0f)) return false;
      } else if (r == span - 1) {  // |v| >= 1.0's bucket, inf and NaN
        lowest = b >= 0 ? value(b, 0) : -inf;
        highest = b >= 0 ? inf : value(b, last);
      } else {
        lowest = value(b, 0);
        highest = value(b, last);
      }
      const int at_lowest = f(lowest), at_highest = f(highest);
      if (at_lowest < previous) return false;  // not monotone
      previous = at_highest;
      uint32_t thr = kNoStep;
      if (at_highest == at_lowest + 1 && r != 0 && r != span - 1) {
        uint32_t x = 0, y = last;  // the first position with the higher code
        while (x < y) {
          const uint32_t mid = x + (y - x) / 2;
          if (f(value(b, mid)) > at_lowest)
            y = mid;
          else
            x = mid + 1;
        }
        thr = x - 1;
      } else if (at_highest != at_lowest) {
        return false;
      }
      entries[(size_t)(span + b)] = (uint32_t)at_lowest | (thr << 8);
    }
    ok = true;
    return true;
  }
};

// A 256-entry float table as four byte planes (plane k holds byte k of every entry), for lookups of 64 indices at a
// time with byte permutes (AVX-512 VBMI).
struct BytePlanes {
  alignas(64) uint8_t plane[4][quant::kCodeSize];

  void build(const float* table) {
    for (int j = 0; j < quant::kCodeSize; ++j)
      for (int k = 0; k < 4; ++k) plane[k][j] = (uint8_t)(float_bits(table[j]) >> (8 * k));
  }
};

struct CodeTable {
  float code[quant::kCodeSize];
  float midpoints[quant::kMidpointsSize];
  quant::BucketRange range;
  std::vector<uint8_t> bucket_start;  // num_buckets(range) + 4: a vector gather may read a dword at the last entry
  int bucket_steps;                   // comparisons after the bucket lookup; -1 when the map needs the binary search
  StepTable step[3];                  // by Requant mode: the vector paths' requantization
  BytePlanes code_planes;             // the AVX-512 VBMI dequantization

  explicit CodeTable(const float* values) {
    std::memcpy(code, values, sizeof(code));
    for (int j = 0; j < quant::kCodeSize - 1; ++j) midpoints[j] = quant::midpoint(code, j);
    midpoints[quant::kCodeSize - 1] = std::numeric_limits<float>::infinity();
    range = quant::bucket_range(midpoints);
    bucket_start.assign(quant::num_buckets(range) + 4, 0);
    const int steps = quant::build_bucket_table(midpoints, range, bucket_start.data());
    bucket_steps = steps <= kMaxBucketSteps ? steps : -1;
    for (int mode = 0; mode < 3; ++mode) step[mode].build(code, midpoints, mode);
    code_planes.build(code);
  }

  // Whether the vector paths serve this map: a step table for every rounding.
  bool vector_ready() const { return step[0].ok && step[1].ok && step[2].ok; }

  // The nearest code's index for a normalised value (exactly the definition in kestrel/quantize.h).
  inline int nearest(float v) const {
    const uint8_t* start = bucket_start.data();
    if (bucket_steps == 1) return quant::nearest_code_bucketed<1>(midpoints, start, range, v);
    if (bucket_steps >= 0) return quant::nearest_code_bucketed<kMaxBucketSteps>(midpoints, start, range, v);
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
