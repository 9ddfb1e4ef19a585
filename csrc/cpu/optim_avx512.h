// AVX-512 version of the CPU 8-bit Adam block update (16 lanes; gathers for the map lookups and the bucket search).
// The same float32 operations in the same order as the scalar code in optim.cpp (kestrel/optim.h), so results are
// bit-identical; chosen at run time when the CPU has AVX-512 F/BW/DQ/VL.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KESTREL_HAVE_AVX512_PATH 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "code_table.h"
#include "kestrel/optim.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,f16c")

namespace kestrel {
namespace cpu {
namespace avx512 {

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static inline __m512 round(__m512 v) { return v; }
};
template <>
struct Lanes<c10::Half> {
  static inline __m512 load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline __m256i to_bits(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store(c10::Half* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bits(v)); }
  static inline __m512 round(__m512 v) { return _mm512_cvtph_ps(to_bits(v)); }
};
template <>
struct Lanes<c10::BFloat16> {
  static inline __m512 load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  // Round to nearest even, NaN to 0x7FC0: c10::BFloat16's conversion.
  static inline __m512i to_bits32(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  }
  static inline void store(c10::BFloat16* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(to_bits32(v)));
  }
  static inline __m512 round(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(to_bits32(v), 16)); }
};

inline __m512 abs_ps(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

inline __mmask16 finite_mask(__m512 v) {
  return _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
}

// quant::nearest_code_bucketed<1> on 16 lanes: bucket start (a byte gathered as a dword, masked), one comparison.
inline __m512i nearest_code(const CodeTable& t, __m512 v) {
  const __m512i u = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));
  const __m512i key =
      _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32((int)0x80000000u)));
  const __m512i bucket = _mm512_srli_epi32(key, 32 - quant::kBucketBits);
  __m512i idx = _mm512_and_si512(_mm512_i32gather_epi32(bucket, t.bucket_start, 1), _mm512_set1_epi32(0xff));
  const __m512 mid = _mm512_i32gather_ps(idx, t.midpoints, 4);
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(mid, v, _CMP_LT_OQ), idx, _mm512_set1_epi32(1));
  return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), idx);  // NaN -> 0
}

// quant::apply_sign_fix on 16 lanes.
inline __m512i sign_fix(const CodeTable& t, __m512i idx, __m512 v) {
  const __m512 chosen = _mm512_i32gather_ps(idx, t.code, 4);
  const __mmask16 differs = _mm512_test_epi32_mask(
      _mm512_xor_si512(_mm512_castps_si512(chosen), _mm512_castps_si512(v)), _mm512_set1_epi32((int)0x80000000u));
  const __mmask16 positive = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
  idx = _mm512_mask_add_epi32(idx, differs & positive, idx, _mm512_set1_epi32(1));
  idx = _mm512_mask_sub_epi32(idx, differs & ~positive, idx, _mm512_set1_epi32(1));
  return _mm512_min_epi32(_mm512_max_epi32(idx, _mm512_setzero_si512()), _mm512_set1_epi32(quant::kCodeSize - 1));
}

// optim::round_denominator_code (robust) on 16 lanes: a positive value on a code <= 0 takes the next code up.
inline __m512i round_up_from_zero(const CodeTable& t, __m512i idx, __m512 v) {
  const __m512 chosen = _mm512_i32gather_ps(idx, t.code, 4);
  const __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ) &
                       _mm512_cmp_ps_mask(chosen, _mm512_setzero_ps(), _CMP_LE_OQ) &
                       _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(quant::kCodeSize - 1));
  return _mm512_mask_add_epi32(idx, up, idx, _mm512_set1_epi32(1));
}

inline __m512i load_codes(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Full 256-element blocks [first, end) of one tensor (the caller handles a partial last block with scalar code).
template <typename T>
void adam8bit_full_blocks(T* p, const T* g, uint8_t* c1, uint8_t* c2, float* absmax1, float* absmax2,
                          const optim::StepScalars& a, const CodeTable& q1, const CodeTable& q2, int64_t first,
                          int64_t end) {
  constexpr int kBlock = optim::kBlockSize;
  alignas(64) float s1[kBlock], s2[kBlock];
  __mmask16 finite[kBlock / 16];
  const __m512 beta1 = _mm512_set1_ps(a.beta1), beta2 = _mm512_set1_ps(a.beta2);
  const __m512 omb1 = _mm512_set1_ps(a.one_minus_beta1), omb2 = _mm512_set1_ps(a.one_minus_beta2);
  const __m512 gnorm = _mm512_set1_ps(a.gnorm_scale), step_size = _mm512_set1_ps(a.step_size);
  const __m512 eps_c2 = _mm512_set1_ps(a.eps_c2), decay = _mm512_set1_ps(a.decay);
  for (int64_t b = first; b < end; ++b) {
    const int64_t base = b * kBlock;
    const __m512 old1 = _mm512_set1_ps(absmax1[b]), old2 = _mm512_set1_ps(absmax2[b]);
    __m512 max1 = _mm512_setzero_ps(), max2 = _mm512_setzero_ps();
    for (int j = 0; j < kBlock / 16; ++j) {
      const int64_t i = base + 16 * j;
      const __m512 grad = _mm512_mul_ps(Lanes<T>::load(g + i), gnorm);
      __m512 m1 = _mm512_mul_ps(_mm512_i32gather_ps(load_codes(c1 + i), q1.code, 4), old1);
      __m512 m2 = _mm512_mul_ps(_mm512_i32gather_ps(load_codes(c2 + i), q2.code, 4), old2);
      m1 = _mm512_add_ps(_mm512_mul_ps(m1, beta1), _mm512_mul_ps(omb1, grad));
      m2 = _mm512_add_ps(_mm512_mul_ps(m2, beta2), _mm512_mul_ps(omb2, _mm512_mul_ps(grad, grad)));
      // optim::step_is_finite: the gradient and both new moments (a square that overflows skips the element)
      const __mmask16 ok = finite_mask(grad) & finite_mask(m1) & finite_mask(m2);
      m1 = _mm512_maskz_mov_ps(ok, m1);
      m2 = _mm512_maskz_mov_ps(ok, m2);
      finite[j] = ok;
      _mm512_store_ps(s1 + 16 * j, m1);
      _mm512_store_ps(s2 + 16 * j, m2);
      max1 = _mm512_max_ps(max1, abs_ps(m1));
      max2 = _mm512_max_ps(max2, abs_ps(m2));
    }
    const float new_max1 = _mm512_reduce_max_ps(max1), new_max2 = _mm512_reduce_max_ps(max2);
    absmax1[b] = new_max1;
    absmax2[b] = new_max2;
    for (int j = 0; j < kBlock / 16; ++j) {
      const int64_t i = base + 16 * j;
      const __m512 old_p = Lanes<T>::load(p + i);
      const __m512 update = _mm512_div_ps(_mm512_load_ps(s1 + 16 * j),
                                          _mm512_add_ps(_mm512_sqrt_ps(_mm512_load_ps(s2 + 16 * j)), eps_c2));
      __m512 new_p = Lanes<T>::round(_mm512_add_ps(old_p, _mm512_mul_ps(step_size, update)));
      if (a.apply_decay) new_p = Lanes<T>::round(_mm512_mul_ps(new_p, decay));
      Lanes<T>::store(p + i, _mm512_mask_mov_ps(old_p, finite[j], new_p));
    }
    const __m512 scale1 = _mm512_set1_ps(new_max1), scale2 = _mm512_set1_ps(new_max2);
    for (int j = 0; j < kBlock / 16; ++j) {
      const int64_t i = base + 16 * j;
      const __m512 v1 = new_max1 > 0.0f ? _mm512_div_ps(_mm512_load_ps(s1 + 16 * j), scale1) : _mm512_setzero_ps();
      const __m512 v2 = new_max2 > 0.0f ? _mm512_div_ps(_mm512_load_ps(s2 + 16 * j), scale2) : _mm512_setzero_ps();
      const __m512i idx1 = a.robust_rounding ? nearest_code(q1, v1) : sign_fix(q1, nearest_code(q1, v1), v1);
      const __m512i idx2 = a.robust_rounding ? round_up_from_zero(q2, nearest_code(q2, v2), v2) : nearest_code(q2, v2);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c1 + i), _mm512_cvtepi32_epi8(idx1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c2 + i), _mm512_cvtepi32_epi8(idx2));
    }
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace kestrel

#pragma GCC pop_options
#endif
