// Raw-pointer launcher of the fused multi-tensor Adam step. Never includes torch (fast to compile).
#include "kestrel/launch.h"
#include "kestrel/optim.cuh"

namespace kestrel {
namespace cuda {
namespace {

template <typename T>
cudaError_t launch_adam(bool eight_bit, const optim::AdamTensorMeta* meta, int num_tensors, int64_t total_blocks,
                        const float* qmap1, const float* qmap2, cudaStream_t stream) {
  if (total_blocks == 0 || num_tensors == 0) return cudaSuccess;
  const int64_t ctas = (total_blocks + kAdamWarps - 1) / kAdamWarps;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (eight_bit)
    adam_step_kernel<T, true><<<(unsigned)ctas, kAdamThreads, 0, stream>>>(meta, num_tensors, total_blocks, qmap1, qmap2);
  else
    adam_step_kernel<T, false><<<(unsigned)ctas, kAdamThreads, 0, stream>>>(meta, num_tensors, total_blocks, qmap1, qmap2);
  return cudaGetLastError();
}

}  // namespace

int adam_step(DType dtype, bool eight_bit, const optim::AdamTensorMeta* meta, int num_tensors, int64_t total_blocks,
              const float* qmap1, const float* qmap2, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_adam<float>(eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, s);
    case DType::kFloat16: return launch_adam<__half>(eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, s);
    case DType::kBFloat16:
      return launch_adam<__nv_bfloat16>(eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kestrel
