// CPU kernels for block-wise quantization: OpenMP over blocks, the per-element math from kestrel/quantize.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../quantize_checks.h"
#include "code_table.h"
#include "cpu_utils.h"
#include "kestrel/quantize.h"

namespace kestrel {
namespace {

using cpu::CodeTable;

// max |x| over a block's finite elements with independent lanes (vectorizable), as finite_absmax_combine.
template <typename T>
KESTREL_ALWAYS_INLINE float block_absmax(const T* x, int64_t len) {
  constexpr int kLanes = 16;
  float lane_max[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int k = 0; k < kLanes; ++k)
      lane_max[k] = quant::finite_absmax_combine(lane_max[k], std::fabs(static_cast<float>(x[i + k])));
  }
  float result = 0.0f;
  for (; i < len; ++i) result = quant::finite_absmax_combine(result, std::fabs(static_cast<float>(x[i])));
  for (int k = 0; k < kLanes; ++k) result = quant::finite_absmax_combine(result, lane_max[k]);
  return result;
}

template <typename T>
KESTREL_ALWAYS_INLINE void quantize_blocks(const CodeTable& table, const T* x, uint8_t* codes, float* absmax, int64_t n,
                                           int64_t blocksize, int64_t first_block, int64_t end_block) {
  const float* midpoints = table.midpoints;
  const uint8_t* start = table.bucket_start.data();
  const quant::BucketRange range = table.range;
  for (int64_t b = first_block; b < end_block; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t len = std::min(blocksize, n - begin);
    const T* __restrict__ xb = x + begin;
    uint8_t* __restrict__ ob = codes + begin;
    const float block_max = block_absmax(xb, len);
    absmax[b] = block_max;
    const quant::BlockScale scale = quant::block_scale(block_max);
    if (table.bucket_steps == 1) {  // the dynamic maps: at most one midpoint per bucket
      for (int64_t i = 0; i < len; ++i)
        ob[i] = static_cast<uint8_t>(quant::nearest_code_bucketed<1>(
            midpoints, start, range, quant::normalize(static_cast<float>(xb[i]), scale)));
    } else if (table.bucket_steps >= 0) {
      for (int64_t i = 0; i < len; ++i)
        ob[i] = static_cast<uint8_t>(quant::nearest_code_bucketed<cpu::kMaxBucketSteps>(
            midpoints, start, range, quant::normalize(static_cast<float>(xb[i]), scale)));
    } else {
      for (int64_t i = 0; i < len; ++i)
        ob[i] = static_cast<uint8_t>(
            quant::nearest_code_bsearch(midpoints, quant::normalize(static_cast<float>(xb[i]), scale)));
    }
  }
}

// One entry point per dtype, cloned for AVX-512 / AVX2 / baseline x86-64 and picked at load time.
#define KESTREL_DEFINE_QUANTIZE_BLOCKS(NAME, T)                                                              \
  KESTREL_CPU_CLONES void NAME(const CodeTable& table, const T* x, uint8_t* codes, float* absmax, int64_t n, \
                               int64_t blocksize, int64_t first_block, int64_t end_block) {                  \
    quantize_blocks<T>(table, x, codes, absmax, n, blocksize, first_block, end_block);                       \
  }
KESTREL_DEFINE_QUANTIZE_BLOCKS(quantize_blocks_f32, float)
KESTREL_DEFINE_QUANTIZE_BLOCKS(quantize_blocks_f16, c10::Half)
KESTREL_DEFINE_QUANTIZE_BLOCKS(quantize_blocks_bf16, c10::BFloat16)
#undef KESTREL_DEFINE_QUANTIZE_BLOCKS

inline void quantize_blocks_any(const CodeTable& t, const float* x, uint8_t* c, float* a, int64_t n, int64_t bs,
                                int64_t b0, int64_t b1) {
  quantize_blocks_f32(t, x, c, a, n, bs, b0, b1);
}
inline void quantize_blocks_any(const CodeTable& t, const c10::Half* x, uint8_t* c, float* a, int64_t n, int64_t bs,
                                int64_t b0, int64_t b1) {
  quantize_blocks_f16(t, x, c, a, n, bs, b0, b1);
}
inline void quantize_blocks_any(const CodeTable& t, const c10::BFloat16* x, uint8_t* c, float* a, int64_t n, int64_t bs,
                                int64_t b0, int64_t b1) {
  quantize_blocks_bf16(t, x, c, a, n, bs, b0, b1);
}

template <typename T>
KESTREL_ALWAYS_INLINE void dequantize_blocks(const uint8_t* codes, const float* absmax, const float* code, T* out,
                                             int64_t n, int64_t blocksize, int64_t first_block, int64_t end_block) {
  for (int64_t b = first_block; b < end_block; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t len = std::min(blocksize, n - begin);
    const float scale = absmax[b];
    const uint8_t* __restrict__ cb = codes + begin;
    T* __restrict__ ob = out + begin;
    for (int64_t i = 0; i < len; ++i) ob[i] = static_cast<T>(quant::dequantize_value(code, cb[i], scale));
  }
}

#define KESTREL_DEFINE_DEQUANTIZE_BLOCKS(NAME, T)                                                               \
  KESTREL_CPU_CLONES void NAME(const uint8_t* codes, const float* absmax, const float* code, T* out, int64_t n, \
                               int64_t blocksize, int64_t first_block, int64_t end_block) {                     \
    dequantize_blocks<T>(codes, absmax, code, out, n, blocksize, first_block, end_block);                       \
  }
KESTREL_DEFINE_DEQUANTIZE_BLOCKS(dequantize_blocks_f32, float)
KESTREL_DEFINE_DEQUANTIZE_BLOCKS(dequantize_blocks_f16, c10::Half)
KESTREL_DEFINE_DEQUANTIZE_BLOCKS(dequantize_blocks_bf16, c10::BFloat16)
#undef KESTREL_DEFINE_DEQUANTIZE_BLOCKS

inline void dequantize_blocks_any(const uint8_t* c, const float* a, const float* m, float* o, int64_t n, int64_t bs,
                                  int64_t b0, int64_t b1) {
  dequantize_blocks_f32(c, a, m, o, n, bs, b0, b1);
}
inline void dequantize_blocks_any(const uint8_t* c, const float* a, const float* m, c10::Half* o, int64_t n, int64_t bs,
                                  int64_t b0, int64_t b1) {
  dequantize_blocks_f16(c, a, m, o, n, bs, b0, b1);
}
inline void dequantize_blocks_any(const uint8_t* c, const float* a, const float* m, c10::BFloat16* o, int64_t n,
                                  int64_t bs, int64_t b0, int64_t b1) {
  dequantize_blocks_bf16(c, a, m, o, n, bs, b0, b1);
}

template <typename T>
void dequantize_blockwise_cpu_impl(const uint8_t* codes, const float* absmax, const float* code, T* out, int64_t n,
                                   int64_t blocksize) {
  cpu::parallel_over_blocks(n, num_quant_blocks(n, blocksize), [&](int64_t first, int64_t end) {
    dequantize_blocks_any(codes, absmax, code, out, n, blocksize, first, end);
  });
}

template <typename T>
void quantize_blockwise_cpu_impl(const T* x, const float* code, uint8_t* codes, float* absmax, int64_t n,
                                 int64_t blocksize) {
  const auto table = cpu::code_table_for(code);
  cpu::parallel_over_blocks(n, num_quant_blocks(n, blocksize), [&](int64_t first, int64_t end) {
    quantize_blocks_any(*table, x, codes, absmax, n, blocksize, first, end);
  });
}

void check_code_sorted(const float* code) {
  for (int j = 0; j < quant::kCodeSize; ++j)
    TORCH_CHECK(std::isfinite(code[j]), "quantize_blockwise: code must be finite, got code[", j, "] = ", code[j]);
  for (int j = 0; j + 1 < quant::kCodeSize; ++j)
    TORCH_CHECK(code[j] <= code[j + 1], "quantize_blockwise: code must be sorted ascending, got code[", j,
                "] = ", code[j], " > code[", j + 1, "] = ", code[j + 1]);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x_in, const at::Tensor& code_in,
                                                          int64_t blocksize) {
  check_quantize_args(x_in, code_in, blocksize);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_quant_blocks(n, blocksize)}, x.options().dtype(at::kFloat));
  check_code_sorted(code.data_ptr<float>());
  if (n == 0) return {codes, absmax};
  switch (x.scalar_type()) {
    case at::kFloat:
      quantize_blockwise_cpu_impl(x.data_ptr<float>(), code.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                                  absmax.data_ptr<float>(), n, blocksize);
      break;
    case at::kHalf:
      quantize_blockwise_cpu_impl(x.data_ptr<c10::Half>(), code.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                                  absmax.data_ptr<float>(), n, blocksize);
      break;
    case at::kBFloat16:
      quantize_blockwise_cpu_impl(x.data_ptr<c10::BFloat16>(), code.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                                  absmax.data_ptr<float>(), n, blocksize);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes_in, const at::Tensor& absmax_in, const at::Tensor& code_in,
                                    int64_t blocksize, c10::ScalarType dtype) {
  check_dequantize_args(codes_in, absmax_in, code_in, blocksize, dtype);
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const int64_t n = codes.numel();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  if (n == 0) return out;
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const float* m = code.data_ptr<float>();
  switch (dtype) {
    case at::kFloat:
      dequantize_blockwise_cpu_impl(c, a, m, out.data_ptr<float>(), n, blocksize);
      break;
    case at::kHalf:
      dequantize_blockwise_cpu_impl(c, a, m, out.data_ptr<c10::Half>(), n, blocksize);
      break;
    case at::kBFloat16:
      dequantize_blockwise_cpu_impl(c, a, m, out.data_ptr<c10::BFloat16>(), n, blocksize);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace kestrel
