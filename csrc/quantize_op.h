// The device (CUDA) implementations of quantize_blockwise / dequantize_blockwise, written once for the native
// launchers (csrc/cuda/quantize_ops.cpp) and the JIT path (csrc/jit_ops.cpp): checks, outputs, the kernels' argument
// structs; the Launcher runs what kestrel/launch_plan.h plans (see optim_op.h for the Launcher).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <tuple>

#include "kestrel/kernel_args.h"
#include "kestrel/launch_plan.h"
#include "quantize_checks.h"
#include "torch_dtype.h"

namespace kestrel {

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_op(Launcher& launcher, const at::Tensor& x_in,
                                                         const at::Tensor& code_in, int64_t blocksize) {
  check_quantize_args(x_in, code_in, blocksize);
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_quant_blocks(n, blocksize)}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  cuda::QuantizeArgs args{
      x.data_ptr(), code.data_ptr<float>(),        codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), n,
      blocksize,    num_quant_blocks(n, blocksize)};
  launcher.hold(x);
  launcher.hold(code);
  launcher.quantize(to_kestrel_dtype(x.scalar_type()), args);
  return {codes, absmax};
}

template <typename Launcher>
at::Tensor dequantize_blockwise_op(Launcher& launcher, const at::Tensor& codes_in, const at::Tensor& absmax_in,
                                   const at::Tensor& code_in, int64_t blocksize, c10::ScalarType dtype) {
  check_dequantize_args(codes_in, absmax_in, code_in, blocksize, dtype);
  const c10::DeviceGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  if (codes.numel() == 0) return out;
  cuda::DequantizeArgs args{codes.data_ptr<uint8_t>(),
                            absmax.data_ptr<float>(),
                            code.data_ptr<float>(),
                            out.data_ptr(),
                            codes.numel(),
                            blocksize,
                            cuda::dequantize_log2_blocksize(blocksize)};
  for (const at::Tensor& t : {codes, absmax, code}) launcher.hold(t);
  launcher.dequantize(to_kestrel_dtype(dtype), args);
  return out;
}

}  // namespace kestrel
