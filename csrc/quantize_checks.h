// Argument checks for the block-wise quantization ops, shared by the CPU and CUDA launchers (torch-facing).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace kestrel {

// Any positive blocksize (bitsandbytes' CPU backend takes any; its CUDA backend the powers of two in [64, 4096]).
inline bool is_valid_blocksize(int64_t blocksize) {
  return blocksize > 0;
}

// ceil(n / blocksize) without overflow for any positive blocksize.
inline int64_t num_quant_blocks(int64_t n, int64_t blocksize) {
  return n == 0 ? 0 : (n - 1) / blocksize + 1;
}

inline void check_float_input(const char* op, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK(is_valid_blocksize(blocksize), op, ": blocksize must be a positive integer, got ", blocksize);
}

inline void check_code(const char* op, const at::Tensor& code, const at::Tensor& like) {
  TORCH_CHECK(code.scalar_type() == at::kFloat, op, ": code must be float32, got ", code.scalar_type());
  TORCH_CHECK(code.dim() == 1 && code.numel() == 256, op, ": code must have shape (256,), got ", code.sizes());
  TORCH_CHECK(code.device() == like.device(), op, ": code must be on ", like.device(), ", got ", code.device());
}

inline void check_quantize_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise";
  check_float_input(op, "x", x.scalar_type());
  check_blocksize(op, blocksize);
  check_code(op, code, x);
}

inline void check_dequantize_args(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code,
                                  int64_t blocksize, c10::ScalarType dtype) {
  constexpr const char* op = "dequantize_blockwise";
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ", absmax.scalar_type());
  check_blocksize(op, blocksize);
  const int64_t expected = num_quant_blocks(codes.numel(), blocksize);
  TORCH_CHECK(absmax.numel() == expected, op, ": absmax must hold ceil(", codes.numel(), " / ", blocksize,
              ") = ", expected, " values, got ", absmax.numel());
  TORCH_CHECK(absmax.device() == codes.device(), op, ": absmax must be on ", codes.device(), ", got ", absmax.device());
  check_code(op, code, codes);
  check_float_input(op, "dtype", dtype);
}

}  // namespace kestrel
