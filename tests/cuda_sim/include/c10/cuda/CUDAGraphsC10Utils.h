// kestrel_sim stand-in for c10/cuda/CUDAGraphsC10Utils.h: nothing is ever being captured.
#pragma once
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {
enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() {
  return CaptureStatus::None;
}
struct CUDAStreamCaptureModeGuard {
  explicit CUDAStreamCaptureModeGuard(int) {}
};
}  // namespace cuda
}  // namespace c10
