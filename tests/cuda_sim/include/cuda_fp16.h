// kestrel_sim stand-in for CUDA's cuda_fp16.h: the kernels run on the CPU (tests/cuda_sim).
#pragma once
#include "kestrel_sim.h"
