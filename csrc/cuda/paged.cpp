// Paged optimizer state: tensors in CUDA managed (unified) memory, which the driver may evict to host memory under
// device-memory pressure, prefetched to their GPU before each step. Host-compiled (no device code).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace kestrel {
namespace {

// A zero-filled tensor of `size` and `dtype` in managed memory, attached to the device of `like` (a CUDA tensor).
// It never asks for more managed memory than the card has free: past that, it raises instead of oversubscribing.
at::Tensor managed_zeros(const at::Tensor& like, c10::IntArrayRef size, c10::ScalarType dtype) {
  constexpr const char* op = "managed_zeros";
  TORCH_CHECK(like.is_cuda(), op, ": `like` must be a CUDA tensor (managed memory belongs to a GPU), got ",
              like.device());
  for (const int64_t s : size) TORCH_CHECK(s >= 0, op, ": size must be non-negative, got ", size);
  const c10::cuda::CUDAGuard guard(like.device());
  int64_t numel = 1;
  for (const int64_t s : size) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  const auto options = at::TensorOptions().dtype(dtype).device(like.device());
  if (bytes == 0) return at::empty(size, options);
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  TORCH_CHECK(bytes <= free_bytes, op, ": paged state of ", bytes, " bytes on ", like.device(),
              " exceeds the device's free memory (", free_bytes, " of ", total_bytes,
              " bytes); kestrel does not oversubscribe managed memory");
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t error = cudaMemsetAsync(ptr, 0, bytes, stream);
  if (error != cudaSuccess) {
    cudaFree(ptr);
    C10_CUDA_CHECK(error);
  }
  // cudaFree synchronises the device, so no kernel still uses the memory when it goes
  return at::from_blob(ptr, size, [](void* p) { cudaFree(p); }, options);
}

// Prefetch managed tensors to their device on the current stream (asynchronous; a no-op for ordinary device memory,
// which the driver reports as such).
void prefetch(at::TensorList tensors) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.is_cuda(), "prefetch: tensor ", i, " must be a CUDA tensor, got ", t.device());
    if (t.numel() == 0) continue;
    cudaPointerAttributes attributes{};
    C10_CUDA_CHECK(cudaPointerGetAttributes(&attributes, t.data_ptr()));
    if (attributes.type != cudaMemoryTypeManaged) continue;
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
#if CUDART_VERSION >= 13000
    cudaMemLocation location{};
    location.type = cudaMemLocationTypeDevice;
    location.id = t.get_device();
    C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), bytes, location, 0, stream));
#else
    C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), bytes, t.get_device(), stream));
#endif
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CUDA, m) {
  m.impl("managed_zeros", &managed_zeros);
  m.impl("prefetch", &prefetch);
}

}  // namespace kestrel
