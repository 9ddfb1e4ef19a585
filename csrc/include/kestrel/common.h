// Framework-free definitions shared by host and device code. No torch headers here.
//
// The device code also compiles at run time under NVRTC (kestrel's JIT path, python/kestrel/_jit.py), which defines
// __CUDACC_RTC__ and has no C or C++ library headers: the fixed-width integers are defined here for it (as on an LP64
// host, where the launchers that fill the kernels' argument structs are compiled), and no device code includes
// <stdint.h>, <math.h>, <type_traits> or <cuda_runtime.h> under NVRTC.
#pragma once

#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
#else
#include <stdint.h>
#include <string.h>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KESTREL_HD __host__ __device__ __forceinline__
#else
#define KESTREL_HD inline
#endif

#define KESTREL_STR_(...) #__VA_ARGS__
#define KESTREL_STR(...) KESTREL_STR_(__VA_ARGS__)

namespace kestrel {

// Element types a raw-pointer kernel can be asked for; launchers map at::ScalarType onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// std::is_same without <type_traits> (which NVRTC does not have).
template <typename A, typename B>
struct same_type {
  static constexpr bool value = false;
};
template <typename A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

KESTREL_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

KESTREL_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

}  // namespace kestrel
