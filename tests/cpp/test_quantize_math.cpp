// Unit test of the framework-free header kestrel/quantize.h, compiled with a plain C++ compiler (no torch).
// The CUDA kernel uses nearest_code_bsearch, the CPU kernels nearest_code_bucketed: both must equal the
// definition (count of float32 midpoints strictly below v) for every value, specials included.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "kestrel/quantize.h"

using namespace kestrel;

static int failures = 0;
#define CHECK(cond, ...)                                 \
  do {                                                   \
    if (!(cond)) {                                       \
      ++failures;                                        \
      if (failures < 20) {                               \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                        \
        std::printf("\n");                               \
      }                                                  \
    }                                                    \
  } while (0)

static int brute_force(const float* midpoints, float v) {
  int count = 0;
  for (int j = 0; j < quant::kCodeSize - 1; ++j) count += midpoints[j] < v;
  return count;
}

static void check_code(const std::vector<float>& code, const char* name) {
  float midpoints[quant::kMidpointsSize];
  for (int j = 0; j < quant::kCodeSize - 1; ++j) midpoints[j] = quant::midpoint(code.data(), j);
  midpoints[quant::kCodeSize - 1] = std::numeric_limits<float>::infinity();
  const quant::BucketRange range = quant::bucket_range(midpoints);
  std::vector<uint8_t> start(quant::num_buckets(range));
  const int steps = quant::build_bucket_table(midpoints, range, start.data());
  CHECK(steps >= 1, "%s: steps %d", name, steps);

  std::vector<float> values = {0.0f,
                               -0.0f,
                               1.0f,
                               -1.0f,
                               2.0f,
                               -2.0f,
                               std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::quiet_NaN(),
                               -std::numeric_limits<float>::quiet_NaN(),
                               std::numeric_limits<float>::denorm_min(),
                               -std::numeric_limits<float>::denorm_min(),
                               1e-30f,
                               -1e-30f};
  for (int j = 0; j < quant::kCodeSize - 1; ++j) {
    values.push_back(midpoints[j]);
    values.push_back(std::nextafter(midpoints[j], 2.0f));
    values.push_back(std::nextafter(midpoints[j], -2.0f));
    values.push_back(code[j]);
  }
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::uniform_real_distribution<float> exponent(-12.0f, 0.0f);
  for (int i = 0; i < 200000; ++i) values.push_back(uniform(rng) * std::pow(10.0f, exponent(rng)));

  for (float v : values) {
    const int expected = std::isnan(v) ? 0 : brute_force(midpoints, v);
    const int bsearch = quant::nearest_code_bsearch(midpoints, v);
    const int bucketed = steps <= 4 ? quant::nearest_code_bucketed<4>(midpoints, start.data(), range, v) : expected;
    CHECK(bsearch == expected, "%s: bsearch(%.9g) = %d, expected %d", name, v, bsearch, expected);
    CHECK(bucketed == expected, "%s: bucketed(%.9g) = %d, expected %d", name, v, bucketed, expected);
  }
}

// The signed dynamic map's shape near zero, enough to test the sign fix (values as bnb's map has them).
static void check_sign_fix() {
  std::vector<float> code(256);
  for (int i = 0; i < 256; ++i) code[i] = (i - 127) / 128.0f;  // 0 at index 127, negative below
  float midpoints[quant::kMidpointsSize];
  for (int j = 0; j < 255; ++j) midpoints[j] = quant::midpoint(code.data(), j);
  midpoints[255] = std::numeric_limits<float>::infinity();
  const float tiny_negative = -1e-6f, tiny_positive = 1e-6f;
  const int neg = quant::nearest_code_bsearch(midpoints, tiny_negative);
  const int pos = quant::nearest_code_bsearch(midpoints, tiny_positive);
  CHECK(neg == 127 && pos == 127, "tiny values round to the zero code (%d, %d)", neg, pos);
  CHECK(quant::apply_sign_fix(code.data(), neg, tiny_negative) == 126, "a tiny negative value keeps a negative code");
  CHECK(quant::apply_sign_fix(code.data(), pos, tiny_positive) == 127, "a tiny positive value may map to 0");
  CHECK(quant::apply_sign_fix(code.data(), 127, -0.0f) == 126, "-0 steps down, as in bnb (sign bits differ, not > 0)");
  CHECK(quant::apply_sign_fix(code.data(), 200, 0.5f) == 200, "same sign: unchanged");
  CHECK(quant::apply_sign_fix(code.data(), 100, 0.25f) == 101, "negative code for a positive value steps up");
}

static void check_helpers() {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float denorm = std::numeric_limits<float>::denorm_min();
  CHECK(quant::finite_absmax_combine(1.0f, 3.0f) == 3.0f && quant::finite_absmax_combine(3.0f, 1.0f) == 3.0f, "max");
  CHECK(quant::finite_absmax_combine(1.0f, nan) == 1.0f, "NaN is left out");
  CHECK(quant::finite_absmax_combine(1.0f, inf) == 1.0f, "inf is left out");
  CHECK(quant::finite_absmax_combine(0.0f, std::numeric_limits<float>::max()) == std::numeric_limits<float>::max(),
        "the largest finite float joins");
  const quant::BlockScale zero = quant::block_scale(0.0f), four = quant::block_scale(4.0f);
  CHECK(zero.pre == 1.0f && zero.inv == 0.0f, "absmax 0: inv 0");
  CHECK(four.pre == 1.0f && four.inv == 0.25f, "1/4, IEEE division");
  CHECK(quant::normalize(3.0f, four) == 0.75f, "3/4");
  CHECK(quant::normalize(nan, four) == 0.0f, "NaN normalises to 0");
  CHECK(quant::normalize(inf, four) == inf && quant::normalize(-inf, four) == -inf, "inf stays inf");
  CHECK(quant::normalize(inf, zero) == 0.0f && quant::normalize(5.0f, zero) == 0.0f, "absmax 0: everything to 0");
  // A subnormal absmax: 1/absmax overflows in float32, the 2^64 pre-scale does not.
  for (float a : {denorm, 3 * denorm, 1e-39f, 2.9e-39f, 3e-39f, 1e-38f}) {
    const quant::BlockScale s = quant::block_scale(a);
    CHECK(std::isfinite(s.inv) && s.inv > 0.0f, "subnormal absmax %g: finite inv", a);
    CHECK(quant::normalize(a, s) == 1.0f && quant::normalize(-a, s) == -1.0f, "subnormal absmax %g: +-1", a);
    CHECK(quant::normalize(0.0f, s) == 0.0f, "subnormal absmax %g: 0 stays 0", a);
  }
  CHECK(quant::normalize(denorm, quant::block_scale(2 * denorm)) == 0.5f, "half of a subnormal absmax");
  // An absmax above 2^126: 1/absmax would be subnormal (fewer bits); the 2^-64 pre-scale keeps it normal.
  const float huge = std::numeric_limits<float>::max();
  for (float a : {huge, 3e38f, 1e38f, 8.6e37f}) {
    const quant::BlockScale s = quant::block_scale(a);
    CHECK(s.pre < 1.0f && s.inv >= std::numeric_limits<float>::min(), "large absmax %g: normal inv", a);
    CHECK(quant::normalize(a, s) == 1.0f && quant::normalize(-a, s) == -1.0f, "large absmax %g: +-1", a);
    CHECK(quant::normalize(inf, s) == inf, "large absmax %g: inf stays inf", a);
    const double exact = 0.3 * a / a;
    CHECK(std::fabs(quant::normalize(0.3f * a, s) - exact) <= 1e-7, "large absmax %g: 0.3 to float32 accuracy", a);
  }
  CHECK(quant::block_scale(8.50705917e+37f).pre == 1.0f, "2^126 itself: 1/absmax = 2^-126 is normal");
  // A normal absmax: exactly x * (1 / absmax), as before the pre-scale existed.
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f), exponent(-37.0f, 37.9f);
  for (int i = 0; i < 100000; ++i) {
    const float a = std::fmin(std::fabs(uniform(rng)) * std::pow(10.0f, exponent(rng)) + 1e-37f, 8.5e37f);
    const float x = uniform(rng) * a;
    const float expected = x * (1.0f / a);
    CHECK(quant::normalize(x, quant::block_scale(a)) == expected, "x %g absmax %g", x, a);
  }
  std::vector<float> sorted = {
      -std::numeric_limits<float>::infinity(),  -3e38f, -1.0f, -1e-30f, -std::numeric_limits<float>::denorm_min(), 0.0f,
      std::numeric_limits<float>::denorm_min(), 1e-30f, 1.0f,  3e38f,   std::numeric_limits<float>::infinity()};
  // Buckets are ordered as the values are, -0 shares +0's, and the clamped ends hold the extremes.
  for (const quant::BucketRange range :
       {quant::BucketRange{0, 1}, quant::BucketRange{13000, 3300}, quant::BucketRange{0, 0x7f81}}) {
    CHECK(quant::bucket_of(-0.0f, range) == quant::bucket_of(0.0f, range), "-0 and +0 share a bucket");
    for (size_t i = 0; i + 1 < sorted.size(); ++i)
      CHECK(quant::bucket_of(sorted[i], range) <= quant::bucket_of(sorted[i + 1], range), "bucket order at %g",
            sorted[i]);
    CHECK(quant::bucket_of(-std::numeric_limits<float>::infinity(), range) == 0, "-inf: the first bucket");
    CHECK(quant::bucket_of(std::numeric_limits<float>::infinity(), range) == (uint32_t)quant::num_buckets(range) - 1,
          "inf: the last bucket");
  }
}

int main(int argc, char** argv) {
  std::vector<float> linear(256), dense_zero(256, 0.0f), lopsided(256);
  for (int i = 0; i < 256; ++i) linear[i] = -1.0f + 2.0f * i / 255.0f;
  for (int i = 0; i < 16; ++i) dense_zero[240 + i] = (i + 1) / 16.0f;  // 240 zeros: a degenerate, many-ties map
  for (int i = 0; i < 256; ++i) lopsided[i] = std::pow(10.0f, -7.0f + 7.0f * i / 255.0f);  // log-spaced
  check_code(linear, "linear");
  check_code(dense_zero, "dense_zero");
  check_code(lopsided, "log-spaced");
  // Further maps (the dynamic ones) come from the Python test as a binary file of 256-float maps.
  if (argc > 1) {
    FILE* f = std::fopen(argv[1], "rb");
    std::vector<float> code(256);
    int count = 0;
    while (f && std::fread(code.data(), sizeof(float), 256, f) == 256) check_code(code, "map from file"), ++count;
    if (f) std::fclose(f);
    CHECK(count > 0, "no map read from %s", argv[1]);
  }
  check_sign_fix();
  check_helpers();
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
