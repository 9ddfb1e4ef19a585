// The optimizers with 8-bit block-wise (or 32-bit) states: the per-element math of every fused step (two-state:
// Adam/AdamW, LAMB, AdEMAMix; one-state: SGD with momentum, LARS, RMSprop, Adagrad, Lion), the trust ratio and its
// fixed-order norms, stochastic rounding and the (robust) requantization, shared by the CPU and CUDA kernels.
//
// docs/optim8bit.md, "The fused step per element". The host computes the per-step scalars once (StepScalars), so
// the CPU and CUDA kernels run the same float32 operations in the same order; both are compiled without
// floating-point contraction (-ffp-contract=off, nvcc --fmad=false), so their results are bit-identical.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

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
  // LAMB / LARS: the trust-ratio bound on the update norm (0: off); see apply_trust_ratio.
  float max_unorm;
  // Robust rounding of the 8-bit states (opt-in; bnb's rounding otherwise): see round_numerator_code.
  int robust_rounding;
};

// Optimizers with two states (bnb's Optimizer2State). AdEMAMix's state1 holds two first moments (m1, then m2).
// kAdam4bit: Adam with 4-bit states (section "4-bit states" below).
enum class TwoState : int { kAdam = 0, kAdEMAMix = 1, kAdam4bit = 2 };

// Optimizers with one state (bnb's Optimizer1State); the state uses the signed map when 8-bit.
// kMuon is Muon's momentum (kestrel.optim.Muon8bit): its "parameter" is the update buffer the step writes (the
// Newton-Schulz orthogonalisation and the parameter's step follow on the host side).
enum class OneState : int { kMomentum = 0, kRMSprop = 1, kAdagrad = 2, kLion = 3, kMuon = 4 };

// The scalars that depend on the step and the learning rate (host, or device for a capturable step whose step
// count and lr live in device memory): bias corrections, step size, decay. float32, as bnb's kernel computes them.
KESTREL_HD void set_step_and_lr(StepScalars& a, int64_t step, float lr) {
  const float correction1 = 1.0f - powf(a.beta1, (float)step);
  const float correction2 = sqrtf(1.0f - powf(a.beta2, (float)step));
  a.step_size = (-lr * correction2) / correction1;
  a.correction1 = correction1;
  a.correction2 = correction2;
  a.eps_c2 = correction2 * a.eps;
  a.decay = 1.0f - lr * a.weight_decay;
  a.lr = lr;
  a.step = (int)step;
}

#if !defined(__CUDACC_RTC__)  // host-only (NVRTC compiles device code only)
// The scalars of step `step` (>= 1), in float32 as bnb's kernel computes them (IEEE division for step_size).
inline StepScalars make_step_scalars(int64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                                     float gnorm_scale, float beta3 = 0.0f, float alpha = 0.0f) {
  StepScalars a;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.one_minus_beta1 = 1.0f - beta1;
  a.one_minus_beta2 = 1.0f - beta2;
  a.beta3 = beta3;
  a.one_minus_beta3 = 1.0f - beta3;
  a.alpha = alpha;
  a.gnorm_scale = gnorm_scale;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.apply_decay = weight_decay > 0.0f;
  a.stochastic_round = 0;
  a.salt = 0;
  a.round_seed = 0;
  a.max_unorm = 0.0f;
  a.robust_rounding = 0;
  set_step_and_lr(a, step, lr);
  return a;
}
#endif

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
                       ((uint64_t)a.salt * 0xc2b2ae3d27d4eb4full) ^
                       (((uint64_t)index * 2 + which) * 0x165667b19e3779f9ull);
  return float_from_bits((u + (hash_bits(key) & 0xffffu)) & 0xffff0000u);
}

KESTREL_HD bool is_finite(float v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return __builtin_isfinite(v);
#endif
}

// Whether an element is stepped: its gradient and its new moments are finite. A finite gradient whose square
// overflows float32 (|g| above about 1.8e19) would otherwise make its block's absmax inf and, from the next step
// on, every element of the block NaN; such an element is handled like a NaN/Inf gradient (parameter kept, its 8-bit
// state zeroed, a 32-bit state kept). bnb does not check this.
KESTREL_HD bool step_is_finite(float g, float m1, float m2 = 0.0f, float m3 = 0.0f) {
  return is_finite(g) && is_finite(m1) && is_finite(m2) && is_finite(m3);
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

// Adam's update direction s1 / (sqrt(s2) + eps * c2) (the step is step_size times it).
KESTREL_HD float adam_direction(const StepScalars& a, float s1, float s2) {
  return s1 / (sqrtf(s2) + a.eps_c2);
}

// Step 4, before rounding to the parameter's dtype: p + step_size * s1 / (sqrt(s2) + eps * c2).
KESTREL_HD float adam_param_update(const StepScalars& a, float p, float s1, float s2) {
  return p + a.step_size * adam_direction(a, s1, s2);
}

// sign(v) in {-1, 0, 1} (0 for NaN), without branches so that the CPU loops vectorize.
KESTREL_HD float sign_of(float v) {
  return (float)((int)(v > 0.0f) - (int)(v < 0.0f));
}

// One-state optimizers (docs/optim8bit.md): the new state and the new parameter (before rounding to its
// dtype) from the old state s1, the parameter p and a finite gradient g (already scaled by gnorm_scale). Muon's
// "new parameter" is its update (p is not read).
template <OneState KIND>
KESTREL_HD void one_state_update(const StepScalars& a, float g, float p, float& s1, float& new_p) {
  if (KIND == OneState::kLion) {
    const float decayed = a.apply_decay ? p * a.decay : p;
    new_p = decayed - a.lr * sign_of(s1 * a.beta1 + a.one_minus_beta1 * g);
    s1 = s1 * a.beta2 + a.one_minus_beta2 * g;
    return;
  }
  if (KIND == OneState::kMuon) {  // the momentum m = beta2 m + (1 - beta2) g; the update beta1 m + (1 - beta1) g
    s1 = s1 * a.beta2 + a.one_minus_beta2 * g;  // (Nesterov: beta1 = beta2; plain momentum: beta1 = 1, the update m)
    new_p = s1 * a.beta1 + a.one_minus_beta1 * g;
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

// ---------------------------------------------------------------------------------------------- trust ratio
// LAMB (Adam) and LARS (SGD with momentum) scale a parameter's update so that its norm is at most max_unorm times
// the parameter's norm (bnb's max_unorm): scale = min(1, max_unorm * ||p|| / ||u||), with ||p|| taken before the
// step and u the update direction: LAMB's bias-corrected m_hat / (sqrt(v_hat) + eps) (= (c2 / c1) times
// adam_direction), LARS's new momentum. An all-zero parameter (||p|| = 0, e.g. a zero-initialised bias) is not
// held at zero: its scale is 1. Elements with a NaN/Inf gradient (skipped by the step) count as 0.
//
// The norms are sums of squares reduced in one fixed order on the CPU and the GPU, so both get the same scale:
// within a 256-element block, "lane" l (0..31) adds the squares of elements l, l+32, ..., l+224 in float; the 32
// lane sums combine as a butterfly (offsets 16, 8, 4, 2, 1); the block sums of a tensor are then added in double by
// 256 "threads" (thread t takes blocks t, t+256, ... in order) and combined by a halving tree.
constexpr int kNormThreads = 256;

#if !defined(__CUDACC_RTC__)  // host-only (NVRTC compiles device code only)
// The combined value of 32 lane sums under the butterfly (every lane ends with this value); `v` is overwritten.
inline float butterfly_sum32(float* v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    for (int l = 0; l < offset; ++l) v[l] = v[l] + v[l + offset];
  return v[0];
}

// A tensor's total from its block sums (stride 2: the blocks' (u, p) pairs), in the fixed order above.
inline double tree_sum_blocks(const float* block_sums, int64_t blocks, int which) {
  double acc[kNormThreads];
  for (int t = 0; t < kNormThreads; ++t) {
    double s = 0.0;
    for (int64_t b = t; b < blocks; b += kNormThreads) s += (double)block_sums[2 * b + which];
    acc[t] = s;
  }
  for (int stride = kNormThreads / 2; stride > 0; stride >>= 1)
    for (int t = 0; t < stride; ++t) acc[t] += acc[t + stride];
  return acc[0];
}
#endif

// The scale of the update: min(1, max_unorm * ||p|| / ||u||), 1 for ||p|| = 0.
KESTREL_HD float trust_ratio(float max_unorm, float unorm, float pnorm) {
  const float limit = max_unorm * pnorm;
  return (limit > 0.0f && unorm > limit) ? limit / unorm : 1.0f;
}

// Fold the trust ratio into a parameter's step scalars, from its norms {sum u^2, sum p^2} (`adam`: u is
// adam_direction, whose bias-corrected norm is (c2 / c1) times its own).
KESTREL_HD void apply_trust_ratio(StepScalars& a, const float* norms, bool adam) {
  if (norms == nullptr || !(a.max_unorm > 0.0f)) return;
  const float unorm = adam ? sqrtf(norms[0]) * (a.correction2 / a.correction1) : sqrtf(norms[0]);
  const float scale = trust_ratio(a.max_unorm, unorm, sqrtf(norms[1]));
  if (adam)
    a.step_size = a.step_size * scale;
  else
    a.lr = a.lr * scale;
}

// One element's update direction for the norm pass, from its old state(s) and gradient (0 for a NaN/Inf gradient,
// which the step skips): LAMB's adam_direction of the new moments, LARS's new momentum.
KESTREL_HD float lamb_norm_direction(const StepScalars& a, float g, float s1, float s2) {
  adam_moments(a, g, s1, s2);
  const float u = adam_direction(a, s1, s2);
  return step_is_finite(g, s1, s2) ? u : 0.0f;
}
KESTREL_HD float lars_norm_direction(const StepScalars& a, float g, float p, float s1) {
  float new_p;
  one_state_update<OneState::kMomentum>(a, g, p, s1, new_p);
  return step_is_finite(g, s1) ? s1 : 0.0f;
}

// Step 5's normalisation of a new state by its block's new absmax (0 for an all-zero block).
KESTREL_HD float normalize_state(float s, float absmax) {
  return absmax > 0.0f ? s / absmax : 0.0f;
}

// The code of a normalised state v after nearest rounding to `idx`. bnb's rounding applies the sign fix to
// first moments (and to every signed-map state): a tiny negative moment takes the smallest negative code instead of
// 0. That is a hazard: after a gradient spike raises a block's absmax, a neighbour's moment far below the map's
// resolution is stored as -5.5e-7 of the (huge) absmax while its second moment rounds to 0, and its next update
// divides by eps. Robust rounding keeps quantization from enlarging an update instead: a numerator state (Adam's
// first moments, SGD's momentum, Lion's state) is plainly rounded, so one below the resolution becomes 0, and a
// denominator state (Adam's and AdEMAMix's second moment, RMSprop's and Adagrad's accumulators) that is positive
// never rounds to the map's zero code: it takes the next code up.
KESTREL_HD int round_numerator_code(const float* code, int idx, float v, bool robust) {
  return robust ? idx : quant::apply_sign_fix(code, idx, v);
}
KESTREL_HD int round_denominator_code(const float* code, int idx, float v, bool robust) {
  if (robust) return (v > 0.0f && code[idx] <= 0.0f && idx < quant::kCodeSize - 1) ? idx + 1 : idx;
  return idx;
}

// Requantize a first moment (signed map) or a second moment (unsigned map), given the map and its midpoints.
KESTREL_HD uint8_t requantize_signed(const float* code, const float* midpoints, float s, float absmax, bool robust) {
  const float v = normalize_state(s, absmax);
  return (uint8_t)round_numerator_code(code, quant::nearest_code_bsearch(midpoints, v), v, robust);
}
KESTREL_HD uint8_t requantize_unsigned(const float* code, const float* midpoints, float s, float absmax, bool robust) {
  const float v = normalize_state(s, absmax);
  return (uint8_t)round_denominator_code(code, quant::nearest_code_bsearch(midpoints, v), v, robust);
}

// The one state of a one-state optimizer (signed map): RMSprop's and Adagrad's accumulators are denominators,
// SGD's momentum and Lion's state numerators (bnb applies the sign fix to all, a no-op for the non-negative
// accumulators).
template <OneState KIND>
KESTREL_HD int round_one_state_code(const float* code, int idx, float v, bool robust) {
  if (robust && (KIND == OneState::kRMSprop || KIND == OneState::kAdagrad))
    return round_denominator_code(code, idx, v, true);
  return round_numerator_code(code, idx, v, robust);
}

// ---------------------------------------------------------------------------------------------- 4-bit states
// AdamW4bit / Adam4bit: the formats of the 4-bit optimizer paper (Li et al., 2023) as torchao implements them. Each
// state is quantized in blocks of 128 elements by its block's absmax to one of 16 codes: the first moment on a
// 16-entry signed dynamic map (3 exponent bits), the second on the linear map {1/16, 2/16, ..., 1} without zero, so
// no element's second moment rounds to 0 (a positive one below 1/32 of its block's absmax is stored as 1/16 of it;
// only an all-zero block is 0). Two codes per byte: element 2j in the high nibble, 2j + 1 in the low one. Nearest
// rounding (the count of the 15 midpoints below v, ties to the lower code, as the 8-bit search), no sign fix.
constexpr int k4bitBlockSize = 128;
constexpr int k4bitCodes = 16;

// The 15 midpoints of a 16-entry map.
KESTREL_HD void midpoints16(const float* code, float* mid) {
  for (int j = 0; j < k4bitCodes - 1; ++j) mid[j] = quant::midpoint(code, j);
}

KESTREL_HD int nearest_code16(const float* mid, float v) {
  int idx = 0;
  for (int step = 8; step > 0; step >>= 1) idx += (mid[idx + step - 1] < v) ? step : 0;
  return idx;
}

// The 4-bit code of element i of a packed state.
KESTREL_HD int code4_at(const uint8_t* codes, int64_t i) {
  return (codes[i >> 1] >> ((i & 1) ? 0 : 4)) & 15;
}

// One parameter of a fused multi-tensor step (Adam: two states; one-state optimizers: state2/absmax2 unused): raw
// pointers, its size, the index of its first 256-element block in the launch, and its per-step scalars (parameters of
// one launch may be at different steps).
struct TensorMeta {
  void* param;
  const void* grad;
  void* state1;  // uint8 codes (8-bit) or float32
  void* state2;
  float* absmax1;  // 8-bit only
  float* absmax2;
  int64_t numel;
  int64_t first_block;
  StepScalars scalars;
  const float* norms;  // LAMB/LARS: {sum u^2, sum p^2} of this parameter (update_norms), or nullptr
  float* norms_out;    // update_norms: where this parameter's sums go
  // A capturable step (CUDA graphs): the step count and the lr in device memory, read by the kernel (scalars are
  // then recomputed there with set_step_and_lr); nullptr otherwise.
  const int64_t* step_ptr;
  const float* lr_ptr;
};

// The scalars a kernel uses for parameter `m`: the host's, or recomputed from the device step count and lr.
KESTREL_HD StepScalars scalars_of(const TensorMeta& m) {
  StepScalars a = m.scalars;
  if (m.step_ptr != nullptr) set_step_and_lr(a, *m.step_ptr, m.lr_ptr != nullptr ? *m.lr_ptr : a.lr);
  return a;
}

}  // namespace optim
}  // namespace kestrel
