// CUDA launchers for block-wise quantization: checks, device guard, current stream, dtype mapping, registration.
// Compiled by the host compiler; the device code lives in quantize.cu behind kestrel/launch.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../quantize_checks.h"
#include "kestrel/launch.h"
#include "torch_dtype.h"

namespace kestrel {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x_in, const at::Tensor& code_in,
                                                           int64_t blocksize) {
  check_quantize_args(x_in, code_in, blocksize);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_quant_blocks(n, blocksize)}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  C10_CUDA_CHECK(static_cast<cudaError_t>(cuda::quantize_blockwise(
      to_kestrel_dtype(x.scalar_type()), x.data_ptr(), code.data_ptr<float>(), codes.data_ptr<uint8_t>(),
      absmax.data_ptr<float>(), n, blocksize, c10::cuda::getCurrentCUDAStream().stream())));
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes_in, const at::Tensor& absmax_in, const at::Tensor& code_in,
                                     int64_t blocksize, c10::ScalarType dtype) {
  check_dequantize_args(codes_in, absmax_in, code_in, blocksize, dtype);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  if (codes.numel() == 0) return out;
  C10_CUDA_CHECK(static_cast<cudaError_t>(cuda::dequantize_blockwise(
      to_kestrel_dtype(dtype), codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(),
      out.data_ptr(), codes.numel(), blocksize, c10::cuda::getCurrentCUDAStream().stream())));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CUDA, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
}

}  // namespace kestrel
