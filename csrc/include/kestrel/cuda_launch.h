// KESTREL_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...): a kernel launch, written so that the same
// launcher source also runs on the CPU in the tests (tests/cuda_sim: its cuda_runtime.h defines
// KESTREL_SIM_LAUNCH). Under nvcc it is kernel<<<grid, block, shared_bytes, stream>>>(args...).
#pragma once

#include <cuda_runtime.h>

#if defined(KESTREL_SIM_LAUNCH)
#define KESTREL_LAUNCH(grid, block, shared_bytes, stream, ...) \
  KESTREL_SIM_LAUNCH(grid, block, shared_bytes, stream, __VA_ARGS__)
#else
#define KESTREL_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif
