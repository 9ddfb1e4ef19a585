// Block-wise dynamic quantization: the per-element math, shared by the CPU and CUDA kernels.
//
// A block of `blocksize` consecutive elements is stored as one float32 absmax and one uint8 code per element.
// absmax is the largest |x| over the block's finite elements (inf and NaN are left out, so they cannot spoil
// their finite neighbours). The code of x is the index of the nearest value of a sorted 256-entry map to
// v = x * (1 / absmax): the number of float32 midpoints (map[j] + map[j+1]) * 0.5f strictly below v, so a value
// exactly on a midpoint takes the lower index. +inf and -inf therefore take the map's last and first codes
// (they saturate), and NaN takes the code of 0. A block without a finite nonzero element has absmax 0 and every
// code is the code of 0 (decoded: 0, never NaN). A subnormal absmax, or one above 2^126, is first scaled by a power
// of two (block_scale), so 1/absmax neither overflows nor turns subnormal: v is x * (1 / absmax) as if float32 had
// an unbounded exponent range.
#pragma once

#include "kestrel/common.h"

namespace kestrel {
namespace quant {

constexpr int kCodeSize = 256;
// 255 midpoints plus a +inf sentinel, so a search may read index 255 without a bounds check.
constexpr int kMidpointsSize = 256;

KESTREL_HD float midpoint(const float* code, int j) {
  return (code[j] + code[j + 1]) * 0.5f;
}

// Max of magnitudes over finite elements: `a` (= |x|) joins the running max only if it is finite, so inf and NaN
// never enter a block's absmax. On finite values an ordinary max.
KESTREL_HD float finite_absmax_combine(float running, float a) {
  return (a > running && a <= 3.40282347e+38f) ? a : running;
}

// What a block's values are multiplied by: v = (x * pre) * inv. For a normal absmax pre = 1 and inv = 1/absmax
// (IEEE division, as bnb's kernel computes it). Where 1/absmax would leave the normal range, a power of two brings
// absmax back into it first: a subnormal absmax takes pre = 2^64 (1/absmax may overflow), an absmax above 2^126
// pre = 2^-64 (1/absmax would be subnormal, losing bits); inv = 1/(absmax * pre), and since scaling by a power of
// two is exact, v is x * (1/absmax) as if float32 had an unbounded exponent range. absmax 0: inv = 0 (the block
// maps to the code of 0).
struct BlockScale {
  float pre;
  float inv;
};

KESTREL_HD BlockScale block_scale(float absmax) {
  constexpr float kMinNormal = 1.17549435e-38f, kTwo126 = 8.50705917e+37f;
  constexpr float kTwo64 = 18446744073709551616.0f, kTwoMinus64 = 5.42101086e-20f;
  if (!(absmax > 0.0f)) return {1.0f, 0.0f};
  if (absmax < kMinNormal) return {kTwo64, 1.0f / (absmax * kTwo64)};
  if (absmax > kTwo126) return {kTwoMinus64, 1.0f / (absmax * kTwoMinus64)};
  return {1.0f, 1.0f / absmax};
}

// The normalised value an element is quantized as: (x * pre) * inv, and 0 for NaN (a NaN element takes the code
// of 0; +-inf stay infinite and saturate to the map's ends in the search).
KESTREL_HD float normalize(float x, BlockScale s) {
  const float v = (x * s.pre) * s.inv;
  return v == v ? v : 0.0f;
}

// Count of midpoints strictly below v: a branchless lower bound over the 255 sorted midpoints. NaN gives 0.
KESTREL_HD int nearest_code_bsearch(const float* midpoints, float v) {
  int idx = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int step = 128; step > 0; step >>= 1) idx += (midpoints[idx + step - 1] < v) ? step : 0;
  return idx;
}

#if !defined(__CUDACC_RTC__)  // host-only (NVRTC compiles device code only)
// A bucket table for the CPU search: the bucket of v is the top 16 bits of |v| below the sign (8 exponent and 7
// mantissa bits), clamped to [lo, lo + span) -- the range in which the map has midpoints -- and mirrored for negative
// values, so buckets are ordered as the values are: b = span + r for v >= 0 and span - 1 - r for v < 0, r the clamped
// offset (-0 is folded onto +0). For the dynamic maps span is about 2,950: a 6 KiB table, resident in L1. start[b]
// is the number of midpoints in buckets below b, so the count for v is start[bucket(v)] plus at most the largest
// number of midpoints sharing one bucket (1 for the dynamic maps) further comparisons.
struct BucketRange {
  int lo;    // the first bucketed value of |v|'s top 16 bits; smaller ones share offset 0
  int span;  // offsets per sign; larger ones (and inf) share offset span - 1
};

inline uint32_t bucket_of(float v, BucketRange range) {
  const uint32_t u = float_bits(v + 0.0f);
  int r = (int)((u & 0x7fffffffu) >> 16) - range.lo;
  r = r < 0 ? 0 : (r > range.span - 1 ? range.span - 1 : r);
  return (uint32_t)(range.span + (r ^ -(int)(u >> 31)));  // negative: span + ~r = span - 1 - r
}

// The narrowest range whose end offsets hold no nonzero midpoint (so clamping merges no two of them).
inline BucketRange bucket_range(const float* midpoints) {
  int lo = 0x7fff, hi = 0;
  for (int j = 0; j < kCodeSize - 1; ++j) {
    const int e = (int)((float_bits(midpoints[j]) & 0x7fffffffu) >> 16);
    if (e == 0) continue;
    lo = e < lo ? e : lo;
    hi = e > hi ? e : hi;
  }
  if (hi == 0) return {0, 1};
  lo = lo > 0 ? lo - 1 : 0;
  return {lo, hi + 1 - lo + 1};
}

inline int num_buckets(BucketRange range) {
  return 2 * range.span;
}

// Fills start[num_buckets(range)] for sorted, finite midpoints; returns the largest number of midpoints that share
// one bucket.
inline int build_bucket_table(const float* midpoints, BucketRange range, uint8_t* start) {
  static_assert(kCodeSize - 1 <= 255, "bucket starts are stored as uint8");
  int counts_seen = 0, max_per_bucket = 0, j = 0;
  for (uint32_t b = 0; b < (uint32_t)num_buckets(range); ++b) {
    start[b] = (uint8_t)counts_seen;
    int in_bucket = 0;
    while (j < kCodeSize - 1 && bucket_of(midpoints[j], range) == b) ++j, ++in_bucket;
    counts_seen += in_bucket;
    if (in_bucket > max_per_bucket) max_per_bucket = in_bucket;
  }
  return max_per_bucket;
}

// Same result as nearest_code_bsearch for sorted, finite midpoints when STEPS >= build_bucket_table's result.
template <int STEPS>
inline int nearest_code_bucketed(const float* midpoints, const uint8_t* start, BucketRange range, float v) {
  int idx = start[bucket_of(v, range)];
  for (int s = 0; s < STEPS; ++s) idx += (midpoints[idx] < v) ? 1 : 0;
  return idx & -(int)(v == v);  // NaN -> 0, without a branch
}
#endif

// bnb's sign fix for requantized optimizer states (signed map): if the sign bit of the chosen code's value
// differs from v's, step one code up when v > 0 and down otherwise. A tiny negative moment then keeps a
// negative code instead of +0. Clamped to the map, which bnb's kernel never needs for finite v.
KESTREL_HD int apply_sign_fix(const float* code, int idx, float v) {
  if ((float_bits(code[idx]) >> 31) == (float_bits(v) >> 31)) return idx;
  if (v > 0.0f) return idx < kCodeSize - 1 ? idx + 1 : idx;
  return idx > 0 ? idx - 1 : idx;
}

KESTREL_HD float dequantize_value(const float* code, uint8_t c, float absmax) {
  return code[c] * absmax;
}

}  // namespace quant
}  // namespace kestrel
