// CUDA kernels of the fused multi-tensor optimizer steps, 8-bit block-wise or 32-bit states: two_state_kernel
// (Adam/AdamW, LAMB, AdEMAMix), one_state_kernel (SGD with momentum, LARS, RMSprop, Adagrad, Lion) and the LAMB/LARS
// norm pass (norm_kernel, norm_reduce_kernel). Framework-free. kStepThreads is the block size of every step and norm
// kernel.
//
// One warp per 256-element block: each lane handles 8 elements strided by 32 (coalesced), the block's new absmax is
// a warp-shuffle max, the maps and their midpoints sit in shared memory. A launch covers every parameter of one
// dtype; a warp finds its parameter by binary search over the block offsets in the metadata.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#endif

#include "kestrel/optim.h"
#include "kestrel/quantize.cuh"

namespace kestrel {
namespace cuda {

// kStepThreads, kStepWarps and the kernels' argument struct (StepArgs): kestrel/kernel_args.h.
constexpr int kAdamItems = optim::kBlockSize / 32;

__device__ __forceinline__ int find_tensor(const optim::TensorMeta* meta, int num_tensors, int64_t block) {
  int lo = 0, hi = num_tensors - 1;  // the last tensor whose first_block <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta[mid].first_block <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Copies a 256-entry map and its midpoints (+inf sentinel) into shared memory; every thread of the CTA calls it.
__device__ __forceinline__ void stage_map(const float* __restrict__ qmap, float* code, float* mid) {
  const int tid = threadIdx.x;
  code[tid] = qmap[tid];
  __syncthreads();
  mid[tid] = tid < quant::kCodeSize - 1 ? quant::midpoint(code, tid) : __int_as_float(0x7f800000);
  __syncthreads();
}

// The 256-element block a warp updates: its parameter's metadata and its element range.
struct WarpBlock {
  const optim::TensorMeta* meta;
  int64_t local_block, begin, end;
};

// The parameter's new value after rounding to T: nearest even, or stochastic for bf16 when asked.
template <typename T>
__device__ __forceinline__ float round_param(float v, const optim::StepScalars& a, int64_t index, int which) {
  if (same_type<T, __nv_bfloat16>::value && a.stochastic_round) v = optim::stochastic_round_bf16(v, a, index, which);
  return ElementIO<T>::round(v);
}

__device__ __forceinline__ bool locate_block(const optim::TensorMeta* meta, int num_tensors, int64_t total_blocks,
                                             WarpBlock& w) {
  const int64_t block = (int64_t)blockIdx.x * kStepWarps + (threadIdx.x >> 5);
  if (block >= total_blocks) return false;
  w.meta = &meta[find_tensor(meta, num_tensors, block)];
  w.local_block = block - w.meta->first_block;
  w.begin = w.local_block * optim::kBlockSize;
  w.end = min(w.begin + (int64_t)optim::kBlockSize, w.meta->numel);
  return true;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Adam with 4-bit states (kestrel/optim.h, "4-bit states"), the body of two_state_kernel<T, kAdam4bit, true>: a
// warp per 256-element block of the launch (the multi-tensor layout of the 8-bit step), i.e. two 128-element 4-bit
// blocks; lane l takes elements l + 32 k, k < 4 in the first and k >= 4 in the second half. The pair of elements
// sharing a byte sits in lanes (2j, 2j + 1): the even lane writes the byte with its partner's code (a shuffle).
template <typename T>
__device__ __forceinline__ void two_state4bit_body(const StepArgs& args) {
  __shared__ float code1[optim::k4bitCodes], code2[optim::k4bitCodes];
  __shared__ float mid1[optim::k4bitCodes], mid2[optim::k4bitCodes];
  const int tid = threadIdx.x;
  if (tid < optim::k4bitCodes) {
    code1[tid] = args.qmap1[tid];
    code2[tid] = args.qmap2[tid];
  }
  __syncthreads();
  if (tid < optim::k4bitCodes - 1) {
    mid1[tid] = quant::midpoint(code1, tid);
    mid2[tid] = quant::midpoint(code2, tid);
  }
  __syncthreads();
  WarpBlock w;
  if (!locate_block(args.meta, args.num_tensors, args.total_blocks, w)) return;
  const int lane = threadIdx.x & 31;
  const optim::TensorMeta& m = *w.meta;
  const optim::StepScalars a = optim::scalars_of(m);
  const int64_t begin = w.begin, end = w.end;
  const int64_t block0 = 2 * w.local_block;  // the 4-bit block of the first half
  T* p = static_cast<T*>(m.param);
  const T* g = static_cast<const T*>(m.grad);
  uint8_t* c1 = static_cast<uint8_t*>(m.state1);
  uint8_t* c2 = static_cast<uint8_t*>(m.state2);
  const bool second = begin + optim::k4bitBlockSize < end;  // the second half holds elements
  const float old1[2] = {m.absmax1[block0], second ? m.absmax1[block0 + 1] : 0.0f};
  const float old2[2] = {m.absmax2[block0], second ? m.absmax2[block0 + 1] : 0.0f};
  float s1[kAdamItems], s2[kAdamItems];
  bool finite[kAdamItems];
  float max1[2] = {0.0f, 0.0f}, max2[2] = {0.0f, 0.0f};
#pragma unroll
  for (int k = 0; k < kAdamItems; ++k) {
    const int64_t i = begin + lane + 32 * k;
    const int h = k >= kAdamItems / 2;
    const bool valid = i < end;
    const float grad = valid ? ElementIO<T>::load(g + i) * a.gnorm_scale : 0.0f;
    float m1 = valid ? code1[optim::code4_at(c1, i)] * old1[h] : 0.0f;
    float m2 = valid ? code2[optim::code4_at(c2, i)] * old2[h] : 0.0f;
    optim::adam_moments(a, grad, m1, m2);
    finite[k] = optim::step_is_finite(grad, m1, m2);
    s1[k] = valid && finite[k] ? m1 : 0.0f;
    s2[k] = valid && finite[k] ? m2 : 0.0f;
    max1[h] = fmaxf(max1[h], fabsf(s1[k]));
    max2[h] = fmaxf(max2[h], fabsf(s2[k]));
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    max1[h] = warp_max(max1[h]);
    max2[h] = warp_max(max2[h]);
  }
  if (lane == 0) {
    m.absmax1[block0] = max1[0];
    m.absmax2[block0] = max2[0];
    if (second) {
      m.absmax1[block0 + 1] = max1[1];
      m.absmax2[block0 + 1] = max2[1];
    }
  }
#pragma unroll
  for (int k = 0; k < kAdamItems; ++k) {
    const int64_t i = begin + lane + 32 * k;
    const int h = k >= kAdamItems / 2;
    if (i < end && finite[k]) {
      const float old_p = ElementIO<T>::load_plain(p + i);
      float new_p = round_param<T>(optim::adam_param_update(a, old_p, s1[k], s2[k]), a, i, 0);
      if (a.apply_decay) new_p = round_param<T>(new_p * a.decay, a, i, 1);
      ElementIO<T>::store(p + i, new_p);
    }
    const int q1 = optim::nearest_code16(mid1, optim::normalize_state(s1[k], max1[h]));
    const int q2 = optim::nearest_code16(mid2, optim::normalize_state(s2[k], max2[h]));
    const int partner1 = __shfl_xor_sync(0xffffffffu, q1, 1);
    const int partner2 = __shfl_xor_sync(0xffffffffu, q2, 1);
    if ((lane & 1) == 0 && i < end) {
      const bool pair = i + 1 < end;
      c1[i >> 1] = (uint8_t)((q1 << 4) | (pair ? partner1 : 0));
      c2[i >> 1] = (uint8_t)((q2 << 4) | (pair ? partner2 : 0));
    }
  }
}

// Adam or AdEMAMix (whose slow first moment m3 lives in the second half of state1 / absmax1); Adam with 4-bit states
// (two_state4bit_body).
template <typename T, optim::TwoState KIND, bool EIGHT_BIT>
__global__ void __launch_bounds__(kStepThreads) two_state_kernel(const StepArgs args) {
  if (KIND == optim::TwoState::kAdam4bit) {
    if (EIGHT_BIT) two_state4bit_body<T>(args);
    return;
  }
  const optim::TensorMeta* __restrict__ meta = args.meta;
  const int num_tensors = args.num_tensors;
  const int64_t total_blocks = args.total_blocks;
  const float* __restrict__ qmap1 = args.qmap1;
  const float* __restrict__ qmap2 = args.qmap2;
  constexpr bool kMix = KIND == optim::TwoState::kAdEMAMix;
  __shared__ float code1[quant::kCodeSize], code2[quant::kCodeSize];
  __shared__ float mid1[quant::kMidpointsSize], mid2[quant::kMidpointsSize];
  if (EIGHT_BIT) {
    stage_map(qmap1, code1, mid1);
    stage_map(qmap2, code2, mid2);
  }
  WarpBlock w;
  if (!locate_block(meta, num_tensors, total_blocks, w)) return;
  const int lane = threadIdx.x & 31;
  const optim::TensorMeta& m = *w.meta;
  optim::StepScalars a = optim::scalars_of(m);
  if (!kMix) optim::apply_trust_ratio(a, m.norms, /*adam=*/true);  // LAMB
  const int64_t local_block = w.local_block, begin = w.begin, end = w.end;
  const int64_t blocks = (m.numel + optim::kBlockSize - 1) / optim::kBlockSize;
  T* p = static_cast<T*>(m.param);
  const T* g = static_cast<const T*>(m.grad);

  float s1[kAdamItems], s2[kAdamItems], s3[kAdamItems];
  bool finite[kAdamItems];
  float max1 = 0.0f, max2 = 0.0f, max3 = 0.0f;
  const float old_max1 = EIGHT_BIT ? m.absmax1[local_block] : 0.0f;
  const float old_max2 = EIGHT_BIT ? m.absmax2[local_block] : 0.0f;
  const float old_max3 = EIGHT_BIT && kMix ? m.absmax1[blocks + local_block] : 0.0f;
#pragma unroll
  for (int k = 0; k < kAdamItems; ++k) {
    const int64_t i = begin + lane + 32 * k;
    const bool valid = i < end;
    const float grad = valid ? ElementIO<T>::load(g + i) * a.gnorm_scale : 0.0f;
    float m1 = 0.0f, m2 = 0.0f, m3 = 0.0f;
    if (valid) {
      if (EIGHT_BIT) {
        const uint8_t* c1 = static_cast<const uint8_t*>(m.state1);
        m1 = quant::dequantize_value(code1, c1[i], old_max1);
        m2 = quant::dequantize_value(code2, static_cast<const uint8_t*>(m.state2)[i], old_max2);
        if (kMix) m3 = quant::dequantize_value(code1, c1[m.numel + i], old_max3);
      } else {
        const float* f1 = static_cast<const float*>(m.state1);
        m1 = f1[i];
        m2 = static_cast<const float*>(m.state2)[i];
        if (kMix) m3 = f1[m.numel + i];
      }
    }
    const float old1 = m1, old2 = m2, old3 = m3;
    if (kMix)
      optim::ademamix_moments(a, grad, m1, m3, m2);
    else
      optim::adam_moments(a, grad, m1, m2);
    finite[k] = optim::step_is_finite(grad, m1, m2, m3);
    if (EIGHT_BIT) {  // a NaN/Inf gradient zeroes the 8-bit states (bnb's 8-bit kernel) ...
      m1 = finite[k] ? m1 : 0.0f;
      m2 = finite[k] ? m2 : 0.0f;
      m3 = finite[k] ? m3 : 0.0f;
    } else {  // ... and leaves 32-bit states unchanged (bnb's 32-bit kernel)
      m1 = finite[k] ? m1 : old1;
      m2 = finite[k] ? m2 : old2;
      m3 = finite[k] ? m3 : old3;
    }
    s1[k] = valid ? m1 : 0.0f;
    s2[k] = valid ? m2 : 0.0f;
    s3[k] = valid ? m3 : 0.0f;
    max1 = fmaxf(max1, fabsf(s1[k]));
    max2 = fmaxf(max2, fabsf(s2[k]));
    max3 = fmaxf(max3, fabsf(s3[k]));
  }
  if (EIGHT_BIT) {
    max1 = warp_max(max1);
    max2 = warp_max(max2);
    if (kMix) max3 = warp_max(max3);
    if (lane == 0) {
      m.absmax1[local_block] = max1;
      m.absmax2[local_block] = max2;
      if (kMix) m.absmax1[blocks + local_block] = max3;
    }
  }
#pragma unroll
  for (int k = 0; k < kAdamItems; ++k) {
    const int64_t i = begin + lane + 32 * k;
    if (i >= end) continue;
    if (finite[k]) {  // the parameter moves only for a finite gradient
      const float old_p = ElementIO<T>::load_plain(p + i);
      const float updated = kMix ? optim::ademamix_param_update(a, old_p, s1[k], s3[k], s2[k])
                                 : optim::adam_param_update(a, old_p, s1[k], s2[k]);
      float new_p = round_param<T>(updated, a, i, 0);
      if (a.apply_decay) new_p = round_param<T>(new_p * a.decay, a, i, 1);
      ElementIO<T>::store(p + i, new_p);
    }
    if (EIGHT_BIT) {
      uint8_t* c1 = static_cast<uint8_t*>(m.state1);
      const bool robust = a.robust_rounding;
      c1[i] = optim::requantize_signed(code1, mid1, s1[k], max1, robust);
      static_cast<uint8_t*>(m.state2)[i] = optim::requantize_unsigned(code2, mid2, s2[k], max2, robust);
      if (kMix) c1[m.numel + i] = optim::requantize_signed(code1, mid1, s3[k], max3, robust);
    } else {
      float* f1 = static_cast<float*>(m.state1);
      f1[i] = s1[k];
      static_cast<float*>(m.state2)[i] = s2[k];
      if (kMix) f1[m.numel + i] = s3[k];
    }
  }
}

// One-state optimizers: the same layout (one warp per 256-element block), state1 only.
template <typename T, optim::OneState KIND, bool EIGHT_BIT>
__global__ void __launch_bounds__(kStepThreads) one_state_kernel(const StepArgs args) {
  const optim::TensorMeta* __restrict__ meta = args.meta;
  const int num_tensors = args.num_tensors;
  const int64_t total_blocks = args.total_blocks;
  const float* __restrict__ qmap1 = args.qmap1;
  __shared__ float code1[quant::kCodeSize];
  __shared__ float mid1[quant::kMidpointsSize];
  if (EIGHT_BIT) stage_map(qmap1, code1, mid1);
  WarpBlock w;
  if (!locate_block(meta, num_tensors, total_blocks, w)) return;
  const int lane = threadIdx.x & 31;
  const optim::TensorMeta& m = *w.meta;
  optim::StepScalars a = optim::scalars_of(m);
  if (KIND == optim::OneState::kMomentum) optim::apply_trust_ratio(a, m.norms, /*adam=*/false);  // LARS
  const int64_t local_block = w.local_block, begin = w.begin, end = w.end;
  T* p = static_cast<T*>(m.param);
  const T* g = static_cast<const T*>(m.grad);

  float s1[kAdamItems], new_p[kAdamItems];
  bool finite[kAdamItems];
  float new_max = 0.0f;
  const float old_max = EIGHT_BIT ? m.absmax1[local_block] : 0.0f;
#pragma unroll
  for (int k = 0; k < kAdamItems; ++k) {
    const int64_t i = begin + lane + 32 * k;
    const bool valid = i < end;
    const float grad = valid ? ElementIO<T>::load(g + i) * a.gnorm_scale : 0.0f;
    float old_s = 0.0f;
    if (valid) {
      old_s = EIGHT_BIT ? quant::dequantize_value(code1, static_cast<const uint8_t*>(m.state1)[i], old_max)
                        : static_cast<const float*>(m.state1)[i];
    }
    float s = old_s, updated = 0.0f;
    optim::one_state_update<KIND>(a, grad, valid ? ElementIO<T>::load_plain(p + i) : 0.0f, s, updated);
    finite[k] = optim::step_is_finite(grad, s);
    s = finite[k] ? s : (EIGHT_BIT ? 0.0f : old_s);
    s1[k] = valid ? s : 0.0f;
    new_p[k] = updated;
    new_max = fmaxf(new_max, fabsf(s1[k]));
  }
  if (EIGHT_BIT) {
    new_max = warp_max(new_max);
    if (lane == 0) m.absmax1[local_block] = new_max;
  }
#pragma unroll
  for (int k = 0; k < kAdamItems; ++k) {
    const int64_t i = begin + lane + 32 * k;
    if (i >= end) continue;
    if (finite[k]) ElementIO<T>::store(p + i, round_param<T>(new_p[k], a, i, 0));
    if (EIGHT_BIT) {
      const float v = optim::normalize_state(s1[k], new_max);
      static_cast<uint8_t*>(m.state1)[i] = static_cast<uint8_t>(
          optim::round_one_state_code<KIND>(code1, quant::nearest_code_bsearch(mid1, v), v, a.robust_rounding));
    } else
      static_cast<float*>(m.state1)[i] = s1[k];
  }
}

__device__ __forceinline__ float warp_sum(float v) {  // the butterfly of optim::butterfly_sum32
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = v + __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The norm pass of LAMB (ADAM) / LARS: each 256-element block's {sum u^2, sum p^2} into block_sums (two floats per
// block of the launch), in the lane order of kestrel/optim.h.
template <typename T, bool ADAM, bool EIGHT_BIT>
__global__ void __launch_bounds__(kStepThreads) norm_kernel(const StepArgs args) {
  const optim::TensorMeta* __restrict__ meta = args.meta;
  const int num_tensors = args.num_tensors;
  const int64_t total_blocks = args.total_blocks;
  const float* __restrict__ qmap1 = args.qmap1;
  const float* __restrict__ qmap2 = args.qmap2;
  float* __restrict__ block_sums = args.block_sums;
  __shared__ float code1[quant::kCodeSize], code2[quant::kCodeSize];
  if (EIGHT_BIT) {
    code1[threadIdx.x] = qmap1[threadIdx.x];
    if (ADAM) code2[threadIdx.x] = qmap2[threadIdx.x];
    __syncthreads();
  }
  WarpBlock w;
  if (!locate_block(meta, num_tensors, total_blocks, w)) return;
  const int lane = threadIdx.x & 31;
  const optim::TensorMeta& m = *w.meta;
  const optim::StepScalars a = optim::scalars_of(m);
  const T* p = static_cast<const T*>(m.param);
  const T* g = static_cast<const T*>(m.grad);
  const float old_max1 = EIGHT_BIT ? m.absmax1[w.local_block] : 0.0f;
  const float old_max2 = EIGHT_BIT && ADAM ? m.absmax2[w.local_block] : 0.0f;
  float sum_u = 0.0f, sum_p = 0.0f;
#pragma unroll
  for (int k = 0; k < kAdamItems; ++k) {
    const int64_t i = w.begin + lane + 32 * k;
    if (i >= w.end) continue;
    const float grad = ElementIO<T>::load(g + i) * a.gnorm_scale;
    const float pv = ElementIO<T>::load(p + i);
    const float s1 = EIGHT_BIT ? quant::dequantize_value(code1, static_cast<const uint8_t*>(m.state1)[i], old_max1)
                               : static_cast<const float*>(m.state1)[i];
    float u;
    if (ADAM) {
      const float s2 = EIGHT_BIT ? quant::dequantize_value(code2, static_cast<const uint8_t*>(m.state2)[i], old_max2)
                                 : static_cast<const float*>(m.state2)[i];
      u = optim::lamb_norm_direction(a, grad, s1, s2);
    } else {
      u = optim::lars_norm_direction(a, grad, pv, s1);
    }
    sum_u = sum_u + u * u;
    sum_p = sum_p + pv * pv;
  }
  sum_u = warp_sum(sum_u);
  sum_p = warp_sum(sum_p);
  if (lane == 0) {
    const int64_t b = m.first_block + w.local_block;
    block_sums[2 * b] = sum_u;
    block_sums[2 * b + 1] = sum_p;
  }
}

// One CTA per parameter: its block sums added in double in the order of optim::tree_sum_blocks, into norms_out.
__global__ void __launch_bounds__(optim::kNormThreads) norm_reduce_kernel(const StepArgs args) {
  const optim::TensorMeta* __restrict__ meta = args.meta;
  const float* __restrict__ block_sums = args.block_sums;
  __shared__ double acc_u[optim::kNormThreads], acc_p[optim::kNormThreads];
  const optim::TensorMeta& m = meta[blockIdx.x];
  const int64_t blocks = (m.numel + optim::kBlockSize - 1) / optim::kBlockSize;
  const int t = threadIdx.x;
  double su = 0.0, sp = 0.0;
  for (int64_t b = t; b < blocks; b += optim::kNormThreads) {
    su += (double)block_sums[2 * (m.first_block + b)];
    sp += (double)block_sums[2 * (m.first_block + b) + 1];
  }
  acc_u[t] = su;
  acc_p[t] = sp;
  __syncthreads();
  for (int stride = optim::kNormThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) {
      acc_u[t] += acc_u[t + stride];
      acc_p[t] += acc_p[t + stride];
    }
    __syncthreads();
  }
  if (t == 0) {
    m.norms_out[0] = (float)acc_u[0];
    m.norms_out[1] = (float)acc_p[0];
  }
}

}  // namespace cuda
}  // namespace kestrel
