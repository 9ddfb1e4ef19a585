// kestrel_sim: run kestrel's CUDA kernels, unchanged, on the CPU (tests only).
//
// The device code (csrc/include/kestrel/*.cuh, csrc/cuda/*.cu) is compiled as host C++ with this directory first on
// the include path: cuda_runtime.h, cuda_fp16.h and cuda_bf16.h here all include this file. It defines what the
// kernels use, with the semantics they rely on:
// - threadIdx / blockIdx / blockDim / gridDim (thread-local), warpSize;
// - __shared__ as a static (one copy per kernel instantiation, shared by the block's threads: blocks run one after
//   another, so each block sees its own shared memory);
// - __syncthreads() as a barrier of the block's threads; __syncwarp and the warp shuffles (__shfl_xor_sync,
//   __shfl_sync, __shfl_down_sync, __shfl_up_sync) and votes (__ballot_sync, __any_sync, __all_sync) exchange
//   values among the 32 lanes of a warp (threads 32w .. 32w + 31 of the block) with CUDA's lane rules, width
//   included; a thread that has returned from the kernel no longer counts at a barrier (as on sm_70+);
// - __half / __nv_bfloat16 with CUDA's conversions (round to nearest even, NaN -> the canonical 0x7fff), __ldg,
//   the bit casts, cudaError_t / cudaGetLastError / cudaStream_t;
// - the launch: launch_kernel(&kernel, launch, args, stream) (kestrel/cuda_launch.h) runs the grid block by block,
//   one host thread per CUDA thread of a block, after the checks the hardware makes (block size 1..1024, grid
//   dimensions >= 1): a bad configuration sets cudaErrorInvalidConfiguration, as a real launch does.
// A barrier that not every live thread of the block (or warp) reaches, as with a __syncthreads in divergent code,
// is reported (after KESTREL_SIM_DEADLOCK_SECONDS, default 20) with the block and the counts, and aborts.
// Built with -fsanitize=address the kernels' global and shared-memory accesses are bounds-checked; with
// -fsanitize=thread a shared-memory write and another thread's read without a __syncthreads between them is a
// reported race (the CPU analogues of compute-sanitizer's memcheck and racecheck).
#pragma once

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)
#define __restrict__ __restrict

// ------------------------------------------------------------------------------------------------- runtime types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace kestrel_sim {

inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

inline double deadlock_seconds() {
  const char* env = getenv("KESTREL_SIM_DEADLOCK_SECONDS");
  return env ? atof(env) : 20.0;
}

[[noreturn]] inline void fail(const char* what) {
  fprintf(stderr, "kestrel_sim: %s\n", what);
  fflush(stderr);
  abort();
}

// A barrier of a changing set of threads: `leave` removes a thread that has returned from the kernel.
class Barrier {
 public:
  void reset(int expected) {
    std::lock_guard<std::mutex> lock(mutex_);
    expected_ = expected;
    arrived_ = 0;
  }
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    const auto limit = std::chrono::duration<double>(deadlock_seconds());
    if (!cv_.wait_for(lock, limit, [&] { return generation_ != generation; })) {
      char message[256];
      snprintf(message, sizeof(message),
               "%s: %d of %d live threads arrived (block %u,%u,%u); a barrier in divergent code, or a thread "
               "waiting on one that returned",
               what, arrived_, expected_, blockIdx.x, blockIdx.y, blockIdx.z);
      fail(message);
    }
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t generation_ = 0;
};

// One warp's exchange area: each lane deposits its value, all wait, each reads its source, all wait again.
struct Warp {
  Barrier barrier;
  int lanes = 32;  // threads of the block in this warp (the last warp may be partial)
  uint64_t slots[32] = {};
  std::atomic<bool> live[32] = {};  // a lane clears its flag when it returns, while others may be reading them
};

struct Block {
  Barrier barrier;
  std::unique_ptr<Warp[]> warps;
  int num_warps = 0;
};

inline thread_local Block* current_block = nullptr;
inline thread_local int current_thread = 0;  // linear thread index within the block

inline Warp& this_warp() {
  return current_block->warps[current_thread / 32];
}
inline int lane_id() {
  return current_thread % 32;
}

inline unsigned live_mask(const Warp& w) {
  unsigned mask = 0;
  for (int l = 0; l < w.lanes; ++l)
    if (w.live[l]) mask |= 1u << l;
  return mask;
}

inline void check_mask(unsigned mask, const char* op) {
  const unsigned live = live_mask(this_warp());
  if ((mask & live) != live) {
    char message[160];
    snprintf(message, sizeof(message), "%s with mask 0x%08x leaves out live lanes (0x%08x): not supported", op, mask,
             live);
    fail(message);
  }
}

template <typename T>
inline uint64_t to_slot(T v) {
  static_assert(sizeof(T) <= 8, "a shuffled value is at most 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
inline T from_slot(uint64_t bits) {
  T v;
  memcpy(&v, &bits, sizeof(T));
  return v;
}

// Every live lane of the warp deposits v and receives the value of lane source(lane).
template <typename T, typename Source>
inline T exchange(unsigned mask, T v, const char* op, Source source) {
  check_mask(mask, op);
  Warp& w = this_warp();
  const int lane = lane_id();
  w.slots[lane] = to_slot(v);
  w.barrier.arrive_and_wait(op);
  int from = source(lane);
  if (from < 0 || from >= w.lanes || !w.live[from]) from = lane;  // no such lane: the caller's own value
  const T result = from_slot<T>(w.slots[from]);
  w.barrier.arrive_and_wait(op);
  return result;
}

inline unsigned vote(unsigned mask, bool p, const char* op) {
  check_mask(mask, op);
  Warp& w = this_warp();
  const int lane = lane_id();
  w.slots[lane] = p ? 1 : 0;
  w.barrier.arrive_and_wait(op);
  unsigned ballot = 0;
  for (int l = 0; l < w.lanes; ++l)
    if (w.live[l] && w.slots[l]) ballot |= 1u << l;
  w.barrier.arrive_and_wait(op);
  return ballot & mask;
}

// ------------------------------------------------------------------------------------------------- launching
inline bool valid_config(dim3 grid, dim3 block) {
  const uint64_t threads = (uint64_t)block.x * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.y >= 1 && grid.z >= 1 &&
         grid.x <= 0x7fffffffu && grid.y <= 65535 && grid.z <= 65535;
}

// Run `body` for every thread of every block of the grid: blockDim threads, each going over the blocks in order.
template <typename Body>
inline void run_grid(dim3 grid, dim3 block, const Body& body) {
  if (!valid_config(grid, block)) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const int threads = (int)(block.x * block.y * block.z);
  Block state;
  state.num_warps = (threads + 31) / 32;
  state.warps.reset(new Warp[state.num_warps]);
  for (int w = 0; w < state.num_warps; ++w) state.warps[w].lanes = std::min(32, threads - 32 * w);
  Barrier between_blocks;  // all threads done with a block before any starts the next (shared memory is reused)
  between_blocks.reset(threads);
  const uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
  auto thread_main = [&](int t) {
    current_block = &state;
    current_thread = t;
    threadIdx =
        uint3{(unsigned)(t % block.x), (unsigned)((t / block.x) % block.y), (unsigned)(t / (block.x * block.y))};
    blockDim = block;
    gridDim = grid;
    for (uint64_t b = 0; b < blocks; ++b) {
      blockIdx =
          uint3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((uint64_t)grid.x * grid.y))};
      if (t == 0) {  // arm the barriers for this block (everyone waits below until thread 0 has)
        state.barrier.reset(threads);
        for (int w = 0; w < state.num_warps; ++w) {
          Warp& warp = state.warps[w];
          warp.barrier.reset(warp.lanes);
          for (int l = 0; l < warp.lanes; ++l) warp.live[l] = true;
        }
      }
      between_blocks.arrive_and_wait("the start of a block");
      body();
      {  // this thread has returned: the barriers stop waiting for it
        Warp& w = state.warps[t / 32];
        w.live[t % 32] = false;
        w.barrier.leave();
        state.barrier.leave();
      }
      between_blocks.arrive_and_wait("the end of a block");
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) pool.emplace_back(thread_main, t);
  for (auto& th : pool) th.join();
}

template <typename... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "a kernel launch with the wrong number of arguments");
    const std::tuple<P...> values(static_cast<P>(std::forward<A>(args))...);  // by value, as a launch copies them
    const auto kernel_fn = kernel;
    run_grid(grid, block, [&] { std::apply([&](auto... v) { kernel_fn(v...); }, values); });
  }
};

// The launch log (tests/cuda_sim/launch_log.cpp reads it out): each launch's kernel symbol (mangled, as NVRTC's
// lowered names are), grid, block and dynamic shared memory, while logging is on.
struct LaunchRecord {
  std::string symbol;
  dim3 grid, block;
  size_t shared_bytes;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}
inline bool& launch_logging() {
  static bool on = false;
  return on;
}

template <typename... P>
inline Launch<P...> launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, void (*kernel)(P...)) {
  if (launch_logging()) {
    Dl_info info{};
    const bool named = dladdr(reinterpret_cast<void*>(kernel), &info) != 0 && info.dli_sname != nullptr;
    launch_log().push_back(LaunchRecord{named ? info.dli_sname : "?", grid, block, shared_bytes});
  }
  if (shared_bytes != 0) fail("dynamic shared memory is not supported (kestrel's kernels use none)");
  return Launch<P...>{grid, block, kernel};
}

}  // namespace kestrel_sim

// kestrel/cuda_launch.h's launch_kernel: kernel<<<grid, block, shared_bytes, stream>>>(args) under nvcc, this run
// here (its defining KESTREL_SIM_LAUNCH is what selects it).
#define KESTREL_SIM_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::kestrel_sim::launch(dim3(grid), dim3(block), shared_bytes, (cudaStream_t)(stream), &__VA_ARGS__)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = kestrel_sim::last_error();
  kestrel_sim::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() {
  return kestrel_sim::last_error();
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "unknown error";
  }
}

// Memory: device memory is host memory here (the launchers' metadata copies and the paged path's calls).
#define CUDART_VERSION 13000
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaStreamCaptureMode : int {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2,
};
constexpr unsigned cudaHostAllocDefault = 0;
inline cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned) {
  *ptr = malloc(bytes ? bytes : 1);
  return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeHost(void* ptr) {
  free(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* ptr) {
  free(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t = nullptr) {
  memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  memset(ptr, value, bytes);
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------- intrinsics
inline void __syncthreads() {
  kestrel_sim::current_block->barrier.arrive_and_wait("__syncthreads");
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  kestrel_sim::check_mask(mask, "__syncwarp");
  kestrel_sim::this_warp().barrier.arrive_and_wait("__syncwarp");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return kestrel_sim::exchange(mask, v, "__shfl_xor_sync", [&](int lane) {
    const int from = lane ^ lane_mask;
    return (from / width == lane / width) ? from : lane;  // outside the caller's width segment: its own value
  });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  return kestrel_sim::exchange(mask, v, "__shfl_sync",
                               [&](int lane) { return (lane / width) * width + (src_lane % width); });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return kestrel_sim::exchange(mask, v, "__shfl_down_sync", [&](int lane) {
    const int from = lane + (int)delta;
    return (from / width == lane / width) ? from : lane;
  });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return kestrel_sim::exchange(mask, v, "__shfl_up_sync", [&](int lane) {
    const int from = lane - (int)delta;
    return (from >= 0 && from / width == lane / width) ? from : lane;
  });
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return kestrel_sim::vote(mask, p != 0, "__ballot_sync");
}
inline int __any_sync(unsigned mask, int p) {
  return __ballot_sync(mask, p) != 0;
}
inline int __all_sync(unsigned mask, int p) {
  return __ballot_sync(mask, p) == (mask & kestrel_sim::live_mask(kestrel_sim::this_warp()));
}
inline unsigned __activemask() {
  return kestrel_sim::live_mask(kestrel_sim::this_warp());
}

// CUDA's integer and floating-point min / max overloads (device functions in the global namespace)
#define KESTREL_SIM_MINMAX(T) \
  inline T min(T a, T b) {    \
    return b < a ? b : a;     \
  }                           \
  inline T max(T a, T b) {    \
    return a < b ? b : a;     \
  }
KESTREL_SIM_MINMAX(int)
KESTREL_SIM_MINMAX(unsigned)
KESTREL_SIM_MINMAX(long)
KESTREL_SIM_MINMAX(unsigned long)
KESTREL_SIM_MINMAX(long long)
KESTREL_SIM_MINMAX(unsigned long long)
#undef KESTREL_SIM_MINMAX
inline float min(float a, float b) {
  return fminf(a, b);
}
inline float max(float a, float b) {
  return fmaxf(a, b);
}
inline double min(double a, double b) {
  return fmin(a, b);
}
inline double max(double a, double b) {
  return fmax(a, b);
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace kestrel_sim {
template <typename To, typename From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast between types of one size");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}
}  // namespace kestrel_sim
inline float __int_as_float(int i) {
  return kestrel_sim::bit_cast<float>(i);
}
inline int __float_as_int(float f) {
  return kestrel_sim::bit_cast<int>(f);
}
inline float __uint_as_float(unsigned u) {
  return kestrel_sim::bit_cast<float>(u);
}
inline unsigned __float_as_uint(float f) {
  return kestrel_sim::bit_cast<unsigned>(f);
}

// ------------------------------------------------------------------------------------------------- half types
// Storage and conversions as CUDA's cuda_fp16.h / cuda_bf16.h define them (round to nearest even; NaN becomes the
// canonical 0x7fff).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline __half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return __half{0x7fffu};                      // NaN
  if (abs >= 0x477ff000u) return __half{(uint16_t)(sign | 0x7c00u)};  // rounds to or past 65520: inf
  if (abs < 0x38800000u) {                                            // below 2^-14: subnormal half (or 0)
    if (abs < 0x33000000u) return __half{(uint16_t)sign};             // below half the smallest subnormal
    // value = mant * 2^(e - 150) with e the biased exponent; in units of the smallest subnormal half (2^-24) that
    // is mant * 2^(e - 126) = mant >> (126 - e), rounded to nearest even
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - (int)(abs >> 23);
    const uint32_t units = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1u), half_way = 1u << (shift - 1);
    const uint32_t rounded = units + ((rest > half_way) || (rest == half_way && (units & 1u)));
    return __half{(uint16_t)(sign | rounded)};
  }
  const uint32_t e = (abs >> 23) - 112;  // rebias 127 -> 15
  const uint32_t mant = abs & 0x7fffffu;
  uint32_t h = (e << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  h += (rest > 0x1000u) || (rest == 0x1000u && (h & 1u));  // a carry into the exponent is right (up to inf)
  return __half{(uint16_t)(sign | h)};
}

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
  if (e == 0) {
    if (mant == 0) return __uint_as_float(sign);
    return (sign ? -1.0f : 1.0f) * ldexpf((float)mant, -24);  // exact: a subnormal half is a float normal
  }
  return __uint_as_float(sign | ((e + 112) << 23) | (mant << 13));
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};  // NaN
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(rounded >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return __uint_as_float((uint32_t)b.bits << 16);
}
