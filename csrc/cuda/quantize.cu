// Raw-pointer launchers for the block-wise quantization kernels. Never includes torch (fast to compile).
#include "kestrel/cuda_launch.h"
#include "kestrel/launch.h"
#include "kestrel/quantize.cuh"

namespace kestrel {
namespace cuda {
namespace {

template <typename T, int BLOCK>
cudaError_t launch_quantize(const void* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                            cudaStream_t stream) {
  const int64_t num_blocks = (n + BLOCK - 1) / BLOCK;
  const int64_t ctas = (num_blocks + QuantizeShape<BLOCK>::QB_PER_CTA - 1) / QuantizeShape<BLOCK>::QB_PER_CTA;
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidValue;
  KESTREL_LAUNCH((unsigned)ctas, kQuantizeThreads, 0, stream, quantize_blockwise_kernel<T, BLOCK>)(
      static_cast<const T*>(x), code, codes, absmax, n, num_blocks);
  return cudaGetLastError();
}

// Any other blocksize: a warp per block up to 2048 elements, the whole CTA beyond; grid-stride over the blocks.
template <typename T, int GROUP>
cudaError_t launch_quantize_any(const void* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                                int64_t blocksize, cudaStream_t stream) {
  constexpr int64_t groups_per_cta = kQuantizeThreads / GROUP;
  const int64_t num_blocks = n == 0 ? 0 : (n - 1) / blocksize + 1;
  int64_t ctas = (num_blocks + groups_per_cta - 1) / groups_per_cta;
  if (ctas == 0) return cudaSuccess;
  if (ctas > 65536) ctas = 65536;
  KESTREL_LAUNCH((unsigned)ctas, kQuantizeThreads, 0, stream, quantize_blockwise_any_kernel<T, GROUP>)(
      static_cast<const T*>(x), code, codes, absmax, n, blocksize, num_blocks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_blocksize(const void* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                               int64_t blocksize, cudaStream_t stream) {
  if (blocksize <= 0) return cudaErrorInvalidValue;
  switch (blocksize) {
    case 64:
      return launch_quantize<T, 64>(x, code, codes, absmax, n, stream);
    case 128:
      return launch_quantize<T, 128>(x, code, codes, absmax, n, stream);
    case 256:
      return launch_quantize<T, 256>(x, code, codes, absmax, n, stream);
    case 512:
      return launch_quantize<T, 512>(x, code, codes, absmax, n, stream);
    case 1024:
      return launch_quantize<T, 1024>(x, code, codes, absmax, n, stream);
    case 2048:
      return launch_quantize<T, 2048>(x, code, codes, absmax, n, stream);
    case 4096:
      return launch_quantize<T, 4096>(x, code, codes, absmax, n, stream);
    default:
      if (blocksize <= 2048) return launch_quantize_any<T, 32>(x, code, codes, absmax, n, blocksize, stream);
      return launch_quantize_any<T, kQuantizeThreads>(x, code, codes, absmax, n, blocksize, stream);
  }
}

template <typename T>
cudaError_t launch_dequantize(const uint8_t* codes, const float* absmax, const float* code, void* out, int64_t n,
                              int64_t blocksize, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (blocksize <= 0) return cudaErrorInvalidValue;
  int log2_blocksize = -1;  // -1: not a power of two (the kernel divides)
  if ((blocksize & (blocksize - 1)) == 0) {
    log2_blocksize = 0;
    while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  }
  const int64_t per_cta = (int64_t)kDequantizeThreads * kDequantizeItems;
  int64_t ctas = (n + per_cta - 1) / per_cta;
  if (ctas > 65536) ctas = 65536;  // grid-stride beyond this
  KESTREL_LAUNCH((unsigned)ctas, kDequantizeThreads, 0, stream, dequantize_blockwise_kernel<T>)(
      codes, absmax, code, static_cast<T*>(out), n, blocksize, log2_blocksize);
  return cudaGetLastError();
}

}  // namespace

int quantize_blockwise(DType dtype, const void* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                       int64_t blocksize, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_blocksize<float>(x, code, codes, absmax, n, blocksize, s);
    case DType::kFloat16:
      return dispatch_blocksize<__half>(x, code, codes, absmax, n, blocksize, s);
    case DType::kBFloat16:
      return dispatch_blocksize<__nv_bfloat16>(x, code, codes, absmax, n, blocksize, s);
  }
  return cudaErrorInvalidValue;
}

int dequantize_blockwise(DType dtype, const uint8_t* codes, const float* absmax, const float* code, void* out,
                         int64_t n, int64_t blocksize, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_dequantize<float>(codes, absmax, code, out, n, blocksize, s);
    case DType::kFloat16:
      return launch_dequantize<__half>(codes, absmax, code, out, n, blocksize, s);
    case DType::kBFloat16:
      return launch_dequantize<__nv_bfloat16>(codes, absmax, code, out, n, blocksize, s);
  }
  return cudaErrorInvalidValue;
}

const char* compiled_archs() {
#if defined(KESTREL_CUDA_ARCHS)
  return KESTREL_STR(KESTREL_CUDA_ARCHS);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace kestrel
