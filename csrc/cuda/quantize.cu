// Raw-pointer launchers for the block-wise quantization kernels (kestrel/quantize.cuh), as kestrel/launch_plan.h
// plans them. Never includes torch (fast to compile).
#include "kestrel/cuda_launch.h"
#include "kestrel/launch.h"
#include "kestrel/quantize.cuh"

namespace kestrel {
namespace cuda {
namespace {

// The instance plan_quantize names: the register-resident kernel for the powers of two in [64, 4096], else a warp
// (blocksize <= 2048) or the whole CTA per quantization block.
template <typename T>
cudaError_t launch_quantize(const KernelLaunch& launch, const QuantizeArgs& a, cudaStream_t stream) {
  switch (a.blocksize) {
    case 64:
      return launch_kernel(&quantize_blockwise_kernel<T, 64>, launch, a, stream);
    case 128:
      return launch_kernel(&quantize_blockwise_kernel<T, 128>, launch, a, stream);
    case 256:
      return launch_kernel(&quantize_blockwise_kernel<T, 256>, launch, a, stream);
    case 512:
      return launch_kernel(&quantize_blockwise_kernel<T, 512>, launch, a, stream);
    case 1024:
      return launch_kernel(&quantize_blockwise_kernel<T, 1024>, launch, a, stream);
    case 2048:
      return launch_kernel(&quantize_blockwise_kernel<T, 2048>, launch, a, stream);
    case 4096:
      return launch_kernel(&quantize_blockwise_kernel<T, 4096>, launch, a, stream);
    default:
      if (a.blocksize <= 2048) return launch_kernel(&quantize_blockwise_any_kernel<T, 32>, launch, a, stream);
      return launch_kernel(&quantize_blockwise_any_kernel<T, kQuantizeThreads>, launch, a, stream);
  }
}

}  // namespace

int quantize_blockwise(DType dtype, const QuantizeArgs& args, void* stream) {
  const LaunchPlan plan = plan_quantize(dtype, args.n, args.blocksize);
  if (!plan.ok) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  for (const KernelLaunch& launch : plan.launches) {
    cudaError_t error = cudaErrorInvalidValue;
    switch (dtype) {
      case DType::kFloat32:
        error = launch_quantize<float>(launch, args, s);
        break;
      case DType::kFloat16:
        error = launch_quantize<__half>(launch, args, s);
        break;
      case DType::kBFloat16:
        error = launch_quantize<__nv_bfloat16>(launch, args, s);
        break;
    }
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

int dequantize_blockwise(DType dtype, const DequantizeArgs& args, void* stream) {
  const LaunchPlan plan = plan_dequantize(dtype, args.n, args.blocksize);
  if (!plan.ok) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  for (const KernelLaunch& launch : plan.launches) {
    cudaError_t error = cudaErrorInvalidValue;
    switch (dtype) {
      case DType::kFloat32:
        error = launch_kernel(&dequantize_blockwise_kernel<float>, launch, args, s);
        break;
      case DType::kFloat16:
        error = launch_kernel(&dequantize_blockwise_kernel<__half>, launch, args, s);
        break;
      case DType::kBFloat16:
        error = launch_kernel(&dequantize_blockwise_kernel<__nv_bfloat16>, launch, args, s);
        break;
    }
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
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
