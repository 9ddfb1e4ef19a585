// launch_kernel(kernel, launch, args, stream): one kernel launch as kestrel/launch_plan.h plans it, written so that
// the same launcher source also runs on the CPU in the tests (tests/cuda_sim: its cuda_runtime.h defines
// KESTREL_SIM_LAUNCH and runs the grid on host threads). Under nvcc it is kernel<<<grid, block, shared,
// stream>>>(args).
#pragma once

#include <cuda_runtime.h>

#include "kestrel/launch_plan.h"

namespace kestrel {
namespace cuda {

template <typename Args>
inline cudaError_t launch_kernel(void (*kernel)(Args), const KernelLaunch& launch, const Args& args,
                                 cudaStream_t stream) {
  const dim3 grid(launch.grid.x, launch.grid.y, launch.grid.z);
  const dim3 block(launch.block.x, launch.block.y, launch.block.z);
#if defined(KESTREL_SIM_LAUNCH)
  ::kestrel_sim::launch(grid, block, launch.shared_bytes, stream, kernel)(args);
#else
  // (a .h is C++ to clang-format, which would split the triple chevrons)
  // clang-format off
  kernel<<<grid, block, launch.shared_bytes, stream>>>(args);
  // clang-format on
#endif
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kestrel
