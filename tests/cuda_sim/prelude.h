// Included first (-include) when tests/test_cuda_sim.py builds csrc's CUDA launchers and kernels for the CPU: the
// launchers' registrations go to the `kestrel_sim` namespace and the CPU key, so torch.ops.kestrel_sim.<op> runs the
// CUDA code path of torch.ops.kestrel.<op> (the same schemas, csrc/ops.cpp) on CPU tensors, next to the CPU kernels.
#pragma once
#include <torch/library.h>

#undef TORCH_LIBRARY
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY(ns, m)                                                                            \
  static void kestrel_sim_library_init(torch::Library&);                                                \
  static const torch::detail::TorchLibraryInit kestrel_sim_library_static_init(                         \
      torch::Library::DEF, &kestrel_sim_library_init, "kestrel_sim", std::nullopt, __FILE__, __LINE__); \
  void kestrel_sim_library_init(torch::Library& m)
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(kestrel_sim, CPU, m, C10_UID)
