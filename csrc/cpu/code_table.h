// CPU lookup tables for a 256-entry quantization map: the midpoints and the bucket table of kestrel/quantize.h, and
// where the map's signs change, built once per distinct map and cached (the optimizers requantize with the same two
// maps every step).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "kestrel/quantize.h"

namespace kestrel {
namespace cpu {

constexpr int kMaxBucketSteps = 4;

// Requantization without a search (the AVX-512 paths). On each side of zero a dynamic map is a few runs of evenly
// spaced codes (one per decade), so the index of the nearest code follows from |v| by arithmetic: the run r that holds
// |v| (a 32-entry table over |v|'s binary exponent gives the run at the binade's start, one comparison with the next
// run's start finishes), then est = floor(fma(|v|, inv_width[r], shift[r])) with shift = first - 0.5 - lo * inv_width
// (first: the index of the run's first code, lo: where its range starts), the nearest index or the one below it, and
// one comparison with the midpoint above est decides. A map symmetric about its zero code (the signed
// map) takes negative values from the mirror image: est(-a) = 2 * zero - 1 - est(a).
//
// The domain is what an optimizer requantizes: |v| <= 1 (a state divided by its block's absmax), NaN excluded.
// Estimator::build proves the method for the map it is given, exactly, over that domain: the estimate and the nearest
// index are both step functions of v (the estimate is monotone within a run), so they agree everywhere if they agree
// on both sides of every step -- the midpoints, the run starts and the points where the estimate's floor steps (found
// by bisection over each run's float bit patterns). A map without the structure, or one that fails, gets runs = 0 and
// the vector paths are not used for it. tests/test_optim.py checks the vector code against the search over every
// float32 bit pattern in [-1, 1] for both dynamic maps.
struct Estimator {
  static constexpr int kMaxRuns = 8;
  static constexpr int kExponents = 32;      // binades 2^-31 .. 2^0; smaller |v| share the first entry
  static constexpr int kFirstExponent = 96;  // the biased exponent of table entry 0
  int runs = 0;                              // 0: no estimator for this map
  int zero = 0;                              // the index of the code 0.0
  int mirror = -1;            // 2 * zero - 1 (negative values: mirror - est(|v|)); -1 for a map without negative codes
  float start[kMaxRuns + 1];  // run r holds |v| in [start[r], start[r + 1]) (start[0] = 0, start[runs] = inf)
  // Per run, padded to 16 lanes for the vector lookups
  alignas(64) float inv_width[16];
  alignas(64) float shift[16];
  // Per binade: the run at its start, and the next run's start if that falls inside the binade (else inf)
  alignas(64) int run_of[kExponents];
  alignas(64) float next_start[kExponents];

  // The estimate for |v| <= 1, with exactly the float operations of the vector code.
  int estimate(float v) const {
    const uint32_t bits = float_bits(v) & 0x7fffffffu;
    const float a = float_from_bits(bits);
    int e = (int)(bits >> 23) - kFirstExponent;
    e = e < 0 ? 0 : (e > kExponents - 1 ? kExponents - 1 : e);
    const int r = run_of[e] + (a >= next_start[e] ? 1 : 0);
    int est = (int)std::floor(std::fma(a, inv_width[r], shift[r]));
    est = est > zero ? est : zero;
    if (float_bits(v) >> 31) est = mirror - est;
    return est < 0 ? 0 : (est > quant::kCodeSize - 1 ? quant::kCodeSize - 1 : est);
  }

  int nearest(const float* midpoints, float v) const {
    const int est = estimate(v);
    return est + (midpoints[est] < v ? 1 : 0);
  }

  void build(const float* code, const float* midpoints) {
    runs = 0;
    if (find_runs(code) && exponent_tables() && proven(midpoints)) return;
    runs = 0;
  }

 private:
  bool find_runs(const float* code) {
    constexpr int n = quant::kCodeSize;
    int z = 0;
    while (z < n && code[z] < 0.0f) ++z;
    if (z == n || code[z] != 0.0f || (z + 1 < n && !(code[z + 1] > 0.0f))) return false;
    if (2 * z > n - 1) return false;
    for (int i = 0; i < z; ++i)
      if (code[i] != -code[2 * z - i]) return false;  // negative side: the mirror image of the positive one
    zero = z;
    mirror = 2 * z - 1;
    int count = 0;
    const auto even = [&](int j, float w) { return std::fabs((code[j + 1] - code[j]) - w) <= 0.01f * w; };
    for (int f = z + 1; f < n - 1;) {  // the top code needs no run: the last run's estimates reach it
      if (count == kMaxRuns) return false;
      const float w = code[f + 1] - code[f];
      int j = f + 1;
      while (j + 1 < n - 1 && even(j, w)) ++j;
      if (j == f + 1 && j + 1 < n - 1 && !even(j, w)) j = f;  // f + 1 starts a run of its own: f is a lone code
      float lo;
      if (j > f) {
        const float width = (code[j] - code[f]) / (float)(j - f);
        lo = code[f] - 0.5f * width;
        inv_width[count] = 1.0f / width;
      } else {  // a lone code: the estimate is the index below it
        lo = code[f] - 0.5f * (code[f] - code[f - 1]);
        inv_width[count] = 0.0f;
      }
      shift[count] = (float)((double)f - 0.5 - (double)lo * (double)inv_width[count]);
      start[count] = count == 0 ? 0.0f : lo;
      ++count;
      f = j + 1;
    }
    if (count == 0) return false;
    for (int r = 1; r < count; ++r)
      if (!(start[r] > start[r - 1]) || !(start[r] <= 1.0f)) return false;
    start[count] = std::numeric_limits<float>::infinity();
    for (int r = count; r < 16; ++r) inv_width[r] = shift[r] = 0.0f;
    runs = count;
    return true;
  }

  bool exponent_tables() {
    for (int e = 0; e < kExponents; ++e) {
      const float low = e == 0 ? 0.0f : std::ldexp(1.0f, e + kFirstExponent - 127);
      const float high = std::ldexp(1.0f, e + 1 + kFirstExponent - 127);
      int r = 0;
      while (r + 1 < runs && start[r + 1] <= low) ++r;
      run_of[e] = r;
      next_start[e] = std::numeric_limits<float>::infinity();
      if (r + 1 < runs && start[r + 1] < high) {
        if (r + 2 < runs && start[r + 2] < high) return false;  // two run starts in one binade
        next_start[e] = start[r + 1];
      }
    }
    return true;
  }

  bool agrees(const float* midpoints, float v) const {
    if (!(std::fabs(v) <= 1.0f)) return true;  // outside the domain
    return nearest(midpoints, v) == quant::nearest_code_bsearch(midpoints, v) &&
           nearest(midpoints, -v) == quant::nearest_code_bsearch(midpoints, -v);
  }

  bool agrees_around(const float* midpoints, float v) const {
    const float inf = std::numeric_limits<float>::infinity();
    return agrees(midpoints, v) && agrees(midpoints, std::nextafter(v, inf)) &&
           agrees(midpoints, std::nextafter(v, -inf));
  }

  bool proven(const float* midpoints) const {
    for (float v : {0.0f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(), 1.0f})
      if (!agrees_around(midpoints, v)) return false;
    for (int j = 0; j < quant::kCodeSize - 1; ++j)
      if (!agrees_around(midpoints, midpoints[j])) return false;
    const uint32_t one = float_bits(1.0f);
    for (int r = 0; r < runs; ++r) {
      // run r holds the |v| with bits in [begin, end]; its estimate is monotone there
      const uint32_t begin = float_bits(start[r]);
      const uint32_t end = r + 1 < runs ? std::min(float_bits(start[r + 1]) - 1, one) : one;
      if (begin > end) continue;
      if (!agrees_around(midpoints, start[r])) return false;
      const int low = estimate(float_from_bits(begin)), high = estimate(float_from_bits(end));
      for (int k = low + 1; k <= high; ++k) {  // the first bit pattern whose estimate reaches k
        uint32_t x = begin, y = end;
        while (x < y) {
          const uint32_t mid = x + (y - x) / 2;
          if (estimate(float_from_bits(mid)) >= k)
            y = mid;
          else
            x = mid + 1;
        }
        if (!agrees_around(midpoints, float_from_bits(x))) return false;
      }
    }
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
  // The codes whose sign bit is set are exactly the first `negative_codes` (-1 if the signs are not so ordered), and
  // the codes <= 0 exactly the first `nonpositive_codes`: the vector paths take a code's sign from its index.
  int negative_codes;
  int nonpositive_codes;
  Estimator estimator;  // estimator.runs == 0: no search-free requantization for this map
  BytePlanes code_planes, midpoint_planes;

  explicit CodeTable(const float* values) {
    std::memcpy(code, values, sizeof(code));
    for (int j = 0; j < quant::kCodeSize - 1; ++j) midpoints[j] = quant::midpoint(code, j);
    midpoints[quant::kCodeSize - 1] = std::numeric_limits<float>::infinity();
    range = quant::bucket_range(midpoints);
    bucket_start.assign(quant::num_buckets(range) + 4, 0);
    const int steps = quant::build_bucket_table(midpoints, range, bucket_start.data());
    bucket_steps = steps <= kMaxBucketSteps ? steps : -1;
    negative_codes = 0;
    while (negative_codes < quant::kCodeSize && (float_bits(code[negative_codes]) >> 31)) ++negative_codes;
    for (int j = negative_codes; j < quant::kCodeSize; ++j)
      if (float_bits(code[j]) >> 31) negative_codes = -1;
    nonpositive_codes = 0;
    while (nonpositive_codes < quant::kCodeSize && code[nonpositive_codes] <= 0.0f) ++nonpositive_codes;
    estimator.build(code, midpoints);
    code_planes.build(code);
    midpoint_planes.build(midpoints);
  }

  // Whether the vector paths serve this map: codes' signs from their indices, and (AVX-512) the estimator or (AVX2)
  // a one-comparison bucket table.
  bool vector_ready(bool estimator_needed) const {
    return negative_codes >= 0 && (estimator_needed ? estimator.runs > 0 : bucket_steps == 1);
  }

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
