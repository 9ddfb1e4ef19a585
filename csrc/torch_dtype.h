// Shared by the torch-facing CUDA launchers: at::ScalarType to the raw kernels' element type.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kestrel/common.h"

namespace kestrel {

inline DType to_kestrel_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "kestrel: unsupported dtype ", t);
  }
}

}  // namespace kestrel
