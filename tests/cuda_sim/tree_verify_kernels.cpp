// csrc/cuda/tree_verify.cu (launchers and kernels, unchanged) compiled as host C++ against kestrel_sim.
#include "cuda/tree_verify.cu"
