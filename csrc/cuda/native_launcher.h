// The Launcher of the native CUDA ops (csrc/cuda/*_ops.cpp): kernels compiled by nvcc into kestrel._C, launched on
// torch's current stream by the raw launchers of kestrel/launch.h. The op bodies are csrc/*_op.h, shared with the
// JIT path (csrc/jit_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "kestrel/launch.h"

namespace kestrel {

struct NativeLauncher {
  static void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static void check(int error) { C10_CUDA_CHECK(static_cast<cudaError_t>(error)); }

  void hold(const at::Tensor&) const {}  // the launches are queued before the op body returns

  bool capturing() const { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

  // The metadata copied to the device on the current stream (the caching host allocator keeps the pinned block
  // alive until the copy has run: no host synchronisation). During a CUDA graph capture it goes through a pinned
  // buffer allocated for this capture and never freed (the graph's copy node reads it at every replay; a capturable
  // step's metadata is the same at every step, since the step count and the lr are read on the device); that buffer
  // is allocated in relaxed capture mode, as PyTorch's allocators do, outside the caching host allocator (whose
  // blocks are reused).
  const optim::TensorMeta* device_meta(const at::Tensor& meta_host, at::Device device, at::Tensor& keep) const {
    if (!capturing()) {
      keep = meta_host.to(device, /*non_blocking=*/true);
      return reinterpret_cast<const optim::TensorMeta*>(keep.data_ptr());
    }
    const size_t bytes = static_cast<size_t>(meta_host.numel());
    void* host = nullptr;
    {
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      C10_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocDefault));
    }
    std::memcpy(host, meta_host.data_ptr(), bytes);
    keep = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
    C10_CUDA_CHECK(cudaMemcpyAsync(keep.data_ptr(), host, bytes, cudaMemcpyHostToDevice,
                                   c10::cuda::getCurrentCUDAStream().stream()));
    return reinterpret_cast<const optim::TensorMeta*>(keep.data_ptr());
  }

  void quantize(DType dtype, const cuda::QuantizeArgs& args) { check(cuda::quantize_blockwise(dtype, args, stream())); }
  void dequantize(DType dtype, const cuda::DequantizeArgs& args) {
    check(cuda::dequantize_blockwise(dtype, args, stream()));
  }
  void step(DType dtype, bool two_state, int kind, bool eight_bit, const cuda::StepArgs& args) {
    check(cuda::step(dtype, two_state, kind, eight_bit, args, stream()));
  }
  void norms(DType dtype, bool adam, bool eight_bit, const cuda::StepArgs& args) {
    check(cuda::update_norms(dtype, adam, eight_bit, args, stream()));
  }
  void verify_greedy(const cuda::VerifyGreedyArgs& args) { check(cuda::verify_tree_greedy(args, stream())); }
  void verify_sample(const cuda::VerifySampleArgs& args) { check(cuda::verify_tree_sample(args, stream())); }
  void compact(int element_size, const cuda::CompactArgs& args) {
    check(cuda::compact_kv_cache(element_size, args, stream()));
  }
};

}  // namespace kestrel
