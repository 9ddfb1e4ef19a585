// csrc/cuda/optim.cu (launchers and kernels, unchanged) compiled as host C++ against kestrel_sim.
#include "cuda/optim.cu"
