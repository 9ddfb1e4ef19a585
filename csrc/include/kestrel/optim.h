// Block-wise 8-bit (and 32-bit) Adam: the per-element math, shared by the CPU and CUDA kernels.
//
// Spec: optim8bit.md, "One fused step per element". The host computes the per-step scalars once (StepScalars), so
// the CPU and CUDA kernels run the same float32 operations in the same order; both are compiled without
// floating-point contraction (-ffp-contract=off, nvcc --fmad=false), so their results are bit-identical.
#pragma once

#include <math.h>

#include "kestrel/quantize.h"

namespace kestrel {
namespace optim {

constexpr int kBlockSize = 256;  // elements per absmax block of an 8-bit state (bnb's optimizer blocks)

// The per-step scalars of one parameter, computed once on the host (float32, as bnb's kernels compute them).
struct StepScalars {
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float step_size;    // Adam: -lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  float eps_c2;       // Adam: eps * sqrt(1 - beta2^t)
  float decay;        // 1 - lr * weight_decay (decoupled decay: Adam after the update, Lion before)
  float gnorm_scale;  // gradient scale (1 unless clipping)
  float lr, eps, weight_decay;
  // AdEMAMix: the slow first moment's beta and its weight; the bias corrections 1 - beta1^t and sqrt(1 - beta2^t)
  float beta3, one_minus_beta3, alpha, correction1, correction2;
  int step;
  int apply_decay;
  // Opt-in stochastic rounding of bf16 parameters: on when stochastic_round, with a per-optimizer seed and a
  // per-tensor salt (the tensor's position in the call).
  int stochastic_round;
  int salt;
  uint64_t round_seed;
};

// Optimizers with two states (bnb's Optimizer2State). AdEMAMix's state1 holds two first moments (m1, then m2).
enum class TwoState : int { kAdam = 0, kAdEMAMix = 1 };

// Optimizers with one state (bnb's Optimizer1State); the state uses the signed map when 8-bit.
enum class OneState : int { kMomentum = 0, kRMSprop = 1, kAdagrad = 2, kLion = 3 };

// The scalars of step `step` (>= 1), in float32 as bnb's kernel computes them (IEEE division for step_size).
inline StepScalars make_adam_scalars(int64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                                     float gnorm_scale, float beta3 = 0.0f, float alpha = 0.0f) {
  StepScalars a;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.one_minus_beta1 = 1.0f - beta1;
  a.one_minus_beta2 = 1.0f - beta2;
  const float correction1 = 1.0f - powf(beta1, (float)step);
  const float correction2 = sqrtf(1.0f - powf(beta2, (float)step));
  a.step_size = (-lr * correction2) / correction1;
  a.correction1 = correction1;
  a.correction2 = correction2;
  a.beta3 = beta3;
  a.one_minus_beta3 = 1.0f - beta3;
  a.alpha = alpha;
  a.eps_c2 = correction2 * eps;
  a.decay = 1.0f - lr * weight_decay;
  a.gnorm_scale = gnorm_scale;
  a.lr = lr;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.step = (int)step;
  a.apply_decay = weight_decay > 0.0f;
  a.stochastic_round = 0;
  a.salt = 0;
  a.round_seed = 0;
  return a;
}

// Stochastic rounding to bf16: a counter-based hash of (seed, step, salt, index, which) gives the 16 bits below
// bf16's mantissa; adding them before truncating rounds the magnitude up with probability equal to the dropped
// fraction, so the rounded value is unbiased. The CPU and CUDA kernels draw the same bits. Inf and NaN pass
// through (the caller's ordinary conversion handles them). `which` separates two roundings of one element.
KESTREL_HD uint32_t hash_bits(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return (uint32_t)(x >> 32);
}

KESTREL_HD float stochastic_round_bf16(float v, const StepScalars& a, int64_t index, int which) {
  const uint32_t u = float_bits(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return v;
  const uint64_t key = a.round_seed ^ ((uint64_t)a.step * 0x9e3779b97f4a7c15ull) ^
                       ((uint64_t)a.salt * 0xc2b2ae3d27d4eb4full) ^ (((uint64_t)index * 2 + which) * 0x165667b19e3779f9ull);
  return float_from_bits((u + (hash_bits(key) & 0xffffu)) & 0xffff0000u);
}

KESTREL_HD bool is_finite(float v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return __builtin_isfinite(v);
#endif
}

// Steps 1-2: the new moments from the old ones and a finite gradient.
KESTREL_HD void adam_moments(const StepScalars& a, float g, float& s1, float& s2) {
  s1 = s1 * a.beta1 + a.one_minus_beta1 * g;
  s2 = s2 * a.beta2 + a.one_minus_beta2 * (g * g);
}

// AdEMAMix (Pagliardini et al.): the fast and slow first moments and the second moment.
KESTREL_HD void ademamix_moments(const StepScalars& a, float g, float& m1, float& m2, float& nu) {
  m1 = m1 * a.beta1 + a.one_minus_beta1 * g;
  m2 = m2 * a.beta3 + a.one_minus_beta3 * g;
  nu = nu * a.beta2 + a.one_minus_beta2 * (g * g);
}

// p - lr * (m1 / c1 + alpha * m2) / (sqrt(nu) / c2 + eps), before rounding (decay follows, as for Adam).
KESTREL_HD float ademamix_param_update(const StepScalars& a, float p, float m1, float m2, float nu) {
  return p - a.lr * ((m1 / a.correction1 + a.alpha * m2) / (sqrtf(nu) / a.correction2 + a.eps));
}

// Step 4, before rounding to the parameter's dtype: p + step_size * s1 / (sqrt(s2) + eps * c2).
KESTREL_HD float adam_param_update(const StepScalars& a, float p, float s1, float s2) {
  return p + a.step_size * (s1 / (sqrtf(s2) + a.eps_c2));
}

// sign(v) in {-1, 0, 1} (0 for NaN), without branches so that the CPU loops vectorize.
KESTREL_HD float sign_of(float v) { return (float)((int)(v > 0.0f) - (int)(v < 0.0f)); }

// One-state optimizers (spec: "Other optimizers"): the new state and the new parameter (before rounding to its
// dtype) from the old state s1, the parameter p and a finite gradient g (already scaled by gnorm_scale).
template <OneState KIND>
KESTREL_HD void one_state_update(const StepScalars& a, float g, float p, float& s1, float& new_p) {
  if (KIND == OneState::kLion) {
    const float decayed = a.apply_decay ? p * a.decay : p;
    new_p = decayed - a.lr * sign_of(s1 * a.beta1 + a.one_minus_beta1 * g);
    s1 = s1 * a.beta2 + a.one_minus_beta2 * g;
    return;
  }
  if (a.apply_decay) g = g + p * a.weight_decay;  // L2 decay, added to the gradient
  if (KIND == OneState::kMomentum) {
    s1 = a.step == 1 ? g : s1 * a.beta1 + g;
    new_p = p - a.lr * s1;
  } else {
    s1 = KIND == OneState::kRMSprop ? s1 * a.beta1 + a.one_minus_beta1 * (g * g) : s1 + g * g;
    new_p = p - a.lr * (g / (sqrtf(s1) + a.eps));
  }
}

// Step 5's normalisation of a new state by its block's new absmax (0 for an all-zero block).
KESTREL_HD float normalize_state(float s, float absmax) { return absmax > 0.0f ? s / absmax : 0.0f; }

// Requantize a signed-map state (with bnb's sign fix) or an unsigned-map state, given the map's midpoints.
KESTREL_HD uint8_t requantize_signed(const float* code, const float* midpoints, float s, float absmax) {
  const float v = normalize_state(s, absmax);
  return (uint8_t)quant::apply_sign_fix(code, quant::nearest_code_bsearch(midpoints, v), v);
}
KESTREL_HD uint8_t requantize_unsigned(const float* midpoints, float s, float absmax) {
  return (uint8_t)quant::nearest_code_bsearch(midpoints, normalize_state(s, absmax));
}

// One parameter of a fused multi-tensor step (Adam: two states; one-state optimizers: state2/absmax2 unused): raw pointers, its size, the index of its first 256-element block in
// the launch, and its per-step scalars (parameters of one launch may be at different steps).
struct TensorMeta {
  void* param;
  const void* grad;
  void* state1;      // uint8 codes (8-bit) or float32
  void* state2;
  float* absmax1;    // 8-bit only
  float* absmax2;
  int64_t numel;
  int64_t first_block;
  StepScalars scalars;
};

}  // namespace optim
}  // namespace kestrel
