// Raw-pointer launchers of draft-tree verification and KV-cache compaction (the kernels: kestrel/tree_verify.cuh).
// Never includes torch.
#include "kestrel/cuda_launch.h"
#include "kestrel/launch.h"
#include "kestrel/tree_verify.cuh"

namespace kestrel {
namespace cuda {
namespace {

template <typename Elem>
cudaError_t launch_compact(const LaunchPlan& plan, const CompactArgs& a, cudaStream_t s) {
  for (size_t i = 0; i < plan.launches.size(); ++i) {  // plan_compact: the rows' launch (if any), then the lengths'
    const KernelLaunch& launch = plan.launches[i];
    const cudaError_t error = i + 1 < plan.launches.size() ? launch_kernel(&compact_kernel<Elem>, launch, a, s)
                                                           : launch_kernel(&advance_seqlens_kernel, launch, a, s);
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace

int verify_tree_greedy(const VerifyGreedyArgs& args, void* stream) {
  const LaunchPlan plan = plan_verify_greedy(args.batch);
  if (!plan.ok) return cudaErrorInvalidValue;
  for (const KernelLaunch& launch : plan.launches) {
    const cudaError_t error = launch_kernel(&verify_greedy_kernel, launch, args, static_cast<cudaStream_t>(stream));
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

int verify_tree_sample(const VerifySampleArgs& args, void* stream) {
  const LaunchPlan plan = plan_verify_sample(args.batch);
  if (!plan.ok) return cudaErrorInvalidValue;
  for (const KernelLaunch& launch : plan.launches) {
    const cudaError_t error = launch_kernel(&verify_sample_kernel, launch, args, static_cast<cudaStream_t>(stream));
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

int compact_kv_cache(int element_size, const CompactArgs& args, void* stream) {
  const LaunchPlan plan = plan_compact(element_size, args.layers, args.batch, args.heads);
  if (!plan.ok) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (element_size) {
    case 1:
      return launch_compact<uint8_t>(plan, args, s);
    case 2:
      return launch_compact<uint16_t>(plan, args, s);
    case 4:
      return launch_compact<uint32_t>(plan, args, s);
    case 8:
      return launch_compact<uint64_t>(plan, args, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kestrel
