// CPU kernels of the fused optimizer ops with 8-bit block-wise or 32-bit states (two-state: Adam/AdamW, LAMB,
// AdEMAMix; one-state: SGD with momentum, LARS, RMSprop, Adagrad, Lion; the LAMB/LARS norm pass): OpenMP over
// 256-element blocks, the per-element math of kestrel/optim.h, no tensor-sized temporaries.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../optim_checks.h"
#include "code_table.h"
#include "cpu_isa.h"
#include "cpu_utils.h"
#include "kestrel/optim.h"

namespace kestrel {
namespace {

using cpu::CodeTable;
using optim::kBlockSize;
using optim::StepScalars;

// The parameter's new value in its dtype: round to nearest even, or stochastically for bf16 when asked.
template <typename T>
KESTREL_ALWAYS_INLINE T round_param(float v, const StepScalars& a, int64_t index, int which) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (a.stochastic_round) v = optim::stochastic_round_bf16(v, a, index, which);
  }
  return static_cast<T>(v);
}

// Adam or AdEMAMix with 8-bit states. AdEMAMix's slow moment m2 lives in the second half of state1 / absmax1.
template <optim::TwoState KIND, typename T>
KESTREL_ALWAYS_INLINE void two_state8bit_blocks(T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ c1,
                                                uint8_t* __restrict__ c2, float* __restrict__ absmax1,
                                                float* __restrict__ absmax2, int64_t n, const StepScalars& a,
                                                const CodeTable& q1, const CodeTable& q2, int64_t first, int64_t end) {
  constexpr bool kMix = KIND == optim::TwoState::kAdEMAMix;
  const int64_t blocks = optim_num_blocks(n);
  uint8_t* c3 = c1 + n;               // AdEMAMix: the slow first moment's codes
  float* absmax3 = absmax1 + blocks;  // ... and its absmax
  float s1[kBlockSize], s2[kBlockSize], s3[kBlockSize];
  int finite[kBlockSize];
  for (int64_t b = first; b < end; ++b) {
    const int64_t begin = b * kBlockSize;
    const int len = (int)std::min<int64_t>(kBlockSize, n - begin);
    const float old_max1 = absmax1[b], old_max2 = absmax2[b], old_max3 = kMix ? absmax3[b] : 0.0f;
    float max1 = 0.0f, max2 = 0.0f, max3 = 0.0f;
    for (int i = 0; i < len; ++i) {
      const float grad = static_cast<float>(g[begin + i]) * a.gnorm_scale;
      float m1 = quant::dequantize_value(q1.code, c1[begin + i], old_max1);
      float m2 = quant::dequantize_value(q2.code, c2[begin + i], old_max2);
      float m3 = kMix ? quant::dequantize_value(q1.code, c3[begin + i], old_max3) : 0.0f;
      if (kMix)
        optim::ademamix_moments(a, grad, m1, m3, m2);
      else
        optim::adam_moments(a, grad, m1, m2);
      const int ok = optim::step_is_finite(grad, m1, m2, m3);
      m1 = ok ? m1 : 0.0f;
      m2 = ok ? m2 : 0.0f;
      m3 = ok ? m3 : 0.0f;
      s1[i] = m1;
      s2[i] = m2;
      s3[i] = m3;
      finite[i] = ok;
      max1 = std::fabs(m1) > max1 ? std::fabs(m1) : max1;
      max2 = std::fabs(m2) > max2 ? std::fabs(m2) : max2;
      max3 = std::fabs(m3) > max3 ? std::fabs(m3) : max3;
    }
    absmax1[b] = max1;
    absmax2[b] = max2;
    if (kMix) absmax3[b] = max3;
    for (int i = 0; i < len; ++i) {
      const T old_p = p[begin + i];
      const float updated = kMix ? optim::ademamix_param_update(a, static_cast<float>(old_p), s1[i], s3[i], s2[i])
                                 : optim::adam_param_update(a, static_cast<float>(old_p), s1[i], s2[i]);
      T new_p = round_param<T>(updated, a, begin + i, 0);
      if (a.apply_decay) new_p = round_param<T>(static_cast<float>(new_p) * a.decay, a, begin + i, 1);
      p[begin + i] = finite[i] ? new_p : old_p;
    }
    const bool robust = a.robust_rounding;
    for (int i = 0; i < len; ++i) {
      const float v1 = optim::normalize_state(s1[i], max1);
      const float v2 = optim::normalize_state(s2[i], max2);
      c1[begin + i] = static_cast<uint8_t>(optim::round_numerator_code(q1.code, q1.nearest(v1), v1, robust));
      c2[begin + i] = static_cast<uint8_t>(optim::round_denominator_code(q2.code, q2.nearest(v2), v2, robust));
      if (kMix) {
        const float v3 = optim::normalize_state(s3[i], max3);
        c3[begin + i] = static_cast<uint8_t>(optim::round_numerator_code(q1.code, q1.nearest(v3), v3, robust));
      }
    }
  }
}

// Adam with 4-bit states (kestrel/optim.h, "4-bit states"): blocks [first, end) of 128 elements, each block's
// codes in bytes [b * 64, b * 64 + 64) (the last block's may be fewer; an odd size leaves the last low nibble 0).
// The per-element math and the rule for a NaN/Inf gradient are the 8-bit step's. Written as branch-free passes over
// a block (unpack, moments, parameter, requantize by counting the midpoints below each value, pack) so that the
// compiler vectorises them for each ISA of KESTREL_CPU_CLONES.
template <typename T>
KESTREL_ALWAYS_INLINE void two_state4bit_blocks(T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ c1,
                                                uint8_t* __restrict__ c2, float* __restrict__ absmax1,
                                                float* __restrict__ absmax2, int64_t n, const StepScalars& a,
                                                const float* code1, const float* code2, int64_t first, int64_t end) {
  constexpr int B = optim::k4bitBlockSize, C = optim::k4bitCodes;
  float mid1[C - 1], mid2[C - 1];
  optim::midpoints16(code1, mid1);
  optim::midpoints16(code2, mid2);
  float s1[B], s2[B];
  int32_t q1[B], q2[B], finite[B];
  for (int64_t b = first; b < end; ++b) {
    const int64_t begin = b * B;
    const int len = (int)std::min<int64_t>(B, n - begin);
    const int bytes = (len + 1) / 2;
    uint8_t* b1 = c1 + (begin >> 1);
    uint8_t* b2 = c2 + (begin >> 1);
    for (int j = 0; j < bytes; ++j) {  // unpack: element 2j in the high nibble
      q1[2 * j] = b1[j] >> 4, q1[2 * j + 1] = b1[j] & 15;
      q2[2 * j] = b2[j] >> 4, q2[2 * j + 1] = b2[j] & 15;
    }
    const float old_max1 = absmax1[b], old_max2 = absmax2[b];
    float max1 = 0.0f, max2 = 0.0f;
    for (int i = 0; i < len; ++i) {
      const float grad = static_cast<float>(g[begin + i]) * a.gnorm_scale;
      float m1 = code1[q1[i]] * old_max1;
      float m2 = code2[q2[i]] * old_max2;
      optim::adam_moments(a, grad, m1, m2);
      const int ok = optim::step_is_finite(grad, m1, m2);
      s1[i] = ok ? m1 : 0.0f;
      s2[i] = ok ? m2 : 0.0f;
      finite[i] = ok;
      max1 = std::fabs(s1[i]) > max1 ? std::fabs(s1[i]) : max1;
      max2 = std::fabs(s2[i]) > max2 ? std::fabs(s2[i]) : max2;
    }
    absmax1[b] = max1;
    absmax2[b] = max2;
    for (int i = 0; i < len; ++i) {
      const T old_p = p[begin + i];
      T new_p = round_param<T>(optim::adam_param_update(a, static_cast<float>(old_p), s1[i], s2[i]), a, begin + i, 0);
      if (a.apply_decay) new_p = round_param<T>(static_cast<float>(new_p) * a.decay, a, begin + i, 1);
      p[begin + i] = finite[i] ? new_p : old_p;
    }
    for (int i = 0; i < len; ++i) {  // nearest code: the count of midpoints below v (optim::nearest_code16)
      const float v1 = optim::normalize_state(s1[i], max1), v2 = optim::normalize_state(s2[i], max2);
      int32_t k1 = 0, k2 = 0;
      for (int j = 0; j < C - 1; ++j) {
        k1 += mid1[j] < v1;
        k2 += mid2[j] < v2;
      }
      q1[i] = k1;
      q2[i] = k2;
    }
    if (len & 1) q1[len] = q2[len] = 0;  // an odd size: the last low nibble is 0
    for (int j = 0; j < bytes; ++j) {
      b1[j] = static_cast<uint8_t>((q1[2 * j] << 4) | q1[2 * j + 1]);
      b2[j] = static_cast<uint8_t>((q2[2 * j] << 4) | q2[2 * j + 1]);
    }
  }
}

#define KESTREL_DEFINE_FOUR_BIT_CPU(SUFFIX, T)                                                                     \
  KESTREL_CPU_CLONES void two_state4bit_blocks_##SUFFIX(                                                           \
      T* p, const T* g, uint8_t* c1, uint8_t* c2, float* absmax1, float* absmax2, int64_t n, const StepScalars& a, \
      const float* code1, const float* code2, int64_t first, int64_t end) {                                        \
    two_state4bit_blocks<T>(p, g, c1, c2, absmax1, absmax2, n, a, code1, code2, first, end);                       \
  }
KESTREL_DEFINE_FOUR_BIT_CPU(f32, float)
KESTREL_DEFINE_FOUR_BIT_CPU(f16, c10::Half)
KESTREL_DEFINE_FOUR_BIT_CPU(bf16, c10::BFloat16)
#undef KESTREL_DEFINE_FOUR_BIT_CPU

inline void two_state4bit_blocks_of(float* p, const float* g, uint8_t* c1, uint8_t* c2, float* m1, float* m2, int64_t n,
                                    const StepScalars& a, const float* q1, const float* q2, int64_t first,
                                    int64_t end) {
  two_state4bit_blocks_f32(p, g, c1, c2, m1, m2, n, a, q1, q2, first, end);
}
inline void two_state4bit_blocks_of(c10::Half* p, const c10::Half* g, uint8_t* c1, uint8_t* c2, float* m1, float* m2,
                                    int64_t n, const StepScalars& a, const float* q1, const float* q2, int64_t first,
                                    int64_t end) {
  two_state4bit_blocks_f16(p, g, c1, c2, m1, m2, n, a, q1, q2, first, end);
}
inline void two_state4bit_blocks_of(c10::BFloat16* p, const c10::BFloat16* g, uint8_t* c1, uint8_t* c2, float* m1,
                                    float* m2, int64_t n, const StepScalars& a, const float* q1, const float* q2,
                                    int64_t first, int64_t end) {
  two_state4bit_blocks_bf16(p, g, c1, c2, m1, m2, n, a, q1, q2, first, end);
}

// 32-bit states, as bnb's 32-bit kernel: an element with a NaN/Inf gradient is skipped (parameter and states kept).
template <optim::TwoState KIND, typename T>
KESTREL_ALWAYS_INLINE void two_state32bit_blocks(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ s1,
                                                 float* __restrict__ s2, int64_t n, const StepScalars& a, int64_t first,
                                                 int64_t end) {
  constexpr bool kMix = KIND == optim::TwoState::kAdEMAMix;
  float* s3 = s1 + n;
  const int64_t stop = std::min(n, end * kBlockSize);
  for (int64_t i = first * kBlockSize; i < stop; ++i) {
    const float grad = static_cast<float>(g[i]) * a.gnorm_scale;
    float m1 = s1[i], m2 = s2[i], m3 = kMix ? s3[i] : 0.0f;
    if (kMix)
      optim::ademamix_moments(a, grad, m1, m3, m2);
    else
      optim::adam_moments(a, grad, m1, m2);
    const float updated = kMix ? optim::ademamix_param_update(a, static_cast<float>(p[i]), m1, m3, m2)
                               : optim::adam_param_update(a, static_cast<float>(p[i]), m1, m2);
    T new_p = round_param<T>(updated, a, i, 0);
    if (a.apply_decay) new_p = round_param<T>(static_cast<float>(new_p) * a.decay, a, i, 1);
    const bool ok = optim::step_is_finite(grad, m1, m2, m3);
    s1[i] = ok ? m1 : s1[i];
    s2[i] = ok ? m2 : s2[i];
    if (kMix) s3[i] = ok ? m3 : s3[i];
    p[i] = ok ? new_p : p[i];
  }
}

// One-state optimizers, 8-bit (signed map, sign fix) or 32-bit state. A NaN/Inf gradient keeps the parameter; the
// 8-bit state of that element becomes 0 and a 32-bit state is left unchanged (as for Adam).
template <optim::OneState KIND, typename T>
KESTREL_ALWAYS_INLINE void one_state_blocks(T* __restrict__ p, const T* __restrict__ g, void* state,
                                            float* __restrict__ absmax, int64_t n, const StepScalars& a,
                                            const CodeTable* q, int64_t first, int64_t end) {
  float s[kBlockSize], new_p[kBlockSize];
  int finite[kBlockSize];
  for (int64_t b = first; b < end; ++b) {
    const int64_t begin = b * kBlockSize;
    const int len = (int)std::min<int64_t>(kBlockSize, n - begin);
    uint8_t* codes = q ? static_cast<uint8_t*>(state) + begin : nullptr;
    float* full = q ? nullptr : static_cast<float*>(state) + begin;
    const float old_max = q ? absmax[b] : 0.0f;
    float new_max = 0.0f;
    for (int i = 0; i < len; ++i) {
      const float grad = static_cast<float>(g[begin + i]) * a.gnorm_scale;
      const float old_s = q ? quant::dequantize_value(q->code, codes[i], old_max) : full[i];
      float s1 = old_s, updated;
      optim::one_state_update<KIND>(a, grad, static_cast<float>(p[begin + i]), s1, updated);
      const int ok = optim::step_is_finite(grad, s1);
      s1 = ok ? s1 : (q ? 0.0f : old_s);
      s[i] = s1;
      new_p[i] = updated;
      finite[i] = ok;
      new_max = std::fabs(s1) > new_max ? std::fabs(s1) : new_max;
    }
    for (int i = 0; i < len; ++i)
      if (finite[i]) p[begin + i] = round_param<T>(new_p[i], a, begin + i, 0);
    if (q) {
      absmax[b] = new_max;
      for (int i = 0; i < len; ++i) {
        const float v = optim::normalize_state(s[i], new_max);
        codes[i] =
            static_cast<uint8_t>(optim::round_one_state_code<KIND>(q->code, q->nearest(v), v, a.robust_rounding));
      }
    } else {
      for (int i = 0; i < len; ++i) full[i] = s[i];
    }
  }
}

// The norm pass of LAMB (ADAM) / LARS: each block's {sum u^2, sum p^2} in the lane order of kestrel/optim.h, into
// sums[2 * b], sums[2 * b + 1]. States are 8-bit when q1 is given (state2 / q2 used by LAMB only).
template <bool ADAM, typename T>
KESTREL_ALWAYS_INLINE void norm_blocks(const T* __restrict__ p, const T* __restrict__ g, const void* state1,
                                       const void* state2, const float* absmax1, const float* absmax2, int64_t n,
                                       const StepScalars& a, const CodeTable* q1, const CodeTable* q2, float* sums,
                                       int64_t first, int64_t end) {
  constexpr int kLanes = 32;
  const uint8_t* c1 = static_cast<const uint8_t*>(state1);
  const uint8_t* c2 = static_cast<const uint8_t*>(state2);
  const float* f1 = static_cast<const float*>(state1);
  const float* f2 = static_cast<const float*>(state2);
  for (int64_t b = first; b < end; ++b) {
    const int64_t begin = b * kBlockSize;
    const float max1 = q1 ? absmax1[b] : 0.0f;
    const float max2 = q1 && ADAM ? absmax2[b] : 0.0f;
    // the update direction and the parameter of element i (u = 0 past the end: adds nothing)
    auto element = [&](int64_t i, float& u, float& pv) KESTREL_ALWAYS_INLINE_LAMBDA {
      const float grad = static_cast<float>(g[i]) * a.gnorm_scale;
      pv = static_cast<float>(p[i]);
      const float s1 = q1 ? quant::dequantize_value(q1->code, c1[i], max1) : f1[i];
      if (ADAM) {
        const float s2 = q1 ? quant::dequantize_value(q2->code, c2[i], max2) : f2[i];
        u = optim::lamb_norm_direction(a, grad, s1, s2);
      } else {
        u = optim::lars_norm_direction(a, grad, pv, s1);
      }
    };
    float lane_u[kLanes], lane_p[kLanes];
    for (int l = 0; l < kLanes; ++l) lane_u[l] = lane_p[l] = 0.0f;
    if (begin + kBlockSize <= n) {  // a full block: branch-free lanes (vectorised)
      for (int k = 0; k < kBlockSize / kLanes; ++k) {
        for (int l = 0; l < kLanes; ++l) {
          float u, pv;
          element(begin + l + kLanes * k, u, pv);
          lane_u[l] = lane_u[l] + u * u;
          lane_p[l] = lane_p[l] + pv * pv;
        }
      }
    } else {
      for (int k = 0; k < kBlockSize / kLanes; ++k) {
        for (int l = 0; l < kLanes; ++l) {
          const int64_t i = begin + l + kLanes * k;
          if (i >= n) continue;
          float u, pv;
          element(i, u, pv);
          lane_u[l] = lane_u[l] + u * u;
          lane_p[l] = lane_p[l] + pv * pv;
        }
      }
    }
    sums[2 * b] = optim::butterfly_sum32(lane_u);
    sums[2 * b + 1] = optim::butterfly_sum32(lane_p);
  }
}

#define KESTREL_DEFINE_TWO_STATE_CPU(SUFFIX, T)                                                                        \
  KESTREL_CPU_CLONES void two_state8bit_blocks_##SUFFIX(                                                               \
      optim::TwoState kind, T* p, const T* g, uint8_t* c1, uint8_t* c2, float* absmax1, float* absmax2, int64_t n,     \
      const StepScalars& a, const CodeTable& q1, const CodeTable& q2, int64_t first, int64_t end) {                    \
    if (kind == optim::TwoState::kAdEMAMix)                                                                            \
      two_state8bit_blocks<optim::TwoState::kAdEMAMix, T>(p, g, c1, c2, absmax1, absmax2, n, a, q1, q2, first, end);   \
    else                                                                                                               \
      two_state8bit_blocks<optim::TwoState::kAdam, T>(p, g, c1, c2, absmax1, absmax2, n, a, q1, q2, first, end);       \
  }                                                                                                                    \
  KESTREL_CPU_CLONES void two_state32bit_blocks_##SUFFIX(optim::TwoState kind, T* p, const T* g, float* s1, float* s2, \
                                                         int64_t n, const StepScalars& a, int64_t first,               \
                                                         int64_t end) {                                                \
    if (kind == optim::TwoState::kAdEMAMix)                                                                            \
      two_state32bit_blocks<optim::TwoState::kAdEMAMix, T>(p, g, s1, s2, n, a, first, end);                            \
    else                                                                                                               \
      two_state32bit_blocks<optim::TwoState::kAdam, T>(p, g, s1, s2, n, a, first, end);                                \
  }
#define KESTREL_DEFINE_ONE_STATE_CPU(SUFFIX, T)                                                           \
  KESTREL_CPU_CLONES void one_state_blocks_##SUFFIX(optim::OneState kind, T* p, const T* g, void* state,  \
                                                    float* absmax, int64_t n, const StepScalars& a,       \
                                                    const CodeTable* q, int64_t first, int64_t end) {     \
    switch (kind) {                                                                                       \
      case optim::OneState::kMomentum:                                                                    \
        return one_state_blocks<optim::OneState::kMomentum, T>(p, g, state, absmax, n, a, q, first, end); \
      case optim::OneState::kRMSprop:                                                                     \
        return one_state_blocks<optim::OneState::kRMSprop, T>(p, g, state, absmax, n, a, q, first, end);  \
      case optim::OneState::kAdagrad:                                                                     \
        return one_state_blocks<optim::OneState::kAdagrad, T>(p, g, state, absmax, n, a, q, first, end);  \
      case optim::OneState::kLion:                                                                        \
        return one_state_blocks<optim::OneState::kLion, T>(p, g, state, absmax, n, a, q, first, end);     \
      case optim::OneState::kMuon:                                                                        \
        return one_state_blocks<optim::OneState::kMuon, T>(p, g, state, absmax, n, a, q, first, end);     \
    }                                                                                                     \
  }
#define KESTREL_DEFINE_NORMS_CPU(SUFFIX, T)                                                                    \
  KESTREL_CPU_CLONES void norm_blocks_##SUFFIX(bool adam, const T* p, const T* g, const void* state1,          \
                                               const void* state2, const float* absmax1, const float* absmax2, \
                                               int64_t n, const StepScalars& a, const CodeTable* q1,           \
                                               const CodeTable* q2, float* sums, int64_t first, int64_t end) { \
    if (adam)                                                                                                  \
      norm_blocks<true, T>(p, g, state1, state2, absmax1, absmax2, n, a, q1, q2, sums, first, end);            \
    else                                                                                                       \
      norm_blocks<false, T>(p, g, state1, state2, absmax1, absmax2, n, a, q1, q2, sums, first, end);           \
  }
KESTREL_DEFINE_NORMS_CPU(f32, float)
KESTREL_DEFINE_NORMS_CPU(f16, c10::Half)
KESTREL_DEFINE_NORMS_CPU(bf16, c10::BFloat16)
#undef KESTREL_DEFINE_NORMS_CPU

KESTREL_DEFINE_ONE_STATE_CPU(f32, float)
KESTREL_DEFINE_ONE_STATE_CPU(f16, c10::Half)
KESTREL_DEFINE_ONE_STATE_CPU(bf16, c10::BFloat16)
#undef KESTREL_DEFINE_ONE_STATE_CPU

KESTREL_DEFINE_TWO_STATE_CPU(f32, float)
KESTREL_DEFINE_TWO_STATE_CPU(f16, c10::Half)
KESTREL_DEFINE_TWO_STATE_CPU(bf16, c10::BFloat16)
#undef KESTREL_DEFINE_TWO_STATE_CPU

template <typename T>
struct KernelsCpu;
#define KESTREL_KERNELS_CPU_TRAITS(SUFFIX, T)  \
  template <>                                  \
  struct KernelsCpu<T> {                       \
    template <typename... Args>                \
    static void two_state8bit(Args... args) {  \
      two_state8bit_blocks_##SUFFIX(args...);  \
    }                                          \
    template <typename... Args>                \
    static void two_state32bit(Args... args) { \
      two_state32bit_blocks_##SUFFIX(args...); \
    }                                          \
    template <typename... Args>                \
    static void one_state(Args... args) {      \
      one_state_blocks_##SUFFIX(args...);      \
    }                                          \
    template <typename... Args>                \
    static void norms(Args... args) {          \
      norm_blocks_##SUFFIX(args...);           \
    }                                          \
  };
KESTREL_KERNELS_CPU_TRAITS(f32, float)
KESTREL_KERNELS_CPU_TRAITS(f16, c10::Half)
KESTREL_KERNELS_CPU_TRAITS(bf16, c10::BFloat16)
#undef KESTREL_KERNELS_CPU_TRAITS

template <typename Fn>
void dispatch_float(c10::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kHalf:
      fn(c10::Half{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "unreachable dtype ", dtype);
  }
}

// The vector path of an 8-bit step: the widest the CPU has (KESTREL_CPU_ISA caps it) if the maps have step tables
// (CodeTable::vector_ready: every sorted map whose codes step at most once per bucket), else the scalar loops;
// stochastic rounding stays scalar.
cpu::Isa vector_isa(const StepScalars& a, const CodeTable& q1, const CodeTable* q2) {
  if (a.stochastic_round || !(q1.vector_ready() && (q2 == nullptr || q2->vector_ready()))) return cpu::Isa::kScalar;
  return cpu::active_isa();
}

// NAME<P, T>(isa, args...) calls cpu::<isa>::KERNEL<P, T>(args...), the kernel of optim_vector.inc on that path. The
// avx512bf16 path differs from avx512vbmi only in storing bf16 parameters: its kernels are built for those alone
// (STORES: the kernel stores parameters), the rest run avx512vbmi's.
#if defined(KESTREL_HAVE_AVX512_PATH)
#define KESTREL_AVX512_CASES(KERNEL, STORES)                       \
  case cpu::Isa::kAvx512Bf16:                                      \
    if constexpr (STORES && std::is_same<T, c10::BFloat16>::value) \
      return cpu::avx512bf16::KERNEL<P, T>(args...);               \
    else                                                           \
      return cpu::avx512vbmi::KERNEL<P, T>(args...);               \
  case cpu::Isa::kAvx512Vbmi:                                      \
    return cpu::avx512vbmi::KERNEL<P, T>(args...);                 \
  case cpu::Isa::kAvx512:                                          \
    return cpu::avx512::KERNEL<P, T>(args...);
#else
#define KESTREL_AVX512_CASES(KERNEL, STORES)
#endif
#if defined(KESTREL_HAVE_AVX2_PATH)
#define KESTREL_AVX2_CASES(KERNEL) \
  case cpu::Isa::kAvx2:            \
    return cpu::avx2::KERNEL<P, T>(args...);
#else
#define KESTREL_AVX2_CASES(KERNEL)
#endif
#define KESTREL_DEFINE_VECTOR_DISPATCH(NAME, PARAM, KERNEL, STORES) \
  template <PARAM P, typename T, typename... Args>                  \
  void NAME(cpu::Isa isa, Args... args) {                           \
    switch (isa) {                                                  \
      KESTREL_AVX512_CASES(KERNEL, STORES)                          \
      KESTREL_AVX2_CASES(KERNEL)                                    \
      default:                                                      \
        TORCH_CHECK(false, "no vector path ", cpu::isa_name(isa));  \
    }                                                               \
  }
KESTREL_DEFINE_VECTOR_DISPATCH(two_state8bit_vector, optim::TwoState, two_state8bit_full_blocks, true)
KESTREL_DEFINE_VECTOR_DISPATCH(one_state8bit_vector, optim::OneState, one_state8bit_full_blocks, true)
KESTREL_DEFINE_VECTOR_DISPATCH(norm8bit_vector, bool, norm8bit_full_blocks, false)
#undef KESTREL_DEFINE_VECTOR_DISPATCH
#undef KESTREL_AVX2_CASES
#undef KESTREL_AVX512_CASES

// A two-state step (8-bit or 32-bit states, as call.eight_bit says) over the parameters of one call, each in
// parallel over its blocks.
void two_state_step(const StepCall& call, at::TensorList params, at::TensorList grads, at::TensorList state1,
                    at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2) {
  const auto kind = static_cast<optim::TwoState>(call.kind);
  if (kind == optim::TwoState::kAdam4bit) {  // 4-bit states: 16-entry maps, 128-element blocks
    for (size_t i = 0; i < params.size(); ++i) {
      const int64_t n = params[i].numel();
      if (n == 0) continue;
      const StepScalars a = call.scalars(i);
      dispatch_float(params[i].scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        T* p = params[i].data_ptr<T>();
        const T* g = grads[i].data_ptr<T>();
        uint8_t* c1 = state1[i].data_ptr<uint8_t>();
        uint8_t* c2 = state2[i].data_ptr<uint8_t>();
        float* m1 = absmax1[i].data_ptr<float>();
        float* m2 = absmax2[i].data_ptr<float>();
        const int64_t blocks = (n + optim::k4bitBlockSize - 1) / optim::k4bitBlockSize;
        cpu::parallel_over_blocks(n, blocks, [&](int64_t first, int64_t end) {
          two_state4bit_blocks_of(p, g, c1, c2, m1, m2, n, a, call.qmap1, call.qmap2, first, end);
        });
      });
    }
    return;
  }
  const auto q1 = call.eight_bit ? cpu::code_table_for(call.qmap1) : nullptr;
  const auto q2 = call.eight_bit ? cpu::code_table_for(call.qmap2) : nullptr;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    StepScalars a = call.scalars(i);
    optim::apply_trust_ratio(a, call.norms ? call.norms + 2 * i : nullptr, /*adam=*/true);
    dispatch_float(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* p = params[i].data_ptr<T>();
      const T* g = grads[i].data_ptr<T>();
      if (!call.eight_bit) {
        float* s1 = state1[i].data_ptr<float>();
        float* s2 = state2[i].data_ptr<float>();
        cpu::parallel_over_blocks(n, optim_num_blocks(n), [&](int64_t first, int64_t end) {
          KernelsCpu<T>::two_state32bit(kind, p, g, s1, s2, n, a, first, end);
        });
        return;
      }
      uint8_t* c1 = state1[i].data_ptr<uint8_t>();
      uint8_t* c2 = state2[i].data_ptr<uint8_t>();
      float* m1 = absmax1[i].data_ptr<float>();
      float* m2 = absmax2[i].data_ptr<float>();
      // The vector paths (cpu_isa.h) take the full blocks; a partial last block stays scalar.
      const cpu::Isa isa = vector_isa(a, *q1, q2.get());
      if (isa != cpu::Isa::kScalar) {
        const int64_t full = n / kBlockSize;
        cpu::parallel_over_blocks(n, full, [&](int64_t first, int64_t end) {
          if (kind == optim::TwoState::kAdEMAMix)
            two_state8bit_vector<optim::TwoState::kAdEMAMix, T>(isa, p, g, c1, c2, m1, m2, n, a, *q1, *q2, first, end);
          else
            two_state8bit_vector<optim::TwoState::kAdam, T>(isa, p, g, c1, c2, m1, m2, n, a, *q1, *q2, first, end);
        });
        if (full * kBlockSize < n)
          KernelsCpu<T>::two_state8bit(kind, p, g, c1, c2, m1, m2, n, a, *q1, *q2, full, full + 1);
        return;
      }
      cpu::parallel_over_blocks(n, optim_num_blocks(n), [&](int64_t first, int64_t end) {
        KernelsCpu<T>::two_state8bit(kind, p, g, c1, c2, m1, m2, n, a, *q1, *q2, first, end);
      });
    });
  }
}

// A one-state step (8-bit or 32-bit state).
void one_state_step(const StepCall& call, at::TensorList params, at::TensorList grads, at::TensorList state1,
                    at::TensorList absmax1) {
  const auto kind = static_cast<optim::OneState>(call.kind);
  const auto q1 = call.eight_bit ? cpu::code_table_for(call.qmap1) : nullptr;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    StepScalars a = call.scalars(i);
    optim::apply_trust_ratio(a, call.norms ? call.norms + 2 * i : nullptr, /*adam=*/false);
    dispatch_float(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* p = params[i].data_ptr<T>();
      const T* g = grads[i].data_ptr<T>();
      void* s = state1[i].data_ptr();
      float* m = call.eight_bit ? absmax1[i].data_ptr<float>() : nullptr;
      const cpu::Isa isa = call.eight_bit ? vector_isa(a, *q1, nullptr) : cpu::Isa::kScalar;
      if (isa != cpu::Isa::kScalar) {
        uint8_t* codes = static_cast<uint8_t*>(s);
        const int64_t full = n / kBlockSize;
        cpu::parallel_over_blocks(n, full, [&](int64_t first, int64_t end) {
          switch (kind) {
            case optim::OneState::kMomentum:
              return one_state8bit_vector<optim::OneState::kMomentum, T>(isa, p, g, codes, m, a, *q1, first, end);
            case optim::OneState::kRMSprop:
              return one_state8bit_vector<optim::OneState::kRMSprop, T>(isa, p, g, codes, m, a, *q1, first, end);
            case optim::OneState::kAdagrad:
              return one_state8bit_vector<optim::OneState::kAdagrad, T>(isa, p, g, codes, m, a, *q1, first, end);
            case optim::OneState::kLion:
              return one_state8bit_vector<optim::OneState::kLion, T>(isa, p, g, codes, m, a, *q1, first, end);
            case optim::OneState::kMuon:
              return one_state8bit_vector<optim::OneState::kMuon, T>(isa, p, g, codes, m, a, *q1, first, end);
          }
        });
        if (full * kBlockSize < n) KernelsCpu<T>::one_state(kind, p, g, s, m, n, a, q1.get(), full, full + 1);
        return;
      }
      cpu::parallel_over_blocks(n, optim_num_blocks(n), [&](int64_t first, int64_t end) {
        KernelsCpu<T>::one_state(kind, p, g, s, m, n, a, q1.get(), first, end);
      });
    });
  }
}

// The four ops' entry points: their schemas' arguments into the one prologue (read_step_call), then the step.
void two_state8bit_step_cpu(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                            at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                            at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                            const at::Tensor& steps, double lr, double beta1, double beta2, double beta3, double alpha,
                            double eps, double weight_decay, double gnorm_scale, int64_t round_seed,
                            const std::optional<at::Tensor>& norms, double max_unorm,
                            const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  const StepCall call =
      read_step_call("two_state8bit_step_", true, optimizer, params, grads, state1, state2, absmax1, absmax2, &qmap1,
                     &qmap2, steps, {lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale}, round_seed, norms,
                     max_unorm, lr_tensor, robust_rounding, /*device_values=*/false);
  two_state_step(call, params, grads, state1, state2, absmax1, absmax2);
}

void two_state4bit_step_cpu(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                            at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                            at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                            const at::Tensor& steps, double lr, double beta1, double beta2, double eps,
                            double weight_decay, double gnorm_scale, int64_t round_seed,
                            const std::optional<at::Tensor>& lr_tensor) {
  const StepCall call =
      read_step_call("two_state4bit_step_", true, optimizer, params, grads, state1, state2, absmax1, absmax2, &qmap1,
                     &qmap2, steps, {lr, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale}, round_seed,
                     std::nullopt, 0.0, lr_tensor, false, /*device_values=*/false, /*bits=*/4);
  two_state_step(call, params, grads, state1, state2, absmax1, absmax2);
}

void two_state32bit_step_cpu(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, at::TensorList state2, const at::Tensor& steps, double lr,
                             double beta1, double beta2, double beta3, double alpha, double eps, double weight_decay,
                             double gnorm_scale, int64_t round_seed, const std::optional<at::Tensor>& norms,
                             double max_unorm, const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  const StepCall call =
      read_step_call("two_state32bit_step_", true, optimizer, params, grads, state1, state2, {}, {}, nullptr, nullptr,
                     steps, {lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale}, round_seed, norms,
                     max_unorm, lr_tensor, robust_rounding, /*device_values=*/false);
  two_state_step(call, params, grads, state1, state2, {}, {});
}

void one_state8bit_step_cpu(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                            at::TensorList state1, at::TensorList absmax1, const at::Tensor& qmap1,
                            const at::Tensor& steps, double lr, double beta1, double beta2, double eps,
                            double weight_decay, double gnorm_scale, int64_t round_seed,
                            const std::optional<at::Tensor>& norms, double max_unorm,
                            const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  const StepCall call =
      read_step_call("one_state8bit_step_", false, optimizer, params, grads, state1, state1, absmax1, absmax1, &qmap1,
                     &qmap1, steps, {lr, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale}, round_seed, norms,
                     max_unorm, lr_tensor, robust_rounding, /*device_values=*/false);
  one_state_step(call, params, grads, state1, absmax1);
}

void one_state32bit_step_cpu(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, const at::Tensor& steps, double lr, double beta1, double beta2,
                             double eps, double weight_decay, double gnorm_scale, int64_t round_seed,
                             const std::optional<at::Tensor>& norms, double max_unorm,
                             const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  const StepCall call =
      read_step_call("one_state32bit_step_", false, optimizer, params, grads, state1, state1, {}, {}, nullptr, nullptr,
                     steps, {lr, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale}, round_seed, norms, max_unorm,
                     lr_tensor, robust_rounding,
                     /*device_values=*/false);
  one_state_step(call, params, grads, state1, {});
}

// LAMB ("adam") / LARS ("momentum"): each parameter's {sum u^2, sum p^2} before the step (kestrel/optim.h).
at::Tensor update_norms_cpu(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                            at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                            at::TensorList absmax2, const std::optional<at::Tensor>& qmap1,
                            const std::optional<at::Tensor>& qmap2, const at::Tensor& steps_tensor, double beta1,
                            double beta2, double eps, double weight_decay, double gnorm_scale) {
  const std::vector<int64_t> steps_vec = read_steps("update_norms", steps_tensor, params.size());
  const c10::IntArrayRef steps(steps_vec);
  constexpr const char* op = "update_norms";
  const bool adam =
      check_norm_args(op, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps);
  const bool eight_bit = qmap1.has_value();
  const int64_t count = static_cast<int64_t>(params.size());
  at::Tensor norms = at::zeros({count, 2}, at::TensorOptions().dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  const auto q1 = eight_bit ? cpu::code_table_for(qmap1->data_ptr<float>()) : nullptr;
  const auto q2 = eight_bit && adam ? cpu::code_table_for(qmap2->data_ptr<float>()) : nullptr;
  std::vector<float> sums;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    const StepScalars a = optim::make_step_scalars(steps[i], 0.0f, (float)beta1, (float)beta2, (float)eps,
                                                   (float)weight_decay, (float)gnorm_scale);
    const int64_t blocks = optim_num_blocks(n);
    sums.assign(2 * blocks, 0.0f);
    dispatch_float(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* p = params[i].data_ptr<T>();
      const T* g = grads[i].data_ptr<T>();
      const void* s1 = state1[i].data_ptr();
      const void* s2 = state2[i].data_ptr();
      const float* m1 = eight_bit ? absmax1[i].data_ptr<float>() : nullptr;
      const float* m2 = eight_bit ? absmax2[i].data_ptr<float>() : nullptr;
      const cpu::Isa isa = eight_bit ? vector_isa(a, *q1, q2.get()) : cpu::Isa::kScalar;
      if (isa != cpu::Isa::kScalar) {  // the vector paths take the full blocks, a partial last block stays scalar
        const uint8_t* c1 = static_cast<const uint8_t*>(s1);
        const uint8_t* c2 = static_cast<const uint8_t*>(s2);
        const int64_t full = n / kBlockSize;
        cpu::parallel_over_blocks(n, full, [&](int64_t first, int64_t end) {
          if (adam)
            norm8bit_vector<true, T>(isa, p, g, c1, c2, m1, m2, a, *q1, q2.get(), sums.data(), first, end);
          else
            norm8bit_vector<false, T>(isa, p, g, c1, c2, m1, m2, a, *q1, q2.get(), sums.data(), first, end);
        });
        if (full < blocks)
          KernelsCpu<T>::norms(adam, p, g, s1, s2, m1, m2, n, a, q1.get(), q2.get(), sums.data(), full, blocks);
      } else {
        cpu::parallel_over_blocks(n, blocks, [&](int64_t first, int64_t end) {
          KernelsCpu<T>::norms(adam, p, g, s1, s2, m1, m2, n, a, q1.get(), q2.get(), sums.data(), first, end);
        });
      }
    });
    out[2 * i] = (float)optim::tree_sum_blocks(sums.data(), blocks, 0);
    out[2 * i + 1] = (float)optim::tree_sum_blocks(sums.data(), blocks, 1);
  }
  return norms;
}

}  // namespace

namespace {
// A vector path this CPU has, by name (for the checks below).
cpu::Isa checked_isa(const std::string& isa_name) {
  const cpu::Isa isa = isa_name == "avx512bf16"   ? cpu::Isa::kAvx512Bf16
                       : isa_name == "avx512vbmi" ? cpu::Isa::kAvx512Vbmi
                       : isa_name == "avx512"     ? cpu::Isa::kAvx512
                       : isa_name == "avx2"       ? cpu::Isa::kAvx2
                                                  : cpu::Isa::kScalar;
  TORCH_CHECK(isa != cpu::Isa::kScalar && static_cast<int>(isa) <= static_cast<int>(cpu::supported_isa()),
              "isa: expected a vector path this CPU has (up to ", cpu::isa_name(cpu::supported_isa()), "), got '",
              isa_name, "'");
  return isa;
}
}  // namespace

// The rounding of `isa`'s parameter stores (Lanes<T>::store_rounded, T bf16 or fp16 as `dtype` says) against c10's
// conversion, which the scalar loops use, on every float32 bit pattern: {values, mismatches, the bits of the first
// mismatch}. For tests (kestrel._C._round_check); 2^32 values, a few seconds.
std::vector<int64_t> round_check(const std::string& isa_name, const std::string& dtype) {
  const cpu::Isa isa = checked_isa(isa_name);
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "dtype: expected 'bfloat16' or 'float16', got '", dtype, "'");
  const bool bf16 = dtype == "bfloat16";
  constexpr int64_t kChunk = 1 << 16, kChunks = (int64_t(1) << 32) / kChunk;
  int64_t mismatches = 0, first_bad = -1;
#pragma omp parallel for schedule(dynamic, 64) num_threads(at::get_num_threads()) reduction(+ : mismatches)
  for (int64_t c = 0; c < kChunks; ++c) {
    std::vector<float> v(kChunk);
    std::vector<uint16_t> out(kChunk);
    for (int64_t i = 0; i < kChunk; ++i) v[i] = float_from_bits((uint32_t)(c * kChunk + i));
    // each path's Lanes<T>::store_rounded; avx512bf16 has its own for bf16 alone (as the kernels' dispatch)
    const auto round_on_path = [&](auto* dst) {
      using T = std::remove_pointer_t<decltype(dst)>;
      switch (isa) {
#if defined(KESTREL_HAVE_AVX512_PATH)
        case cpu::Isa::kAvx512Bf16:
          if constexpr (std::is_same<T, c10::BFloat16>::value)
            return cpu::avx512bf16::round_values(v.data(), kChunk, dst);
          else
            return cpu::avx512vbmi::round_values(v.data(), kChunk, dst);
        case cpu::Isa::kAvx512Vbmi:
          return cpu::avx512vbmi::round_values(v.data(), kChunk, dst);
        case cpu::Isa::kAvx512:
          return cpu::avx512::round_values(v.data(), kChunk, dst);
#endif
#if defined(KESTREL_HAVE_AVX2_PATH)
        case cpu::Isa::kAvx2:
          return cpu::avx2::round_values(v.data(), kChunk, dst);
#endif
        default:
          return;
      }
    };
    if (bf16)
      round_on_path(reinterpret_cast<c10::BFloat16*>(out.data()));
    else
      round_on_path(reinterpret_cast<c10::Half*>(out.data()));
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < kChunk; ++i) {
      const uint16_t want = bf16 ? c10::BFloat16(v[i]).x : c10::Half(v[i]).x;
      if (out[i] != want && bad++ == 0) first = c * kChunk + i;
    }
    mismatches += bad;
    if (bad > 0) {
#pragma omp critical
      if (first_bad < 0 || first < first_bad) first_bad = first;
    }
  }
  return {int64_t(1) << 32, mismatches, first_bad};
}

// The vector requantization of `isa` against the scalar definition (the count of midpoints below v, then the sign fix
// or the robust round-up of kestrel/optim.h) on every float32 bit pattern in [-1, 1]: {values, mismatches, the bits
// of the first mismatch}. For tests (kestrel._C._requantize_check); about 2.1e9 values, a few seconds per map.
std::vector<int64_t> requantize_check(const std::vector<float>& map, const std::string& isa_name) {
  TORCH_CHECK(map.size() == (size_t)quant::kCodeSize, "map: expected 256 values, got ", map.size());
  const CodeTable t(map.data());
  const cpu::Isa isa = checked_isa(isa_name);
  TORCH_CHECK(t.vector_ready(), "the map is not served by the vector paths (no step tables)");
  constexpr uint32_t kOne = 0x3f800000u, kChunk = 1u << 16;
  constexpr int64_t kChunks = (int64_t)(kOne / kChunk) + 1;  // patterns 0 .. kOne per sign
  int64_t mismatches = 0, first_bad = -1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(at::get_num_threads()) reduction(+ : mismatches)
  for (int64_t c = 0; c < 2 * kChunks; ++c) {
    const uint32_t sign = c < kChunks ? 0u : 0x80000000u;
    const uint32_t begin = (uint32_t)(c % kChunks) * kChunk;
    const uint32_t len = std::min<uint32_t>(kChunk, kOne + 1 - begin);
    std::vector<float> v(kChunk, 0.0f);
    std::vector<uint8_t> plain(kChunk), sign_fix(kChunk), round_up(kChunk);
    for (uint32_t i = 0; i < len; ++i) v[i] = float_from_bits(sign | (begin + i));
    switch (isa) {
#if defined(KESTREL_HAVE_AVX512_PATH)
      case cpu::Isa::kAvx512Bf16:  // avx512vbmi's requantization
      case cpu::Isa::kAvx512Vbmi:
        cpu::avx512vbmi::requantize_values(t, v.data(), kChunk, plain.data(), sign_fix.data(), round_up.data());
        break;
      case cpu::Isa::kAvx512:
        cpu::avx512::requantize_values(t, v.data(), kChunk, plain.data(), sign_fix.data(), round_up.data());
        break;
#endif
#if defined(KESTREL_HAVE_AVX2_PATH)
      case cpu::Isa::kAvx2:
        cpu::avx2::requantize_values(t, v.data(), kChunk, plain.data(), sign_fix.data(), round_up.data());
        break;
#endif
      default:
        break;
    }
    // The reference, a running count of the midpoints below v (v ascends for +, descends for -).
    int idx = quant::nearest_code_bsearch(t.midpoints, v[0]);
    int64_t bad = 0, first = -1;
    for (uint32_t i = 0; i < len; ++i) {
      const float x = v[i];
      if (sign == 0)
        while (t.midpoints[idx] < x) ++idx;
      else
        while (idx > 0 && !(t.midpoints[idx - 1] < x)) --idx;
      const bool ok = plain[i] == idx && sign_fix[i] == quant::apply_sign_fix(t.code, idx, x) &&
                      round_up[i] == optim::round_denominator_code(t.code, idx, x, true);
      if (!ok && bad++ == 0) first = (int64_t)(sign | (begin + i));
    }
    mismatches += bad;
    if (bad > 0) {
#pragma omp critical
      if (first_bad < 0) first_bad = first;
    }
  }
  return {2 * (int64_t)(kOne + 1), mismatches, first_bad};
}

// The kernels' requantization of given states (optim_vector.inc's Requantize::group: s * (1 / absmax) looked up, a
// group with a lane at a step divided) against the definition with the division, with each rounding; group i of 64
// states has absmax[i] (|s| <= absmax, as a block's absmax bounds its states). {values, mismatches, index of the
// first, sensitive}: sensitive counts the values whose product s * (1 / absmax) alone would take another code than
// the quotient (what the division of the groups at a step must catch). For tests (kestrel._C._requantize_states_check).
std::vector<int64_t> requantize_states_check(const std::vector<float>& map, const std::string& isa_name,
                                             const std::vector<float>& states, const std::vector<float>& absmax) {
  TORCH_CHECK(map.size() == (size_t)quant::kCodeSize, "map: expected 256 values, got ", map.size());
  const cpu::Isa isa = checked_isa(isa_name);
  TORCH_CHECK(states.size() % 64 == 0, "states: expected a multiple of 64 values, got ", states.size());
  TORCH_CHECK(absmax.size() * 64 == states.size(), "absmax: expected one value per 64 states (", states.size() / 64,
              "), got ", absmax.size());
  for (size_t i = 0; i < states.size(); ++i) {
    const float a = absmax[i / 64];
    TORCH_CHECK(std::isfinite(a) && a >= 0.0f && std::fabs(states[i]) <= a, "states[", i, "] = ", states[i],
                ": expected |state| <= its group's absmax (", a, "), finite");
  }
  const CodeTable t(map.data());
  TORCH_CHECK(t.vector_ready(), "the map is not served by the vector paths (no step tables)");
  const int64_t n = (int64_t)states.size();
  std::vector<uint8_t> plain(n), sign_fix(n), round_up(n);
  switch (isa) {
#if defined(KESTREL_HAVE_AVX512_PATH)
    case cpu::Isa::kAvx512Bf16:
    case cpu::Isa::kAvx512Vbmi:
      cpu::avx512vbmi::requantize_states(t, states.data(), absmax.data(), n, plain.data(), sign_fix.data(),
                                         round_up.data());
      break;
    case cpu::Isa::kAvx512:
      cpu::avx512::requantize_states(t, states.data(), absmax.data(), n, plain.data(), sign_fix.data(),
                                     round_up.data());
      break;
#endif
#if defined(KESTREL_HAVE_AVX2_PATH)
    case cpu::Isa::kAvx2:
      cpu::avx2::requantize_states(t, states.data(), absmax.data(), n, plain.data(), sign_fix.data(), round_up.data());
      break;
#endif
    default:
      break;
  }
  int64_t mismatches = 0, first_bad = -1, sensitive = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float a = absmax[i / 64], s = states[i];
    const float v = a > 0.0f ? s / a : 0.0f;  // optim::normalize_state
    const float inv = a >= 0x1p-125f && a <= 0x1p125f ? 1.0f / a : 0.0f;
    const uint8_t* got[3] = {plain.data(), sign_fix.data(), round_up.data()};
    for (int mode = 0; mode < 3; ++mode) {
      const int want = cpu::requantized_code(t.code, t.midpoints, mode, v);
      if (got[mode][i] != want && mismatches++ == 0) first_bad = i;
      if (inv != 0.0f && cpu::requantized_code(t.code, t.midpoints, mode, s * inv) != want) ++sensitive;
    }
  }
  return {3 * n, mismatches, first_bad, sensitive};
}

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("update_norms", &update_norms_cpu);
  m.impl("two_state8bit_step_", &two_state8bit_step_cpu);
  m.impl("two_state4bit_step_", &two_state4bit_step_cpu);
  m.impl("two_state32bit_step_", &two_state32bit_step_cpu);
  m.impl("one_state8bit_step_", &one_state8bit_step_cpu);
  m.impl("one_state32bit_step_", &one_state32bit_step_cpu);
}

}  // namespace kestrel
