// Which vector path the CPU optimizer kernels take: the widest the CPU supports (AVX-512 F/BW/DQ/VL with VBMI and
// BF16, else with VBMI, else AVX-512 F/BW/DQ/VL, else AVX2 with F16C, else the scalar loops), capped by
// KESTREL_CPU_ISA=avx512bf16|avx512vbmi|avx512|avx2|scalar (read at every step, so the tests run every path on one
// machine). Every path gives the same bits.
#pragma once

#include <cstdlib>
#include <cstring>

#include "optim_avx2.h"
#include "optim_avx512.h"

namespace kestrel {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi = 3, kAvx512Bf16 = 4 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return "avx512bf16";
    case Isa::kAvx512Vbmi:
      return "avx512vbmi";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kScalar:
      break;
  }
  return "scalar";
}

inline Isa supported_isa() {
#if defined(KESTREL_HAVE_AVX512_PATH)
  if (avx512bf16::supported()) return Isa::kAvx512Bf16;
  if (avx512::supported_vbmi()) return Isa::kAvx512Vbmi;
  if (avx512::supported()) return Isa::kAvx512;
#endif
#if defined(KESTREL_HAVE_AVX2_PATH)
  if (avx2::supported()) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// The path of this call: supported_isa(), lowered to KESTREL_CPU_ISA when that names a narrower one (an unknown
// value, or a wider one than the CPU has, leaves it).
inline Isa active_isa() {
  Isa isa = supported_isa();
  const char* env = std::getenv("KESTREL_CPU_ISA");
  if (env == nullptr || *env == '\0') return isa;
  Isa cap = isa;
  if (std::strcmp(env, "scalar") == 0) cap = Isa::kScalar;
  if (std::strcmp(env, "avx2") == 0) cap = Isa::kAvx2;
  if (std::strcmp(env, "avx512") == 0) cap = Isa::kAvx512;
  if (std::strcmp(env, "avx512vbmi") == 0) cap = Isa::kAvx512Vbmi;
  if (std::strcmp(env, "avx512bf16") == 0) cap = Isa::kAvx512Bf16;
  return static_cast<int>(cap) < static_cast<int>(isa) ? cap : isa;
}

}  // namespace cpu
}  // namespace kestrel
