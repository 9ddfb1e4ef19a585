// Shared helpers of the CPU kernels: OpenMP work split over blocks and per-ISA function clones.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#define KESTREL_ALWAYS_INLINE inline __attribute__((always_inline))
#define KESTREL_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one (GCC ifunc). The results do
// not depend on the clone: kernels are built with -ffp-contract=off, so no clone fuses a multiply-add.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KESTREL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KESTREL_CPU_CLONES
#endif

namespace kestrel {
namespace cpu {

constexpr int64_t kParallelMinElements = 1 << 15;

// fn(first_block, end_block) on contiguous ranges of blocks, one per thread (torch.get_num_threads() threads):
// no cache line is written by two threads.
template <typename Fn>
void parallel_over_blocks(int64_t n, int64_t num_blocks, const Fn& fn) {
#pragma omp parallel num_threads(at::get_num_threads()) if (n >= kParallelMinElements)
  {
    const int64_t threads = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per_thread = (num_blocks + threads - 1) / threads;
    const int64_t first = std::min(num_blocks, tid * per_thread);
    fn(first, std::min(num_blocks, first + per_thread));
  }
}

}  // namespace cpu
}  // namespace kestrel
