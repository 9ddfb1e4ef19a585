// The host half of the JIT path (docs/architecture.md, "The JIT path"): kestrel._C.jit_<op>(...) runs the same op
// body as the native CUDA registration (csrc/*_op.h: checks, outputs, per-parameter metadata copied to the device,
// the kernels' argument struct) with a Launcher that records each launch kestrel/launch_plan.h plans instead of
// running it. Python (kestrel/_jit.py) then launches the recorded kernels, compiled by NVRTC, with cuLaunchKernel:
// the kernel's name expression, its grid, block and shared memory, and its argument struct's bytes as the parameter
// buffer. Built into every kestrel._C (no CUDA needed: CUDA tensors are handled through ATen's generic API); on CPU
// tensors it records the same launches, which is how the tests compare them with the native launchers'.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "kestrel/launch_plan.h"
#include "optim_op.h"
#include "quantize_op.h"
#include "tree_verify_op.h"

namespace py = pybind11;

namespace kestrel {
namespace {

struct RecordedLaunch {
  cuda::KernelLaunch launch;
  std::string args;  // the kernel's argument struct, as bytes
};

// Metadata buffers of steps captured in CUDA graphs: the graph's copy node reads them at every replay, so they are
// never freed (as the native path's).
std::vector<at::Tensor>& captured_buffers() {
  static std::vector<at::Tensor> buffers;
  return buffers;
}

struct JitLauncher {
  bool capture = false;  // the caller's torch.cuda.is_current_stream_capturing()
  std::vector<RecordedLaunch> launches;
  std::vector<at::Tensor> keep;  // device tensors the recorded launches read (alive until they are queued)

  bool capturing() const { return capture; }
  void hold(const at::Tensor& t) { keep.push_back(t); }

  const optim::TensorMeta* device_meta(const at::Tensor& meta_host, at::Device device, at::Tensor& out) {
    out = at::empty({meta_host.numel()}, at::TensorOptions().dtype(at::kByte).device(device));
    if (capture && device.is_cuda()) {
      // the caller holds relaxed capture mode around this call (kestrel/_jit.py), as the native path does for its
      // pinned allocation
      at::Tensor pinned = at::empty({meta_host.numel()}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      pinned.copy_(meta_host);
      captured_buffers().push_back(pinned);
      out.copy_(pinned, /*non_blocking=*/true);
    } else {
      out.copy_(meta_host, /*non_blocking=*/true);
    }
    keep.push_back(out);
    return reinterpret_cast<const optim::TensorMeta*>(out.data_ptr());
  }

  template <typename Args>
  void record(const char* op, const cuda::LaunchPlan& plan, const Args& args) {
    TORCH_CHECK(plan.ok, op, ": the sizes cannot be launched (grid too large)");
    for (const cuda::KernelLaunch& launch : plan.launches)
      launches.push_back({launch, std::string(reinterpret_cast<const char*>(&args), sizeof(Args))});
  }

  void quantize(DType dtype, const cuda::QuantizeArgs& a) {
    record("quantize_blockwise", cuda::plan_quantize(dtype, a.n, a.blocksize), a);
  }
  void dequantize(DType dtype, const cuda::DequantizeArgs& a) {
    record("dequantize_blockwise", cuda::plan_dequantize(dtype, a.n, a.blocksize), a);
  }
  void step(DType dtype, bool two_state, int kind, bool eight_bit, const cuda::StepArgs& a) {
    record("step", cuda::plan_step(dtype, two_state, kind, eight_bit, a.num_tensors, a.total_blocks), a);
  }
  void norms(DType dtype, bool adam, bool eight_bit, const cuda::StepArgs& a) {
    record("update_norms", cuda::plan_norms(dtype, adam, eight_bit, a.num_tensors, a.total_blocks), a);
  }
  void verify_greedy(const cuda::VerifyGreedyArgs& a) {
    record("verify_tree_greedy", cuda::plan_verify_greedy(a.batch), a);
  }
  void verify_sample(const cuda::VerifySampleArgs& a) {
    record("verify_tree_sample", cuda::plan_verify_sample(a.batch), a);
  }
  void compact(int element_size, const cuda::CompactArgs& a) {
    record("compact_kv_cache", cuda::plan_compact(element_size, a.layers, a.batch, a.heads), a);
  }

  // (launches, keep): each launch (family, kernel, grid, block, shared_bytes, args bytes)
  py::tuple result() const {
    py::list out;
    for (const RecordedLaunch& r : launches) {
      const cuda::KernelLaunch& l = r.launch;
      out.append(py::make_tuple(l.family, l.kernel, py::make_tuple(l.grid.x, l.grid.y, l.grid.z),
                                py::make_tuple(l.block.x, l.block.y, l.block.z), l.shared_bytes, py::bytes(r.args)));
    }
    return py::make_tuple(out, keep);
  }
};

c10::ScalarType dtype_named(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  TORCH_CHECK(false, "dequantize_blockwise: dtype must be float32, float16 or bfloat16, got ", name);
}

}  // namespace

void register_jit_bindings(py::module_& m) {
  m.def("jit_kernel_names", &cuda::kernel_names,
        "Every template instance of a kernel family (quantize, optim, tree_verify), by NVRTC name expression.");
  m.def("jit_meta_bytes", [] { return sizeof(optim::TensorMeta); });
  m.def(
      "jit_quantize_blockwise",
      [](const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
        JitLauncher launcher;
        auto out = quantize_blockwise_op(launcher, x, code, blocksize);
        return py::make_tuple(py::make_tuple(std::get<0>(out), std::get<1>(out)), launcher.result());
      },
      "quantize_blockwise's outputs and its recorded launches.");
  m.def("jit_dequantize_blockwise", [](const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code,
                                       int64_t blocksize, const std::string& dtype) {
    JitLauncher launcher;
    at::Tensor out = dequantize_blockwise_op(launcher, codes, absmax, code, blocksize, dtype_named(dtype));
    return py::make_tuple(out, launcher.result());
  });
  m.def("jit_two_state8bit_step_",
        [](bool capture, const std::string& optimizer, std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
           std::vector<at::Tensor> state1, std::vector<at::Tensor> state2, std::vector<at::Tensor> absmax1,
           std::vector<at::Tensor> absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& steps,
           double lr, double beta1, double beta2, double beta3, double alpha, double eps, double weight_decay,
           double gnorm_scale, int64_t round_seed, std::optional<at::Tensor> norms, double max_unorm,
           std::optional<at::Tensor> lr_tensor, bool robust_rounding) {
          JitLauncher launcher{capture};
          two_state8bit_step_op(launcher, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                steps, lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, round_seed,
                                norms, max_unorm, lr_tensor, robust_rounding);
          return launcher.result();
        });
  m.def("jit_two_state4bit_step_",
        [](bool capture, const std::string& optimizer, std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
           std::vector<at::Tensor> state1, std::vector<at::Tensor> state2, std::vector<at::Tensor> absmax1,
           std::vector<at::Tensor> absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& steps,
           double lr, double beta1, double beta2, double eps, double weight_decay, double gnorm_scale,
           int64_t round_seed, std::optional<at::Tensor> lr_tensor) {
          JitLauncher launcher{capture};
          two_state4bit_step_op(launcher, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                steps, lr, beta1, beta2, eps, weight_decay, gnorm_scale, round_seed, lr_tensor);
          return launcher.result();
        });
  m.def("jit_two_state32bit_step_", [](bool capture, const std::string& optimizer, std::vector<at::Tensor> params,
                                       std::vector<at::Tensor> grads, std::vector<at::Tensor> state1,
                                       std::vector<at::Tensor> state2, const at::Tensor& steps, double lr, double beta1,
                                       double beta2, double beta3, double alpha, double eps, double weight_decay,
                                       double gnorm_scale, int64_t round_seed, std::optional<at::Tensor> norms,
                                       double max_unorm, std::optional<at::Tensor> lr_tensor, bool robust_rounding) {
    JitLauncher launcher{capture};
    two_state32bit_step_op(launcher, optimizer, params, grads, state1, state2, steps, lr, beta1, beta2, beta3, alpha,
                           eps, weight_decay, gnorm_scale, round_seed, norms, max_unorm, lr_tensor, robust_rounding);
    return launcher.result();
  });
  m.def("jit_one_state8bit_step_", [](bool capture, const std::string& optimizer, std::vector<at::Tensor> params,
                                      std::vector<at::Tensor> grads, std::vector<at::Tensor> state1,
                                      std::vector<at::Tensor> absmax1, const at::Tensor& qmap1, const at::Tensor& steps,
                                      double lr, double beta1, double beta2, double eps, double weight_decay,
                                      double gnorm_scale, int64_t round_seed, std::optional<at::Tensor> norms,
                                      double max_unorm, std::optional<at::Tensor> lr_tensor, bool robust_rounding) {
    JitLauncher launcher{capture};
    one_state8bit_step_op(launcher, optimizer, params, grads, state1, absmax1, qmap1, steps, lr, beta1, beta2, eps,
                          weight_decay, gnorm_scale, round_seed, norms, max_unorm, lr_tensor, robust_rounding);
    return launcher.result();
  });
  m.def("jit_one_state32bit_step_",
        [](bool capture, const std::string& optimizer, std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
           std::vector<at::Tensor> state1, const at::Tensor& steps, double lr, double beta1, double beta2, double eps,
           double weight_decay, double gnorm_scale, int64_t round_seed, std::optional<at::Tensor> norms,
           double max_unorm, std::optional<at::Tensor> lr_tensor, bool robust_rounding) {
          JitLauncher launcher{capture};
          one_state32bit_step_op(launcher, optimizer, params, grads, state1, steps, lr, beta1, beta2, eps, weight_decay,
                                 gnorm_scale, round_seed, norms, max_unorm, lr_tensor, robust_rounding);
          return launcher.result();
        });
  m.def("jit_update_norms",
        [](bool capture, const std::string& optimizer, std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
           std::vector<at::Tensor> state1, std::vector<at::Tensor> state2, std::vector<at::Tensor> absmax1,
           std::vector<at::Tensor> absmax2, std::optional<at::Tensor> qmap1, std::optional<at::Tensor> qmap2,
           const at::Tensor& steps, double beta1, double beta2, double eps, double weight_decay, double gnorm_scale) {
          JitLauncher launcher{capture};
          at::Tensor norms = update_norms_op(launcher, optimizer, params, grads, state1, state2, absmax1, absmax2,
                                             qmap1, qmap2, steps, beta1, beta2, eps, weight_decay, gnorm_scale);
          return py::make_tuple(norms, launcher.result());
        });
  m.def("jit_verify_tree_greedy", [](const at::Tensor& candidates, const at::Tensor& target_ids,
                                     const at::Tensor& first_child, const at::Tensor& next_sibling, int64_t max_depth) {
    JitLauncher launcher;
    auto out = verify_tree_greedy_op(launcher, candidates, target_ids, first_child, next_sibling, max_depth);
    return py::make_tuple(py::make_tuple(std::get<0>(out), std::get<1>(out), std::get<2>(out)), launcher.result());
  });
  m.def("jit_verify_tree_sample", [](const at::Tensor& candidates, const at::Tensor& target_probs,
                                     const at::Tensor& first_child, const at::Tensor& next_sibling,
                                     const at::Tensor& uniform, const at::Tensor& uniform_final,
                                     std::optional<at::Tensor> draft_probs, int64_t max_depth) {
    JitLauncher launcher;
    auto out = verify_tree_sample_op(launcher, candidates, target_probs, first_child, next_sibling, uniform,
                                     uniform_final, draft_probs, max_depth);
    return py::make_tuple(py::make_tuple(std::get<0>(out), std::get<1>(out), std::get<2>(out)), launcher.result());
  });
  m.def("jit_compact_kv_cache",
        [](at::Tensor k_cache, at::Tensor v_cache, at::Tensor cache_seqlens, const at::Tensor& accept_index) {
          JitLauncher launcher;
          compact_kv_cache_op(launcher, k_cache, v_cache, cache_seqlens, accept_index);
          return launcher.result();
        });
}

}  // namespace kestrel
