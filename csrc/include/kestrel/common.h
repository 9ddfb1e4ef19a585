// Framework-free definitions shared by host and device code. No torch headers here.
#pragma once

#include <stdint.h>
#include <string.h>

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
