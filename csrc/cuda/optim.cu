// Raw-pointer launchers of the fused multi-tensor optimizer steps (two-state, one-state) and of the LAMB/LARS norm
// pass. Never includes torch (fast to compile).
#include "kestrel/cuda_launch.h"
#include "kestrel/launch.h"
#include "kestrel/optim.cuh"

namespace kestrel {
namespace cuda {
namespace {

template <typename T, optim::TwoState KIND>
cudaError_t launch_two_state_kind(bool eight_bit, const optim::TensorMeta* meta, int num_tensors, int64_t total_blocks,
                                  const float* qmap1, const float* qmap2, cudaStream_t stream) {
  const int64_t ctas = (total_blocks + kStepWarps - 1) / kStepWarps;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (eight_bit)
    KESTREL_LAUNCH((unsigned)ctas, kStepThreads, 0, stream, two_state_kernel<T, KIND, true>)(
        meta, num_tensors, total_blocks, qmap1, qmap2);
  else
    KESTREL_LAUNCH((unsigned)ctas, kStepThreads, 0, stream, two_state_kernel<T, KIND, false>)(
        meta, num_tensors, total_blocks, qmap1, qmap2);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_two_state(optim::TwoState kind, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                             int64_t total_blocks, const float* qmap1, const float* qmap2, cudaStream_t stream) {
  if (total_blocks == 0 || num_tensors == 0) return cudaSuccess;
  if (kind == optim::TwoState::kAdEMAMix)
    return launch_two_state_kind<T, optim::TwoState::kAdEMAMix>(eight_bit, meta, num_tensors, total_blocks, qmap1,
                                                                qmap2, stream);
  return launch_two_state_kind<T, optim::TwoState::kAdam>(eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2,
                                                          stream);
}

template <typename T, optim::OneState KIND>
cudaError_t launch_one_state_kind(bool eight_bit, const optim::TensorMeta* meta, int num_tensors, int64_t total_blocks,
                                  const float* qmap1, cudaStream_t stream) {
  const int64_t ctas = (total_blocks + kStepWarps - 1) / kStepWarps;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (eight_bit)
    KESTREL_LAUNCH((unsigned)ctas, kStepThreads, 0, stream, one_state_kernel<T, KIND, true>)(meta, num_tensors,
                                                                                             total_blocks, qmap1);
  else
    KESTREL_LAUNCH((unsigned)ctas, kStepThreads, 0, stream, one_state_kernel<T, KIND, false>)(meta, num_tensors,
                                                                                              total_blocks, qmap1);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_one_state(optim::OneState kind, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                             int64_t total_blocks, const float* qmap1, cudaStream_t stream) {
  if (total_blocks == 0 || num_tensors == 0) return cudaSuccess;
  switch (kind) {
    case optim::OneState::kMomentum:
      return launch_one_state_kind<T, optim::OneState::kMomentum>(eight_bit, meta, num_tensors, total_blocks, qmap1,
                                                                  stream);
    case optim::OneState::kRMSprop:
      return launch_one_state_kind<T, optim::OneState::kRMSprop>(eight_bit, meta, num_tensors, total_blocks, qmap1,
                                                                 stream);
    case optim::OneState::kAdagrad:
      return launch_one_state_kind<T, optim::OneState::kAdagrad>(eight_bit, meta, num_tensors, total_blocks, qmap1,
                                                                 stream);
    case optim::OneState::kLion:
      return launch_one_state_kind<T, optim::OneState::kLion>(eight_bit, meta, num_tensors, total_blocks, qmap1,
                                                              stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_norms(bool adam, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                         int64_t total_blocks, const float* qmap1, const float* qmap2, float* block_sums,
                         cudaStream_t stream) {
  if (num_tensors == 0) return cudaSuccess;
  const int64_t ctas = (total_blocks + kStepWarps - 1) / kStepWarps;
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (ctas > 0) {
    const dim3 grid((unsigned)ctas);
    if (adam && eight_bit)
      KESTREL_LAUNCH(grid, kStepThreads, 0, stream, norm_kernel<T, true, true>)(meta, num_tensors, total_blocks, qmap1,
                                                                                qmap2, block_sums);
    else if (adam)
      KESTREL_LAUNCH(grid, kStepThreads, 0, stream, norm_kernel<T, true, false>)(meta, num_tensors, total_blocks, qmap1,
                                                                                 qmap2, block_sums);
    else if (eight_bit)
      KESTREL_LAUNCH(grid, kStepThreads, 0, stream, norm_kernel<T, false, true>)(meta, num_tensors, total_blocks, qmap1,
                                                                                 qmap2, block_sums);
    else
      KESTREL_LAUNCH(grid, kStepThreads, 0, stream, norm_kernel<T, false, false>)(meta, num_tensors, total_blocks,
                                                                                  qmap1, qmap2, block_sums);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  KESTREL_LAUNCH((unsigned)num_tensors, optim::kNormThreads, 0, stream, norm_reduce_kernel)(meta, block_sums);
  return cudaGetLastError();
}

}  // namespace

int update_norms(DType dtype, bool adam, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                 int64_t total_blocks, const float* qmap1, const float* qmap2, float* block_sums, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_norms<float>(adam, eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, block_sums, s);
    case DType::kFloat16:
      return launch_norms<__half>(adam, eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, block_sums, s);
    case DType::kBFloat16:
      return launch_norms<__nv_bfloat16>(adam, eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, block_sums, s);
  }
  return cudaErrorInvalidValue;
}

int one_state_step(DType dtype, optim::OneState kind, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                   int64_t total_blocks, const float* qmap1, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_one_state<float>(kind, eight_bit, meta, num_tensors, total_blocks, qmap1, s);
    case DType::kFloat16:
      return launch_one_state<__half>(kind, eight_bit, meta, num_tensors, total_blocks, qmap1, s);
    case DType::kBFloat16:
      return launch_one_state<__nv_bfloat16>(kind, eight_bit, meta, num_tensors, total_blocks, qmap1, s);
  }
  return cudaErrorInvalidValue;
}

int two_state_step(DType dtype, optim::TwoState kind, bool eight_bit, const optim::TensorMeta* meta, int num_tensors,
                   int64_t total_blocks, const float* qmap1, const float* qmap2, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_two_state<float>(kind, eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, s);
    case DType::kFloat16:
      return launch_two_state<__half>(kind, eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, s);
    case DType::kBFloat16:
      return launch_two_state<__nv_bfloat16>(kind, eight_bit, meta, num_tensors, total_blocks, qmap1, qmap2, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kestrel
