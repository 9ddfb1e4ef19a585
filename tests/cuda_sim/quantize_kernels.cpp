// csrc/cuda/quantize.cu (launchers and kernels, unchanged) compiled as host C++ against kestrel_sim.
#include "cuda/quantize.cu"
