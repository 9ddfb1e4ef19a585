// AVX-512 vector paths of the CPU 8-bit optimizers (16 lanes): the kernels of optim_vector.inc over the vector types
// below, in three variants chosen at run time (cpu_isa.h): `avx512vbmi` (Ice Lake, Zen 4 and later) looks maps up 64
// indices at a time with byte permutes over the tables' byte planes (the second moments of the Adam kernels and of
// LAMB's norm pass by gathers, to share the work between the shuffle port and the load ports), `avx512` (Skylake-X,
// Cascade Lake) gathers, and `avx512bf16` (Sapphire Rapids, Zen 4) is avx512vbmi with bf16 parameters stored by
// vcvtneps2bf16. All requantize with one gather per 16 values from the map's StepTable (code_table.h: the nearest code
// with the sign fix or the round-up folded in, one comparison), looking up s * (1 / absmax) where the quotient is
// wanted and dividing only a group with a value at its bucket's step (the same codes; code_table.h). The same float32
// operations in the same order as the scalar loops, so every path gives the same bits.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KESTREL_HAVE_AVX512_PATH 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "code_table.h"
#include "cpu_utils.h"
#include "kestrel/optim.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and warn about it (GCC bug 105593): not our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
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

inline bool supported_vbmi() {
  static const bool ok = supported() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __m512 round(__m512 v) { return v; }
  // v rounded into T (as round does) and stored in the lanes of m; the others keep their bits.
  static inline void store_rounded(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
};
template <>
struct Lanes<c10::Half> {
  static inline __m512 load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // Round to nearest even, NaN to its sign | 0x7E00: c10::Half's conversion.
  static inline __m256i to_bits(__m512 v) {
    const __m256i bits = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    // no NaN lane: a rare branch instead of the NaN bits in every vector (fp16 steps 14-23% faster, one thread)
    if (__builtin_expect(nan == 0, 1)) return bits;
    const __m256i nan_bits = _mm512_cvtepi32_epi16(
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000)),
                        _mm512_set1_epi32(0x7E00)));
    return _mm256_mask_mov_epi16(bits, nan, nan_bits);
  }
  static inline __m512 round(__m512 v) { return _mm512_cvtph_ps(to_bits(v)); }
  static inline void store_rounded(c10::Half* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, to_bits(v)); }
};
template <>
struct Lanes<c10::BFloat16> {
  static inline __m512 load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  // Round to nearest even, NaN to 0x7FC0: c10::BFloat16's conversion, as a float (the bf16 bits in the top half, the
  // low half zero: u + 0x7FFF + lsb, masked).
  static inline __m512 round(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb),
                                             _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000)));
  }
  // The bf16 bits of v, rounded: round(v)'s top halves (the odd words), put in the low 256 bits by one word permute
  // (vpermw: one uop where a shift and vpmovdw are three).
  static inline __m256i to_bits(__m512 v) {
    alignas(64) static const uint16_t odd_words[32] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                                       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    return _mm512_castsi512_si256(
        _mm512_permutexvar_epi16(_mm512_load_si512(odd_words), _mm512_castps_si512(round(v))));
  }
  static inline void store_rounded(c10::BFloat16* p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, to_bits(v));
  }
};

// Everything but the map lookups, shared by both variants.
struct Base {
  using F = __m512;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kPer = 4;  // vectors per 64-element group

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F sqrt(F x) { return _mm512_sqrt_ps(x); }
  static F max(F x, F y) { return _mm512_max_ps(x, y); }
  static F abs(F x) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
  }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static F load_unaligned(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_store_ps(p, x); }
  static float reduce_max(F x) { return _mm512_reduce_max_ps(x); }
  static M finite(F x) { return _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_EQ_OQ); }
  static M both(M x, M y) { return x & y; }
  static F keep(M m, F x) { return _mm512_maskz_mov_ps(m, x); }  // x where m, else +0
  static M all_lanes() { return static_cast<M>(0xFFFF); }
  // optim::sign_of: 1, -1 or 0 (NaN: 0)
  static F sign_of(F x) {
    const F one = _mm512_set1_ps(1.0f);
    return _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), one),
                         _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), one));
  }

  // Both moments finite (optim::step_is_finite): vfpclassps for NaN and +-inf.
  static M both_finite(F x, F y) {
    return static_cast<M>(~(_mm512_fpclass_ps_mask(x, 0x99) | _mm512_fpclass_ps_mask(y, 0x99)));
  }

  // A map's step tables as the requantization uses them, read once per kernel call (codes are bytes: every store of
  // them may alias the table, so reading it per group would reload it).
  struct Steps {
    struct Mode {
      __m512i shift, position_mask;
      const uint32_t* center;
      bool approx;  // StepTable::approx: the division-free requantization
    } mode[3];
    explicit Steps(const CodeTable& q) {
      for (int m = 0; m < 3; ++m) {
        const StepTable& t = q.step[m];
        mode[m] = {_mm512_set1_epi32(t.shift), _mm512_set1_epi32((int)t.position_mask()), t.center(), t.approx};
      }
    }
  };

  // The codes of 64 normalised values under MODE (StepTable), one per 32-bit lane: the top byte (the rest is the
  // entry's threshold). NEAR: also whether a lane sits at its bucket's step (position - thr in {0, 1}), where a
  // neighbouring float may take the other code (code_table.h: the division-free requantization).
  template <int MODE, bool NEAR = false>
  static KESTREL_ALWAYS_INLINE bool requant_lanes(const Steps& steps, const F* v, __m512i* out) {
    const typename Steps::Mode& t = steps.mode[MODE];
    __mmask16 near = 0;
    for (int k = 0; k < kPer; ++k) {
      const __m512i bits = _mm512_castps_si512(v[k]);
      // the monotone integer: (bits ^ (sign ? 0x7FFFFFFF : 0)) + (sign ? -1 : 0), (a ^ (b & c)) + b
      const __m512i sign = _mm512_srai_epi32(bits, 31);
      const __m512i m =
          _mm512_add_epi32(_mm512_ternarylogic_epi32(bits, sign, _mm512_set1_epi32(0x7fffffff), 0x78), sign);
      const __m512i entry = _mm512_i32gather_epi32(_mm512_srav_epi32(m, t.shift), t.center, 4);
      // code << 24 | position (c ? a : b): it exceeds the entry (the same code bits) when the position is past thr
      const __m512i at = _mm512_ternarylogic_epi32(m, entry, t.position_mask, 0xE4);
      out[k] = _mm512_mask_add_epi32(entry, _mm512_cmpgt_epi32_mask(at, entry), entry,
                                     _mm512_set1_epi32(1 << StepTable::kCodeShift));
      if (NEAR) near |= _mm512_cmplt_epu32_mask(_mm512_sub_epi32(at, entry), _mm512_set1_epi32(2));
    }
    return near != 0;
  }

  static __m512i load_codes(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// Map lookups by gathers.
struct V : Base {
  static void dequant_gathered(const CodeTable& q, const uint8_t* codes, F absmax, F* out) {
    dequant(q, codes, absmax, out);
  }
  static void dequant(const CodeTable& q, const uint8_t* codes, F absmax, F* out) {
    for (int k = 0; k < kPer; ++k)
      out[k] = _mm512_mul_ps(_mm512_i32gather_ps(load_codes(codes + 16 * k), q.code, 4), absmax);
  }
  template <int MODE, bool NEAR = false>
  static KESTREL_ALWAYS_INLINE bool requant(const Steps& steps, const F* v, uint8_t* codes) {
    __m512i lanes[kPer];
    const bool near = requant_lanes<MODE, NEAR>(steps, v, lanes);
    for (int k = 0; k < kPer; ++k)  // each lane's top byte, by vpmovdb
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16 * k),
                       _mm512_cvtepi32_epi8(_mm512_srli_epi32(lanes[k], StepTable::kCodeShift)));
    return near;
  }
};

#include "optim_vector.inc"

}  // namespace avx512
}  // namespace cpu
}  // namespace kestrel

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,f16c")

namespace kestrel {
namespace cpu {
namespace avx512vbmi {

using avx512::Base;
using avx512::Lanes;

// Map lookups by byte permutes: 64 indices (bytes) against a table's four byte planes (BytePlanes), two 128-entry
// permutes and a select on the index's top bit per plane, then the planes interleaved into four float vectors. The
// interleave (unpack bytes, then words, within 128-bit lanes) puts byte position 16L + 4q + j of the planes into lane
// 4L + j of vector q, so the indices are first permuted so that position holds element 16q + 4L + j: the vectors then
// come out in element order.
struct V : Base {
  // kSpread[p] = 16q + 4L + j for p = 16L + 4q + j
  static __m512i spread() {
    alignas(64) static const uint8_t order[64] = {0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
                                                  4,  5,  6,  7,  20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
                                                  8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
                                                  12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
    return _mm512_load_si512(order);
  }

  // table[idx] for 64 byte indices already spread, as four float vectors in element order
  static void lookup64(const BytePlanes& t, __m512i idx, F* out) {
    const __mmask64 high = _mm512_movepi8_mask(idx);
    __m512i plane[4];
    for (int k = 0; k < 4; ++k) {
      const uint8_t* p = t.plane[k];
      const __m512i low_half = _mm512_permutex2var_epi8(_mm512_load_si512(p), idx, _mm512_load_si512(p + 64));
      const __m512i high_half = _mm512_permutex2var_epi8(_mm512_load_si512(p + 128), idx, _mm512_load_si512(p + 192));
      plane[k] = _mm512_mask_blend_epi8(high, low_half, high_half);
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(plane[0], plane[1]), hi01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(plane[2], plane[3]), hi23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23));
  }

  // The same values by gathers (avx512's dequant): the port-5 permutes and the load ports' gathers shared out, the
  // Adam kernels and LAMB's norm pass look their second moments up this way (AdamW8bit steps 4-7% faster, bf16 and
  // fp32; the norm pass 9-14%; one thread).
  static void dequant_gathered(const CodeTable& q, const uint8_t* codes, F absmax, F* out) {
    avx512::V::dequant(q, codes, absmax, out);
  }
  static void dequant(const CodeTable& q, const uint8_t* codes, F absmax, F* out) {
    const __m512i idx = _mm512_permutexvar_epi8(spread(), _mm512_loadu_si512(codes));
    lookup64(q.code_planes, idx, out);
    for (int k = 0; k < kPer; ++k) out[k] = _mm512_mul_ps(out[k], absmax);
  }

  template <int MODE, bool NEAR = false>
  static KESTREL_ALWAYS_INLINE bool requant(const Steps& steps, const F* v, uint8_t* codes) {
    __m512i lanes[kPer];
    const bool near = requant_lanes<MODE, NEAR>(steps, v, lanes);
    // the lanes' top bytes in element order: bytes 3, 7, ..., 127 of (lanes[0], lanes[1]) and of (lanes[2], lanes[3])
    alignas(64) static const uint8_t pick[64] = {3,  7,  11, 15, 19, 23, 27, 31, 35, 39,  43,  47,  51,  55,  59,  63,
                                                 67, 71, 75, 79, 83, 87, 91, 95, 99, 103, 107, 111, 115, 119, 123, 127,
                                                 3,  7,  11, 15, 19, 23, 27, 31, 35, 39,  43,  47,  51,  55,  59,  63,
                                                 67, 71, 75, 79, 83, 87, 91, 95, 99, 103, 107, 111, 115, 119, 123, 127};
    const __m512i order = _mm512_load_si512(pick);
    const __m512i from01 = _mm512_permutex2var_epi8(lanes[0], order, lanes[1]);
    const __m512i from23 = _mm512_permutex2var_epi8(lanes[2], order, lanes[3]);
    _mm512_storeu_si512(codes, _mm512_mask_blend_epi8(0xFFFFFFFF00000000ull, from01, from23));
    return near;
  }
};

#include "optim_vector.inc"

}  // namespace avx512vbmi
}  // namespace cpu
}  // namespace kestrel

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512bf16,f16c")

namespace kestrel {
namespace cpu {
namespace avx512bf16 {

// `avx512bf16` (Sapphire Rapids, Zen 4 and later): the avx512vbmi path with bf16 parameters rounded and stored by
// vcvtneps2bf16 (one instruction for the seven integer operations and the word permute of the other paths; SGD8bit
// and Adagrad8bit bf16 steps 5-6% faster, AdamW8bit 1.5%, one thread). It rounds to nearest even as c10::BFloat16
// does, except that it flushes subnormals to zero and keeps a NaN's payload: a vector holding either (vfpclassps)
// takes the integer rounding. Checked against c10's rounding on all 2^32 float32 patterns (kestrel._C._round_check).
// Built for bf16 parameters only: fp32 and fp16 steps on this path run avx512vbmi's kernels (optim.cpp's dispatch).
inline bool supported() {
  static const bool ok = avx512::supported_vbmi() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

using V = avx512vbmi::V;
template <typename T>
struct Lanes : avx512::Lanes<T> {};
template <>
struct Lanes<c10::BFloat16> : avx512::Lanes<c10::BFloat16> {
  static inline __m256i to_bits(__m512 v) {
    const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
    const __mmask16 other = _mm512_fpclass_ps_mask(v, 0xA1);  // subnormal, quiet or signalling NaN
    if (__builtin_expect(other == 0, 1)) return bits;
    return _mm256_mask_mov_epi16(bits, other, avx512::Lanes<c10::BFloat16>::to_bits(v));
  }
  static inline void store_rounded(c10::BFloat16* p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, to_bits(v));
  }
};

#include "optim_vector.inc"

}  // namespace avx512bf16
}  // namespace cpu
}  // namespace kestrel

#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif
