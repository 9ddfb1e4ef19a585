// Raw-pointer launchers of the fused multi-tensor optimizer steps (two-state, one-state) and of the LAMB/LARS norm
// pass (kestrel/optim.cuh), as kestrel/launch_plan.h plans them. Never includes torch (fast to compile).
#include "kestrel/cuda_launch.h"
#include "kestrel/launch.h"
#include "kestrel/optim.cuh"

namespace kestrel {
namespace cuda {
namespace {

template <typename T, bool EIGHT_BIT>
cudaError_t launch_two_state(int kind, const KernelLaunch& launch, const StepArgs& a, cudaStream_t s) {
  if (kind == static_cast<int>(optim::TwoState::kAdam4bit))  // 4-bit states (packed codes: eight_bit's layout flag)
    return EIGHT_BIT ? launch_kernel(&two_state_kernel<T, optim::TwoState::kAdam4bit, true>, launch, a, s)
                     : cudaErrorInvalidValue;
  if (kind == static_cast<int>(optim::TwoState::kAdEMAMix))
    return launch_kernel(&two_state_kernel<T, optim::TwoState::kAdEMAMix, EIGHT_BIT>, launch, a, s);
  return launch_kernel(&two_state_kernel<T, optim::TwoState::kAdam, EIGHT_BIT>, launch, a, s);
}

template <typename T, bool EIGHT_BIT>
cudaError_t launch_one_state(int kind, const KernelLaunch& launch, const StepArgs& a, cudaStream_t s) {
  switch (static_cast<optim::OneState>(kind)) {
    case optim::OneState::kMomentum:
      return launch_kernel(&one_state_kernel<T, optim::OneState::kMomentum, EIGHT_BIT>, launch, a, s);
    case optim::OneState::kRMSprop:
      return launch_kernel(&one_state_kernel<T, optim::OneState::kRMSprop, EIGHT_BIT>, launch, a, s);
    case optim::OneState::kAdagrad:
      return launch_kernel(&one_state_kernel<T, optim::OneState::kAdagrad, EIGHT_BIT>, launch, a, s);
    case optim::OneState::kLion:
      return launch_kernel(&one_state_kernel<T, optim::OneState::kLion, EIGHT_BIT>, launch, a, s);
    case optim::OneState::kMuon:
      return launch_kernel(&one_state_kernel<T, optim::OneState::kMuon, EIGHT_BIT>, launch, a, s);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_step(bool two_state, int kind, bool eight_bit, const KernelLaunch& launch, const StepArgs& a,
                        cudaStream_t s) {
  if (two_state)
    return eight_bit ? launch_two_state<T, true>(kind, launch, a, s) : launch_two_state<T, false>(kind, launch, a, s);
  return eight_bit ? launch_one_state<T, true>(kind, launch, a, s) : launch_one_state<T, false>(kind, launch, a, s);
}

// The norm pass: plan_norms' first launch (when there are blocks) is norm_kernel, the last norm_reduce_kernel.
template <typename T>
cudaError_t launch_norm_blocks(bool adam, bool eight_bit, const KernelLaunch& launch, const StepArgs& a,
                               cudaStream_t s) {
  if (adam && eight_bit) return launch_kernel(&norm_kernel<T, true, true>, launch, a, s);
  if (adam) return launch_kernel(&norm_kernel<T, true, false>, launch, a, s);
  if (eight_bit) return launch_kernel(&norm_kernel<T, false, true>, launch, a, s);
  return launch_kernel(&norm_kernel<T, false, false>, launch, a, s);
}

}  // namespace

int step(DType dtype, bool two_state, int kind, bool eight_bit, const StepArgs& args, void* stream) {
  const LaunchPlan plan = plan_step(dtype, two_state, kind, eight_bit, args.num_tensors, args.total_blocks);
  if (!plan.ok) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  for (const KernelLaunch& launch : plan.launches) {
    cudaError_t error = cudaErrorInvalidValue;
    switch (dtype) {
      case DType::kFloat32:
        error = launch_step<float>(two_state, kind, eight_bit, launch, args, s);
        break;
      case DType::kFloat16:
        error = launch_step<__half>(two_state, kind, eight_bit, launch, args, s);
        break;
      case DType::kBFloat16:
        error = launch_step<__nv_bfloat16>(two_state, kind, eight_bit, launch, args, s);
        break;
    }
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

int update_norms(DType dtype, bool adam, bool eight_bit, const StepArgs& args, void* stream) {
  const LaunchPlan plan = plan_norms(dtype, adam, eight_bit, args.num_tensors, args.total_blocks);
  if (!plan.ok) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  for (size_t i = 0; i < plan.launches.size(); ++i) {
    const KernelLaunch& launch = plan.launches[i];
    cudaError_t error = cudaErrorInvalidValue;
    if (i + 1 == plan.launches.size()) {
      error = launch_kernel(&norm_reduce_kernel, launch, args, s);
    } else {
      switch (dtype) {
        case DType::kFloat32:
          error = launch_norm_blocks<float>(adam, eight_bit, launch, args, s);
          break;
        case DType::kFloat16:
          error = launch_norm_blocks<__half>(adam, eight_bit, launch, args, s);
          break;
        case DType::kBFloat16:
          error = launch_norm_blocks<__nv_bfloat16>(adam, eight_bit, launch, args, s);
          break;
      }
    }
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace kestrel
