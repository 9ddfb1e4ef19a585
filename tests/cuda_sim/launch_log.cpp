// The CUDA-on-CPU build's launch log, read by tests/test_jit.py through ctypes: the native launchers' launches (kernel
// symbol, grid, block, shared memory) to compare with the JIT path's plans.
#include <cuda_runtime.h>

extern "C" void kestrel_sim_log_start() {
  kestrel_sim::launch_log().clear();
  kestrel_sim::launch_logging() = true;
}

// The launches since kestrel_sim_log_start, one per line: symbol gx gy gz bx by bz shared (logging stops).
extern "C" const char* kestrel_sim_log_read() {
  static std::string text;
  text.clear();
  for (const kestrel_sim::LaunchRecord& r : kestrel_sim::launch_log()) {
    text += r.symbol;
    for (unsigned v : {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z}) text += " " + std::to_string(v);
    text += " " + std::to_string(r.shared_bytes) + "\n";
  }
  kestrel_sim::launch_logging() = false;
  return text.c_str();
}
