// AVX2 version of the CPU 8-bit Adam block update (8 lanes; gathers for the map lookups and the bucket search), for
// the CPUs without AVX-512 (most users' AMD and many Intel parts). The same float32 operations in the same order as
// the scalar code in optim.cpp (kestrel/optim.h) and as optim_avx512.h, so results are bit-identical; chosen at run
// time (cpu_isa.h: KESTREL_CPU_ISA forces a lower one).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KESTREL_HAVE_AVX2_PATH 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "code_table.h"
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
  static inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static inline __m256 round(__m256 v) { return v; }
};
template <>
struct Lanes<c10::Half> {
  static inline __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline __m128i to_bits(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store(c10::Half* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bits(v)); }
  static inline __m256 round(__m256 v) { return _mm256_cvtph_ps(to_bits(v)); }
};
template <>
struct Lanes<c10::BFloat16> {
  static inline __m256 load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  // Round to nearest even, NaN to 0x7FC0: c10::BFloat16's conversion (as optim_avx512.h).
  static inline __m256i to_bits32(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  }
  static inline void store(c10::BFloat16* p, __m256 v) {
    const __m256i bits = to_bits32(v);  // 8 x u16 in 32-bit lanes
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static inline __m256 round(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(to_bits32(v), 16)); }
};

inline __m256 abs_ps(__m256 v) {
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)));
}

// All-ones lanes where v is finite.
inline __m256 finite_mask(__m256 v) {
  return _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_EQ_OQ);
}

inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// quant::nearest_code_bucketed<1> on 8 lanes: the bucket start (a byte gathered as a dword, masked), one comparison.
inline __m256i nearest_code(const CodeTable& t, __m256 v) {
  const __m256i u = _mm256_castps_si256(_mm256_add_ps(v, _mm256_setzero_ps()));
  const __m256i key =
      _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32((int)0x80000000u)));
  const __m256i bucket = _mm256_srli_epi32(key, 32 - quant::kBucketBits);
  __m256i idx = _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(t.bucket_start), bucket, 1),
                                 _mm256_set1_epi32(0xff));
  const __m256 mid = _mm256_i32gather_ps(t.midpoints, idx, 4);
  idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(mid, v, _CMP_LT_OQ)));  // +1 where mid < v
  return _mm256_and_si256(idx, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));   // NaN -> 0
}

// quant::apply_sign_fix on 8 lanes.
inline __m256i sign_fix(const CodeTable& t, __m256i idx, __m256 v) {
  const __m256 chosen = _mm256_i32gather_ps(t.code, idx, 4);
  const __m256i differs = _mm256_srai_epi32(_mm256_xor_si256(_mm256_castps_si256(chosen), _mm256_castps_si256(v)), 31);
  const __m256i positive = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
  idx = _mm256_sub_epi32(idx, _mm256_and_si256(differs, positive));     // +1
  idx = _mm256_add_epi32(idx, _mm256_andnot_si256(positive, differs));  // -1
  return _mm256_min_epi32(_mm256_max_epi32(idx, _mm256_setzero_si256()), _mm256_set1_epi32(quant::kCodeSize - 1));
}

// optim::round_denominator_code (robust) on 8 lanes: a positive value on a code <= 0 takes the next code up.
inline __m256i round_up_from_zero(const CodeTable& t, __m256i idx, __m256 v) {
  const __m256 chosen = _mm256_i32gather_ps(t.code, idx, 4);
  const __m256i up =
      _mm256_and_si256(_mm256_castps_si256(_mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ),
                                                         _mm256_cmp_ps(chosen, _mm256_setzero_ps(), _CMP_LE_OQ))),
                       _mm256_cmpgt_epi32(_mm256_set1_epi32(quant::kCodeSize - 1), idx));
  return _mm256_sub_epi32(idx, up);
}

inline __m256i load_codes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 8 codes in [0, 255] (32-bit lanes) to 8 bytes.
inline void store_codes(uint8_t* p, __m256i idx) {
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(words, words));
}

// Full 256-element blocks [first, end) of one tensor (the caller handles a partial last block with scalar code).
template <typename T>
void adam8bit_full_blocks(T* p, const T* g, uint8_t* c1, uint8_t* c2, float* absmax1, float* absmax2,
                          const optim::StepScalars& a, const CodeTable& q1, const CodeTable& q2, int64_t first,
                          int64_t end) {
  constexpr int kBlock = optim::kBlockSize;
  constexpr int kLanes = 8;
  alignas(32) float s1[kBlock], s2[kBlock];
  __m256 finite[kBlock / kLanes];
  const __m256 beta1 = _mm256_set1_ps(a.beta1), beta2 = _mm256_set1_ps(a.beta2);
  const __m256 omb1 = _mm256_set1_ps(a.one_minus_beta1), omb2 = _mm256_set1_ps(a.one_minus_beta2);
  const __m256 gnorm = _mm256_set1_ps(a.gnorm_scale), step_size = _mm256_set1_ps(a.step_size);
  const __m256 eps_c2 = _mm256_set1_ps(a.eps_c2), decay = _mm256_set1_ps(a.decay);
  for (int64_t b = first; b < end; ++b) {
    const int64_t base = b * kBlock;
    const __m256 old1 = _mm256_set1_ps(absmax1[b]), old2 = _mm256_set1_ps(absmax2[b]);
    __m256 max1 = _mm256_setzero_ps(), max2 = _mm256_setzero_ps();
    for (int j = 0; j < kBlock / kLanes; ++j) {
      const int64_t i = base + kLanes * j;
      const __m256 grad = _mm256_mul_ps(Lanes<T>::load(g + i), gnorm);
      __m256 m1 = _mm256_mul_ps(_mm256_i32gather_ps(q1.code, load_codes(c1 + i), 4), old1);
      __m256 m2 = _mm256_mul_ps(_mm256_i32gather_ps(q2.code, load_codes(c2 + i), 4), old2);
      m1 = _mm256_add_ps(_mm256_mul_ps(m1, beta1), _mm256_mul_ps(omb1, grad));
      m2 = _mm256_add_ps(_mm256_mul_ps(m2, beta2), _mm256_mul_ps(omb2, _mm256_mul_ps(grad, grad)));
      // optim::step_is_finite: the gradient and both new moments (a square that overflows skips the element)
      const __m256 ok = _mm256_and_ps(_mm256_and_ps(finite_mask(grad), finite_mask(m1)), finite_mask(m2));
      m1 = _mm256_and_ps(m1, ok);
      m2 = _mm256_and_ps(m2, ok);
      finite[j] = ok;
      _mm256_store_ps(s1 + kLanes * j, m1);
      _mm256_store_ps(s2 + kLanes * j, m2);
      max1 = _mm256_max_ps(max1, abs_ps(m1));
      max2 = _mm256_max_ps(max2, abs_ps(m2));
    }
    const float new_max1 = reduce_max(max1), new_max2 = reduce_max(max2);
    absmax1[b] = new_max1;
    absmax2[b] = new_max2;
    for (int j = 0; j < kBlock / kLanes; ++j) {
      const int64_t i = base + kLanes * j;
      const __m256 old_p = Lanes<T>::load(p + i);
      const __m256 update = _mm256_div_ps(_mm256_load_ps(s1 + kLanes * j),
                                          _mm256_add_ps(_mm256_sqrt_ps(_mm256_load_ps(s2 + kLanes * j)), eps_c2));
      __m256 new_p = Lanes<T>::round(_mm256_add_ps(old_p, _mm256_mul_ps(step_size, update)));
      if (a.apply_decay) new_p = Lanes<T>::round(_mm256_mul_ps(new_p, decay));
      Lanes<T>::store(p + i, _mm256_blendv_ps(old_p, new_p, finite[j]));
    }
    const __m256 scale1 = _mm256_set1_ps(new_max1), scale2 = _mm256_set1_ps(new_max2);
    for (int j = 0; j < kBlock / kLanes; ++j) {
      const int64_t i = base + kLanes * j;
      const __m256 v1 = new_max1 > 0.0f ? _mm256_div_ps(_mm256_load_ps(s1 + kLanes * j), scale1) : _mm256_setzero_ps();
      const __m256 v2 = new_max2 > 0.0f ? _mm256_div_ps(_mm256_load_ps(s2 + kLanes * j), scale2) : _mm256_setzero_ps();
      const __m256i idx1 = a.robust_rounding ? nearest_code(q1, v1) : sign_fix(q1, nearest_code(q1, v1), v1);
      const __m256i idx2 = a.robust_rounding ? round_up_from_zero(q2, nearest_code(q2, v2), v2) : nearest_code(q2, v2);
      store_codes(c1 + i, idx1);
      store_codes(c2 + i, idx2);
    }
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace kestrel

#pragma GCC pop_options
#endif
