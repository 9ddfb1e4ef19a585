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
// of v, so a table of where it steps gives it. v's bits as a monotone integer, m = (bits ^ (sign ? 0x7FFFFFFF : 0)) +
// (sign ? -1 : 0) (= t for v >= 0 and -2 - t for v < 0, t = |v|'s bits: ordered as the values are, -0 two below +0,
// -1 unused), split into a bucket m >> shift (arithmetic) and a position m & (2^shift - 1). The table has an entry per
// bucket of |v| < 2 (but the float next to -2, whose m is one below the table; the domain is |v| <= 1, a state divided
// by its block's absmax): code << 24 | thr, the code at the bucket's first position and the last position before the
// step (2^shift - 1: none), so v's code is the entry's top byte plus 1 when (code << 24 | position) > entry -- one
// gather, a bit select and a comparison per vector (optim_avx512.h, optim_avx2.h), the sign fix or round-up folded in
// (bnb's sign fix steps between -0 and +0, the round-up between +0 and the smallest positive float: inside the table
// like any other step). Why -2 - t and not -1 - t: a midpoint that is a short binary fraction (its low bits zero; 14 in
// the signed dynamic map) puts the step of a negative value between t and t - 1, which -1 - t would make the boundary
// between two buckets, -2 - t puts inside one; `approx` below needs every step but the sign's inside a bucket.
//
// build() makes the table from requantized_code, exactly: in each bucket it evaluates the code at the first and the
// last position -- equal, no step; one apart, the step found by bisection; more, the next finer `shift` is tried --
// and it checks that the codes ascend from bucket to bucket. Monotone step functions agree everywhere when they agree
// at every step, so the table is exact; tests/test_optim_vector_paths.py compares each path with the scalar
// definition on all 2,130,706,434 float32 bit patterns in [-1, 1] for both dynamic maps and every MODE. The dynamic
// maps take shift 17 (signed: 64 KiB) and 16 (unsigned: 128 KiB); the entries of the values a state holds (a few
// decades below its absmax) are the ones in cache.
//
// The requantization without a division (optim_vector.inc's Requantize, AVX-512 paths): for absmax in [2^-125, 2^125]
// the kernels look up q = RN(s * y), y = RN(1 / absmax), instead of the quotient r = RN(s / absmax), and divide only
// the groups of 64 with a value at a step. Exact: s * y = (s / absmax)(1 + d) with |d| < 2^-24, less than an ulp of the
// quotient (|s| <= absmax, so |s / absmax| <= 1: no overflow; in the subnormal range the ulp is 2^-149 and the error
// under 2^-150), so q and r are the same float or neighbours (their monotone integers at most 1 apart: rounding two
// reals less than an ulp apart; across a binade boundary upward q is the power of two, r at most one below;
// downward a gap of two would need |d| >= 1.5 * 2^-24), and they have the same sign. Neighbours in one bucket take
// different codes only when one is the step's last position and the other the next (position - thr in {0, 1}: that
// group is divided); in two buckets, only when the code changes between the buckets, which `approx` excludes except
// between -0 and +0, never straddled.
struct StepTable {
  static constexpr int kCodeShift = 24;
  bool ok = false;
  bool approx = false;  // no code change between buckets but between -0 and +0 (the division-free requantization)
  int shift = 16;
  int half = 0;                   // buckets per sign: |v| < 2 is m >> shift in [-half, half)
  std::vector<uint32_t> entries;  // 2 * half, bucket key at entries[half + key]

  const uint32_t* center() const { return entries.data() + half; }
  uint32_t position_mask() const { return (1u << shift) - 1u; }

  void build(const float* code, const float* midpoints, int mode) {
    for (int sh : {18, 17, 16, 15})
      if (build_with(code, midpoints, mode, sh)) return;
    ok = false;
    entries.clear();
  }

 private:
  bool build_with(const float* code, const float* midpoints, int mode, int sh) {
    shift = sh;
    half = 1 << (30 - sh);  // 2^30 is 2.0's bits
    entries.assign(2 * (size_t)half, 0);
    const uint32_t last = (1u << sh) - 1u;
    const auto f = [&](float v) { return requantized_code(code, midpoints, mode, v); };
    const auto value = [&](int64_t key, uint32_t position) {  // the float whose monotone integer is key << sh | pos
      const int64_t m = key * ((int64_t)1 << sh) + position;  // m = -1 (no float) is taken as -0
      return m >= 0 ? float_from_bits((uint32_t)m)
                    : float_from_bits(0x80000000u | (uint32_t)std::max<int64_t>(-2 - m, 0));
    };
    int previous = -1;
    bool within = true;  // every code change inside a bucket (but the sign's)
    for (int64_t key = -half; key < half; ++key) {
      const int lowest = f(value(key, 0)), highest = f(value(key, last));
      if (lowest < previous || highest < lowest) return false;  // not monotone
      if (key != 0 && key != -half && lowest != previous) within = false;
      previous = highest;
      uint32_t thr = last;
      if (highest == lowest + 1) {
        uint32_t x = 0, y = last;  // the first position with the higher code
        while (x < y) {
          const uint32_t mid = x + (y - x) / 2;
          if (f(value(key, mid)) > lowest)
            y = mid;
          else
            x = mid + 1;
        }
        thr = x - 1;
      } else if (highest != lowest) {
        return false;
      }
      entries[(size_t)(half + key)] = (uint32_t)lowest << kCodeShift | thr;
    }
    ok = true;
    approx = within;
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
