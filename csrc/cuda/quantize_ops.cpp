// The native CUDA registrations of quantize_blockwise / dequantize_blockwise: the op bodies of csrc/quantize_op.h
// with the NativeLauncher (the kernels in quantize.cu). Compiled by the host compiler.
#include <torch/library.h>

#include "../quantize_op.h"
#include "native_launcher.h"

namespace kestrel {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, const at::Tensor& code,
                                                           int64_t blocksize) {
  NativeLauncher launcher;
  return quantize_blockwise_op(launcher, x, code, blocksize);
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, c10::ScalarType dtype) {
  NativeLauncher launcher;
  return dequantize_blockwise_op(launcher, codes, absmax, code, blocksize, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CUDA, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
}

}  // namespace kestrel
