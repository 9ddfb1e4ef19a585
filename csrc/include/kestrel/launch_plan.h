// The launch plans of every CUDA kernel: which template instance a call runs, its grid, its block and its shared
// memory. Host-only and framework-free (no CUDA, no torch): the one source of the launch parameters, used by the
// native launchers (csrc/cuda/*.cu, which run the instance with <<<grid, block>>>) and by the JIT path
// (csrc/jit_ops.cpp -> python/kestrel/_jit.py, which compiles the instance named here with NVRTC and launches it
// with cuLaunchKernel). tests/test_jit.py holds the two to each other: the CUDA-on-CPU build of the native
// launchers (tests/cuda_sim) records each launch's kernel symbol and dimensions, which must equal the plan's.
//
// A kernel is named by its C++ name expression (NVRTC's addNameExpression), e.g.
// "kestrel::cuda::quantize_blockwise_kernel<float, 64>"; kernel_names(family) lists every instance of a family,
// the set one NVRTC program compiles.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "kestrel/kernel_args.h"

namespace kestrel {
namespace cuda {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

// One kernel launch: the instance's name expression, its family (kestrel/<family>.cuh holds it) and its shape.
struct KernelLaunch {
  std::string family;
  std::string kernel;
  Dim3 grid, block;
  uint32_t shared_bytes = 0;
};

// The launches of one call, in order; ok == false: the sizes cannot be launched (the native launchers return
// cudaErrorInvalidValue). An empty list is a call with nothing to do.
struct LaunchPlan {
  bool ok = true;
  std::vector<KernelLaunch> launches;
};

inline const char* kernel_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float";
    case DType::kFloat16:
      return "__half";
    case DType::kBFloat16:
      return "__nv_bfloat16";
  }
  return "?";
}

inline bool is_power_of_two_block(int64_t blocksize) {
  return blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

inline KernelLaunch make_launch(const char* family, std::string kernel, uint32_t grid_x, uint32_t block_x,
                                uint32_t grid_y = 1) {
  KernelLaunch l;
  l.family = family;
  l.kernel = "kestrel::cuda::" + kernel;
  l.grid.x = grid_x;
  l.grid.y = grid_y;
  l.block.x = block_x;
  return l;
}

inline std::string targs(const std::vector<std::string>& args) {
  std::string out = "<";
  for (size_t i = 0; i < args.size(); ++i) out += (i ? ", " : "") + args[i];
  return out + ">";
}

inline std::string bool_name(bool b) {
  return b ? "true" : "false";
}

// quantize_blockwise: the register-resident kernel for the powers of two in [64, 4096]; any other blocksize, a
// warp per block up to 2048 elements and the whole CTA beyond (grid-stride, at most kMaxGridStrideCtas CTAs).
inline LaunchPlan plan_quantize(DType dtype, int64_t n, int64_t blocksize) {
  LaunchPlan plan;
  if (blocksize <= 0) return plan.ok = false, plan;
  const int64_t num_blocks = n <= 0 ? 0 : (n - 1) / blocksize + 1;
  const std::string t = kernel_dtype_name(dtype);
  if (is_power_of_two_block(blocksize)) {
    const int64_t per_cta = quantize_blocks_per_cta(blocksize);
    const int64_t ctas = (num_blocks + per_cta - 1) / per_cta;
    if (ctas > 0x7fffffffLL) return plan.ok = false, plan;
    if (ctas > 0)
      plan.launches.push_back(make_launch("quantize",
                                          "quantize_blockwise_kernel" + targs({t, std::to_string(blocksize)}),
                                          static_cast<uint32_t>(ctas), kQuantizeThreads));
    return plan;
  }
  const int group = blocksize <= 2048 ? 32 : kQuantizeThreads;
  const int64_t groups_per_cta = kQuantizeThreads / group;
  int64_t ctas = (num_blocks + groups_per_cta - 1) / groups_per_cta;
  if (ctas > kMaxGridStrideCtas) ctas = kMaxGridStrideCtas;
  if (ctas > 0)
    plan.launches.push_back(make_launch("quantize", "quantize_blockwise_any_kernel" + targs({t, std::to_string(group)}),
                                        static_cast<uint32_t>(ctas), kQuantizeThreads));
  return plan;
}

// log2(blocksize) for a power of two, else -1 (the dequantize kernel then divides).
inline int dequantize_log2_blocksize(int64_t blocksize) {
  if (blocksize <= 0 || (blocksize & (blocksize - 1)) != 0) return -1;
  int log2 = 0;
  while ((int64_t{1} << log2) < blocksize) ++log2;
  return log2;
}

inline LaunchPlan plan_dequantize(DType dtype, int64_t n, int64_t blocksize) {
  LaunchPlan plan;
  if (n == 0) return plan;
  if (blocksize <= 0) return plan.ok = false, plan;
  const int64_t per_cta = static_cast<int64_t>(kDequantizeThreads) * kDequantizeItems;
  int64_t ctas = (n + per_cta - 1) / per_cta;
  if (ctas > kMaxGridStrideCtas) ctas = kMaxGridStrideCtas;  // grid-stride beyond this
  plan.launches.push_back(make_launch("quantize",
                                      std::string("dequantize_blockwise_kernel<") + kernel_dtype_name(dtype) + ">",
                                      static_cast<uint32_t>(ctas), kDequantizeThreads));
  return plan;
}

// The fused optimizer steps: one warp per 256-element block of every parameter of the call.
inline LaunchPlan plan_step(DType dtype, bool two_state, int kind, bool eight_bit, int num_tensors,
                            int64_t total_blocks) {
  LaunchPlan plan;
  if (total_blocks == 0 || num_tensors == 0) return plan;
  const int64_t ctas = (total_blocks + kStepWarps - 1) / kStepWarps;
  if (ctas > 0x7fffffffLL) return plan.ok = false, plan;
  const std::string kind_name =
      std::string(two_state ? "(kestrel::optim::TwoState)" : "(kestrel::optim::OneState)") + std::to_string(kind);
  plan.launches.push_back(make_launch("optim",
                                      std::string(two_state ? "two_state_kernel" : "one_state_kernel") +
                                          targs({kernel_dtype_name(dtype), kind_name, bool_name(eight_bit)}),
                                      static_cast<uint32_t>(ctas), kStepThreads));
  return plan;
}

// The LAMB / LARS norm pass: the per-block sums (when there are blocks), then one CTA per parameter reducing them.
inline LaunchPlan plan_norms(DType dtype, bool adam, bool eight_bit, int num_tensors, int64_t total_blocks) {
  LaunchPlan plan;
  if (num_tensors == 0) return plan;
  const int64_t ctas = (total_blocks + kStepWarps - 1) / kStepWarps;
  if (ctas > 0x7fffffffLL) return plan.ok = false, plan;
  if (ctas > 0)
    plan.launches.push_back(
        make_launch("optim", "norm_kernel" + targs({kernel_dtype_name(dtype), bool_name(adam), bool_name(eight_bit)}),
                    static_cast<uint32_t>(ctas), kStepThreads));
  plan.launches.push_back(
      make_launch("optim", "norm_reduce_kernel", static_cast<uint32_t>(num_tensors), optim::kNormThreads));
  return plan;
}

// Greedy verification: one thread per row.
inline LaunchPlan plan_verify_greedy(int64_t batch) {
  LaunchPlan plan;
  if (batch == 0) return plan;
  const int64_t blocks = (batch + kGreedyThreads - 1) / kGreedyThreads;
  if (blocks > 0x7fffffffLL) return plan.ok = false, plan;
  plan.launches.push_back(
      make_launch("tree_verify", "verify_greedy_kernel", static_cast<uint32_t>(blocks), kGreedyThreads));
  return plan;
}

// Sampling verification: one block of tree::kSegments threads per row.
inline LaunchPlan plan_verify_sample(int64_t batch) {
  LaunchPlan plan;
  if (batch == 0) return plan;
  if (batch > 0x7fffffffLL) return plan.ok = false, plan;
  plan.launches.push_back(
      make_launch("tree_verify", "verify_sample_kernel", static_cast<uint32_t>(batch), tree::kSegments));
  return plan;
}

// KV-cache compaction: one block per (layer, sequence, head) and cache (grid.y: k, v); then one thread per sequence
// advancing cache_seqlens. element_size picks the instance (the rows are moved as raw 1/2/4/8-byte words).
inline LaunchPlan plan_compact(int element_size, int64_t layers, int64_t batch, int64_t heads) {
  LaunchPlan plan;
  const char* elem = element_size == 1   ? "unsigned char"
                     : element_size == 2 ? "unsigned short"
                     : element_size == 4 ? "unsigned int"
                     : element_size == 8 ? "unsigned long"
                                         : nullptr;
  if (elem == nullptr) return plan.ok = false, plan;
  const int64_t blocks = layers * batch * heads;
  if (blocks > 0x7fffffffLL) return plan.ok = false, plan;
  if (blocks > 0)
    plan.launches.push_back(make_launch("tree_verify", std::string("compact_kernel<") + elem + ">",
                                        static_cast<uint32_t>(blocks), kCompactThreads, 2));
  if (batch == 0) return plan;  // an empty grid is an invalid launch
  plan.launches.push_back(make_launch("tree_verify", "advance_seqlens_kernel",
                                      static_cast<uint32_t>((batch + kSeqlensThreads - 1) / kSeqlensThreads),
                                      kSeqlensThreads));
  return plan;
}

// Every template instance of a family ("quantize", "optim", "tree_verify"), by name expression: the set the JIT
// path compiles into one module per family. Built from the plans above, so it holds exactly what they can ask for.
inline std::vector<std::string> kernel_names(const std::string& family) {
  std::vector<std::string> names;
  auto add = [&](const LaunchPlan& plan) {
    for (const KernelLaunch& l : plan.launches)
      if (l.family == family) {
        bool seen = false;
        for (const std::string& name : names) seen = seen || name == l.kernel;
        if (!seen) names.push_back(l.kernel);
      }
  };
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (DType d : dtypes) {
    for (int64_t b = 64; b <= 4096; b *= 2) add(plan_quantize(d, 1, b));
    add(plan_quantize(d, 1, 100));   // a warp per block
    add(plan_quantize(d, 1, 3000));  // the whole CTA per block
    add(plan_dequantize(d, 1, 256));
    for (int eight = 0; eight < 2; ++eight) {
      for (int kind = 0; kind < 2; ++kind) add(plan_step(d, true, kind, eight, 1, 1));
      if (eight) add(plan_step(d, true, 2, true, 1, 1));  // Adam with 4-bit states
      for (int kind = 0; kind < 5; ++kind) add(plan_step(d, false, kind, eight, 1, 1));
      for (int adam = 0; adam < 2; ++adam) add(plan_norms(d, adam, eight, 1, 1));
    }
  }
  add(plan_verify_greedy(1));
  add(plan_verify_sample(1));
  for (int size : {1, 2, 4, 8}) add(plan_compact(size, 1, 1, 1));
  return names;
}

}  // namespace cuda
}  // namespace kestrel
