// AVX2 vector path of the CPU 8-bit optimizers (8 lanes), for CPUs without AVX-512 (most users' AMD and many Intel
// parts): the kernels of optim_vector.inc over the vector type below. Map lookups are gathers; requantization is one
// gather per 8 values from the map's StepTable (code_table.h: the nearest code with the sign fix or the round-up folded
// in, one comparison). The same float32 operations in the same order as the scalar loops, so the same bits; chosen at
// run time (cpu_isa.h: KESTREL_CPU_ISA caps it).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KESTREL_HAVE_AVX2_PATH 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "code_table.h"
#include "cpu_utils.h"
#include "kestrel/optim.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c")  // no "fma": nothing may be contracted (the build's -ffp-contract=off holds too)

namespace kestrel {
namespace cpu {
namespace avx2 {

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256 round(__m256 v) { return v; }
  // v rounded into T (as round does) and stored in the lanes of m (all-ones lanes); the others keep their bits. All
  // lanes (a step's every element but a skipped one): a plain store; else a load, a blend and a store (vmaskmovps
  // stores are slow on AMD).
  static inline void store_rounded(float* p, __m256 m, __m256 v) {
    if (__builtin_expect(_mm256_movemask_ps(m) == 0xFF, 1))
      _mm256_storeu_ps(p, v);
    else
      _mm256_storeu_ps(p, _mm256_blendv_ps(_mm256_loadu_ps(p), v, m));
  }
};

// 8 x 16-bit values into p where m (8 x 32-bit lanes) is set; the other values keep their bits.
inline void store16_where(void* p, __m256 m, __m128i bits) {
  if (__builtin_expect(_mm256_movemask_ps(m) == 0xFF, 1)) {  // all lanes: a plain store
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
    return;
  }
  const __m256i wide = _mm256_castps_si256(m);
  const __m128i mask = _mm_packs_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
  __m128i* q = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(q, _mm_blendv_epi8(_mm_loadu_si128(q), bits, mask));
}

// 8 values in [0, 0xFFFF] (32-bit lanes) to 8 x 16 bits
inline __m128i pack16(__m256i v) {
  return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

template <>
struct Lanes<c10::Half> {
  static inline __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // Round to nearest even, NaN to its sign | 0x7E00: c10::Half's conversion.
  static inline __m128i to_bits(__m256 v) {
    const __m128i bits = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 unordered = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    // no NaN lane: a rare branch instead of the NaN bits in every vector (fp16 steps 34-36% faster, one thread)
    if (__builtin_expect(_mm256_movemask_ps(unordered) == 0, 1)) return bits;
    const __m128i nan_bits = pack16(
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000)),
                        _mm256_set1_epi32(0x7E00)));
    const __m256i nan = _mm256_castps_si256(unordered);
    return _mm_blendv_epi8(bits, nan_bits,
                           _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1)));
  }
  static inline __m256 round(__m256 v) { return _mm256_cvtph_ps(to_bits(v)); }
  static inline void store_rounded(c10::Half* p, __m256 m, __m256 v) { store16_where(p, m, to_bits(v)); }
};
template <>
struct Lanes<c10::BFloat16> {
  // The 8 values in both 128-bit halves (vbroadcasti128: a load, no ALU uop), each moved to the top of its 32-bit lane
  // by one byte shuffle (vpmovzxwd and a shift are two uops, one on the shuffle port)
  static inline __m256 load(const c10::BFloat16* p) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i to_top = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, -1, -1, 8, 9, -1,
                                            -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(both, to_top));
  }
  // Round to nearest even, NaN to 0x7FC0: c10::BFloat16's conversion (as optim_avx512.h), in the top half of each lane
  // (u + 0x7FFF + lsb; the low half is left as the sum leaves it).
  static inline __m256i rounded_top(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    // NaN lanes by a branch (rarely taken): a blend in every vector cost 4-5% of an SGD8bit or Adagrad8bit bf16 step,
    // 12% of AdamW8bit's (two roundings), one thread. A tensor of NaN parameters (a diverged run) steps slower.
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    if (__builtin_expect(_mm256_movemask_ps(nan) == 0, 1)) return sum;
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(sum), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
  }
  // As a float: the bf16 bits in the top half, the low half zero.
  static inline __m256 round(__m256 v) {
    return _mm256_castsi256_ps(_mm256_and_si256(rounded_top(v), _mm256_set1_epi32((int)0xFFFF0000u)));
  }
  // The top halves gathered into the low 8 bytes of each 128-bit half by one byte shuffle, then the two halves'
  // quadwords joined by vpermq (where a shift, vextracti128 and vpackusdw are three uops).
  static inline void store_rounded(c10::BFloat16* p, __m256 m, __m256 v) {
    const __m256i from_top = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7,
                                              10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(rounded_top(v), from_top), 0x08);
    store16_where(p, m, _mm256_castsi256_si128(packed));
  }
};

struct V {
  using F = __m256;
  using M = __m256;  // all-ones lanes where true
  static constexpr int kLanes = 8;
  static constexpr int kPer = 8;  // vectors per 64-element group

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F sqrt(F x) { return _mm256_sqrt_ps(x); }
  static F max(F x, F y) { return _mm256_max_ps(x, y); }
  static F abs(F x) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff)));
  }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static F load_unaligned(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_store_ps(p, x); }
  static float reduce_max(F x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static M finite(F x) { return _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_EQ_OQ); }
  static M both(M x, M y) { return _mm256_and_ps(x, y); }
  // Both moments finite (optim::step_is_finite): x - x is NaN for NaN and +-inf
  static M both_finite(F x, F y) {
    return _mm256_cmp_ps(_mm256_add_ps(_mm256_sub_ps(x, x), _mm256_sub_ps(y, y)), _mm256_setzero_ps(), _CMP_EQ_OQ);
  }
  static F keep(M m, F x) { return _mm256_and_ps(x, m); }  // x where m, else +0
  static M all_lanes() { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
  // optim::sign_of: 1, -1 or 0 (NaN: 0)
  static F sign_of(F x) {
    const F one = _mm256_set1_ps(1.0f);
    return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ), one),
                         _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ), one));
  }

  static __m256i load_codes(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static void dequant_gathered(const CodeTable& q, const uint8_t* codes, F absmax, F* out) {
    dequant(q, codes, absmax, out);
  }
  static void dequant(const CodeTable& q, const uint8_t* codes, F absmax, F* out) {
    for (int k = 0; k < kPer; ++k)
      out[k] = _mm256_mul_ps(_mm256_i32gather_ps(q.code, load_codes(codes + 8 * k), 4), absmax);
  }

  // A map's step tables as the requantization uses them, read once per kernel call (as optim_avx512.h's Steps).
  struct Steps {
    struct Mode {
      __m256i shift, position_mask;
      const int* center;
      bool approx;  // the division-free requantization: not on this path (see requant)
    } mode[3];
    explicit Steps(const CodeTable& q) {
      for (int m = 0; m < 3; ++m) {
        const StepTable& t = q.step[m];
        mode[m] = {_mm256_set1_epi32(t.shift), _mm256_set1_epi32((int)t.position_mask()),
                   reinterpret_cast<const int*>(t.center()), false};
      }
    }
  };

  // The codes of 8 normalised values from a StepTable (as optim_avx512.h's requant_lanes), one per 32-bit lane: the
  // entry of v's bucket, its top byte plus 1 past its step (minus the comparison's all-ones).
  static KESTREL_ALWAYS_INLINE __m256i requant_lanes(const typename Steps::Mode& t, F v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i sign = _mm256_srai_epi32(bits, 31);
    const __m256i m =  // the monotone integer: (bits ^ (sign ? 0x7FFFFFFF : 0)) + (sign ? -1 : 0)
        _mm256_add_epi32(_mm256_xor_si256(bits, _mm256_and_si256(sign, _mm256_set1_epi32(0x7fffffff))), sign);
    const __m256i entry = _mm256_i32gather_epi32(t.center, _mm256_srav_epi32(m, t.shift), 4);
    const __m256i at =  // code << 24 | position: entry ^ ((entry ^ m) & mask)
        _mm256_xor_si256(entry, _mm256_and_si256(_mm256_xor_si256(entry, m), t.position_mask));
    return _mm256_sub_epi32(_mm256_srli_epi32(entry, StepTable::kCodeShift), _mm256_cmpgt_epi32(at, entry));
  }

  // 32 codes at a time: four vectors' codes packed (two saturating packs, in-lane) and put in order
  // by one dword permute, one store.
  // (NEAR is not used: Steps::Mode::approx is false here, so the kernels always divide on this path.)
  template <int MODE, bool NEAR = false>
  static KESTREL_ALWAYS_INLINE bool requant(const Steps& steps, const F* v, uint8_t* codes) {
    for (int h = 0; h < kPer; h += 4) {
      __m256i c[4];
      for (int k = 0; k < 4; ++k) c[k] = requant_lanes(steps.mode[MODE], v[h + k]);
      // dword d of the packed bytes holds lanes 4 (d / 4) .. + 3 of vector d % 4
      const __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 8 * h),
                          _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    return false;
  }
};

#include "optim_vector.inc"

}  // namespace avx2
}  // namespace cpu
}  // namespace kestrel

#pragma GCC pop_options
#endif
