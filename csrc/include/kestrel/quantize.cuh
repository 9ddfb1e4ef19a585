// CUDA kernels for block-wise dynamic quantization. Framework-free: raw pointers, sizes and a stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#endif

#include "kestrel/kernel_args.h"
#include "kestrel/quantize.h"

namespace kestrel {
namespace cuda {

template <typename T>
struct ElementIO;
// load: read-only data (through the non-coherent cache); load_plain: data this kernel also writes;
// round: the float value after rounding to T (round-to-nearest-even).
template <>
struct ElementIO<float> {
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ float load_plain(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  static __device__ __forceinline__ float round(float v) { return v; }
};
template <>
struct ElementIO<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(__ldg(p)); }
  static __device__ __forceinline__ float load_plain(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
};
template <>
struct ElementIO<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }
  static __device__ __forceinline__ float load_plain(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

// The launch shapes (kQuantizeThreads, QuantizeShape) and the argument structs are in kestrel/kernel_args.h.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_blockwise_kernel(const QuantizeArgs args) {
  using Shape = QuantizeShape<BLOCK>;
  const T* __restrict__ x = static_cast<const T*>(args.x);
  const float* __restrict__ code = args.code;
  uint8_t* __restrict__ codes = args.codes;
  float* __restrict__ absmax = args.absmax;
  const int64_t n = args.n, num_blocks = args.num_blocks;
  __shared__ float midpoints[quant::kMidpointsSize];
  __shared__ float warp_absmax[kQuantizeThreads / 32];

  const int tid = threadIdx.x;
  if (tid < quant::kCodeSize - 1) midpoints[tid] = quant::midpoint(code, tid);
  if (tid == quant::kCodeSize - 1) midpoints[tid] = __int_as_float(0x7f800000);

  const int group = tid / Shape::TPB;
  const int lane_in_group = tid % Shape::TPB;
  const int64_t block = (int64_t)blockIdx.x * Shape::QB_PER_CTA + group;
  const int64_t base = block * BLOCK;

  float vals[Shape::ITEMS];
  float local_max = 0.0f;
#pragma unroll
  for (int k = 0; k < Shape::ITEMS; ++k) {
    const int64_t i = base + lane_in_group + (int64_t)k * Shape::TPB;
    vals[k] = (block < num_blocks && i < n) ? ElementIO<T>::load(x + i) : 0.0f;
    local_max = quant::finite_absmax_combine(local_max, fabsf(vals[k]));
  }

  // Reduce within the group: lanes of one warp first, then across the group's warps through shared memory.
  constexpr int WARP_WIDTH = Shape::TPB < 32 ? Shape::TPB : 32;
#pragma unroll
  for (int offset = WARP_WIDTH / 2; offset > 0; offset >>= 1)
    local_max = quant::finite_absmax_combine(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
  if constexpr (Shape::TPB > 32) {
    if ((tid & 31) == 0) warp_absmax[tid >> 5] = local_max;
    __syncthreads();
    const int first_warp = group * (Shape::TPB / 32);
    local_max = warp_absmax[first_warp];
#pragma unroll
    for (int w = 1; w < Shape::TPB / 32; ++w)
      local_max = quant::finite_absmax_combine(local_max, warp_absmax[first_warp + w]);
  } else {
    __syncthreads();  // midpoints
  }

  if (block >= num_blocks) return;
  if (lane_in_group == 0) absmax[block] = local_max;
  const quant::BlockScale scale = quant::block_scale(local_max);
#pragma unroll
  for (int k = 0; k < Shape::ITEMS; ++k) {
    const int64_t i = base + lane_in_group + (int64_t)k * Shape::TPB;
    if (i < n) codes[i] = (uint8_t)quant::nearest_code_bsearch(midpoints, quant::normalize(vals[k], scale));
  }
}

// Any blocksize (the kernel above takes the powers of two in [64, 4096]): GROUP threads per quantization block,
// a warp (GROUP 32) or the whole CTA (GROUP kQuantizeThreads), looping over the block twice, once for its absmax
// and once for its codes, so a block's length is bounded by neither registers nor shared memory. The groups of a
// CTA walk the blocks grid-stride; with GROUP == kQuantizeThreads the loop is uniform over the CTA.
template <typename T, int GROUP>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_blockwise_any_kernel(const QuantizeArgs args) {
  const T* __restrict__ x = static_cast<const T*>(args.x);
  const float* __restrict__ code = args.code;
  uint8_t* __restrict__ codes = args.codes;
  float* __restrict__ absmax = args.absmax;
  const int64_t n = args.n, blocksize = args.blocksize, num_blocks = args.num_blocks;
  static_assert(GROUP == 32 || GROUP == kQuantizeThreads, "a group is a warp or the CTA");
  constexpr int GROUPS = kQuantizeThreads / GROUP;
  __shared__ float midpoints[quant::kMidpointsSize];
  __shared__ float warp_absmax[kQuantizeThreads / 32];

  const int tid = threadIdx.x;
  if (tid < quant::kCodeSize - 1) midpoints[tid] = quant::midpoint(code, tid);
  if (tid == quant::kCodeSize - 1) midpoints[tid] = __int_as_float(0x7f800000);
  __syncthreads();

  const int group = tid / GROUP;
  const int lane = tid % GROUP;
  for (int64_t block = (int64_t)blockIdx.x * GROUPS + group; block < num_blocks; block += (int64_t)gridDim.x * GROUPS) {
    const int64_t begin = block * blocksize;
    const int64_t end = n - begin < blocksize ? n : begin + blocksize;
    float local_max = 0.0f;
    for (int64_t i = begin + lane; i < end; i += GROUP)
      local_max = quant::finite_absmax_combine(local_max, fabsf(ElementIO<T>::load(x + i)));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      local_max = quant::finite_absmax_combine(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
    if constexpr (GROUP > 32) {
      if ((tid & 31) == 0) warp_absmax[tid >> 5] = local_max;
      __syncthreads();
      local_max = warp_absmax[0];
#pragma unroll
      for (int w = 1; w < GROUP / 32; ++w) local_max = quant::finite_absmax_combine(local_max, warp_absmax[w]);
      __syncthreads();  // every thread has read warp_absmax before the next block writes it
    }
    if (lane == 0) absmax[block] = local_max;
    const quant::BlockScale scale = quant::block_scale(local_max);
    for (int64_t i = begin + lane; i < end; i += GROUP)
      codes[i] = (uint8_t)quant::nearest_code_bsearch(midpoints, quant::normalize(ElementIO<T>::load(x + i), scale));
  }
}

template <typename T>
__global__ void __launch_bounds__(kDequantizeThreads) dequantize_blockwise_kernel(const DequantizeArgs args) {
  const uint8_t* __restrict__ codes = args.codes;
  const float* __restrict__ absmax = args.absmax;
  const float* __restrict__ code = args.code;
  T* __restrict__ out = static_cast<T*>(args.out);
  const int64_t n = args.n, blocksize = args.blocksize;
  const int log2_blocksize = args.log2_blocksize;
  __shared__ float code_smem[quant::kCodeSize];
  code_smem[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t stride = (int64_t)gridDim.x * kDequantizeThreads * kDequantizeItems;
  for (int64_t start = (int64_t)blockIdx.x * kDequantizeThreads * kDequantizeItems + threadIdx.x; start < n;
       start += stride) {
#pragma unroll
    for (int k = 0; k < kDequantizeItems; ++k) {
      const int64_t i = start + (int64_t)k * kDequantizeThreads;
      if (i >= n) continue;
      // A power-of-two blocksize (log2_blocksize >= 0) shifts; any other divides.
      const int64_t block = log2_blocksize >= 0 ? (i >> log2_blocksize) : i / blocksize;
      ElementIO<T>::store(out + i, quant::dequantize_value(code_smem, codes[i], __ldg(absmax + block)));
    }
  }
}

}  // namespace cuda
}  // namespace kestrel
