// The device (CUDA) implementations of the fused optimizer ops, written once for the two ways kestrel launches its
// CUDA kernels: natively (csrc/cuda/optim_ops.cpp, nvcc-built) and through the JIT path (csrc/jit_ops.cpp, kernels
// compiled at run time by NVRTC). Torch-facing but CUDA-free: the checks (optim_checks.h), the per-parameter
// metadata and the kernels' argument struct are built here; the Launcher runs what kestrel/launch_plan.h plans.
//
// A Launcher provides
//   bool capturing()                                 a CUDA graph capture is under way on the current stream
//   const optim::TensorMeta* device_meta(host, device, keep)
//                                                    the metadata copied to the device on the current stream
//                                                    (keep: the device tensor, alive until the launch is queued)
//   void step(DType, bool two_state, int kind, bool eight_bit, const cuda::StepArgs&)
//   void norms(DType, bool adam, bool eight_bit, const cuda::StepArgs&)
//   ... and the other families' launches (quantize_op.h, tree_verify_op.h), and
//   void hold(const at::Tensor&)                     keep a tensor the launches read or write (a contiguous copy of
//                                                    an input, scratch) alive until they are queued: the native
//                                                    launcher queues them before the op body returns (no-op), the
//                                                    JIT launcher after (it keeps them)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>

#include <vector>

#include "kestrel/kernel_args.h"
#include "optim_checks.h"
#include "torch_dtype.h"

namespace kestrel {

// The per-parameter metadata of one launch in host memory (pinned when `pinned` and the parameters are on a GPU, so
// that the copy to the device is asynchronous), zero-filled so that every pointer the caller does not set (states,
// norms, device step/lr) is null. total_blocks receives the launch's block count.
inline at::Tensor make_meta(const char* op, at::TensorList params, at::TensorList grads, const StepCall& call,
                            int64_t& total_blocks, bool pinned) {
  const at::Device device = params[0].device();
  const c10::ScalarType dtype = params[0].scalar_type();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device() == device, op, ": all parameters of one call must be on one device; parameter ", i,
                " is on ", params[i].device(), ", parameter 0 on ", device);
    TORCH_CHECK(params[i].scalar_type() == dtype, op, ": all parameters of one call must have one dtype; parameter ", i,
                " is ", params[i].scalar_type(), ", parameter 0 ", dtype);
  }
  const int64_t count = static_cast<int64_t>(params.size());
  at::Tensor meta_host = at::zeros({count * static_cast<int64_t>(sizeof(optim::TensorMeta))},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(pinned && device.is_cuda()));
  auto* meta = reinterpret_cast<optim::TensorMeta*>(meta_host.data_ptr());
  total_blocks = 0;
  for (int64_t i = 0; i < count; ++i) {
    optim::TensorMeta& m = meta[i];
    m.param = params[i].data_ptr();
    m.grad = grads[i].data_ptr();
    m.numel = params[i].numel();
    m.first_block = total_blocks;
    m.scalars = call.scalars(static_cast<size_t>(i));
    total_blocks += optim_num_blocks(m.numel);
  }
  return meta_host;
}

// One step-kernel launch for every parameter of the call (read and checked by read_step_call); a one-state call
// ignores state2/absmax2.
template <typename Launcher>
void step_op(Launcher& launcher, const char* op, const StepCall& call, at::TensorList params, at::TensorList grads,
             at::TensorList state1, at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  const bool in_capture = launcher.capturing();
  TORCH_CHECK(!in_capture || call.step_dev != nullptr, op,
              ": a step captured in a CUDA graph must be "
              "capturable (step counts on the GPU: build the optimizer with capturable=True)");
  int64_t total_blocks = 0;
  at::Tensor meta_host = make_meta(op, params, grads, call, total_blocks, /*pinned=*/!in_capture);
  auto* meta = reinterpret_cast<optim::TensorMeta*>(meta_host.data_ptr());
  const int64_t count = static_cast<int64_t>(params.size());
  for (int64_t i = 0; i < count; ++i) {
    optim::TensorMeta& m = meta[i];
    m.state1 = state1[i].data_ptr();
    m.state2 = call.two_state ? state2[i].data_ptr() : nullptr;
    m.absmax1 = call.eight_bit ? absmax1[i].data_ptr<float>() : nullptr;
    m.absmax2 = call.eight_bit && call.two_state ? absmax2[i].data_ptr<float>() : nullptr;
    m.norms = call.norms ? call.norms + 2 * i : nullptr;
    m.step_ptr = call.step_dev ? call.step_dev + i : nullptr;
    m.lr_ptr = call.lr_dev;
  }
  at::Tensor meta_device;
  cuda::StepArgs args{};
  args.meta = launcher.device_meta(meta_host, device, meta_device);
  args.num_tensors = static_cast<int>(count);
  args.total_blocks = total_blocks;
  args.qmap1 = call.qmap1;
  args.qmap2 = call.two_state ? call.qmap2 : nullptr;
  launcher.step(to_kestrel_dtype(params[0].scalar_type()), call.two_state, call.kind, call.eight_bit, args);
}

template <typename Launcher>
at::Tensor update_norms_op(Launcher& launcher, c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                           at::TensorList state1, at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                           const std::optional<at::Tensor>& qmap1, const std::optional<at::Tensor>& qmap2,
                           const at::Tensor& steps_tensor, double beta1, double beta2, double eps, double weight_decay,
                           double gnorm_scale) {
  constexpr const char* op = "update_norms";
  const std::vector<int64_t> steps_vec = read_steps(op, steps_tensor, params.size());
  const c10::IntArrayRef steps(steps_vec);
  const bool adam =
      check_norm_args(op, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps);
  TORCH_CHECK(!launcher.capturing(), op, ": the trust ratio's norm pass cannot be captured in a CUDA graph yet");
  const bool eight_bit = qmap1.has_value();
  const int64_t count = static_cast<int64_t>(params.size());
  if (count == 0) return at::zeros({0, 2}, at::TensorOptions().dtype(at::kFloat));
  const at::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  int64_t total_blocks = 0;
  StepCall scalars_only;  // the norm pass reads the step's scalars (no lr, no rounding)
  scalars_only.steps = steps_vec;
  scalars_only.hyper = {0.0, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale};
  at::Tensor meta_host = make_meta(op, params, grads, scalars_only, total_blocks, /*pinned=*/true);
  at::Tensor norms = at::empty({count, 2}, at::TensorOptions().dtype(at::kFloat).device(device));
  at::Tensor block_sums =
      at::empty({std::max<int64_t>(1, 2 * total_blocks)}, at::TensorOptions().dtype(at::kFloat).device(device));
  auto* meta = reinterpret_cast<optim::TensorMeta*>(meta_host.data_ptr());
  for (int64_t i = 0; i < count; ++i) {
    meta[i].state1 = state1[i].data_ptr();
    meta[i].state2 = adam ? state2[i].data_ptr() : nullptr;
    meta[i].absmax1 = eight_bit ? absmax1[i].data_ptr<float>() : nullptr;
    meta[i].absmax2 = eight_bit && adam ? absmax2[i].data_ptr<float>() : nullptr;
    meta[i].norms_out = norms.data_ptr<float>() + 2 * i;
  }
  at::Tensor meta_device;
  cuda::StepArgs args{};
  args.meta = launcher.device_meta(meta_host, device, meta_device);
  args.num_tensors = static_cast<int>(count);
  args.total_blocks = total_blocks;
  args.qmap1 = eight_bit ? qmap1->data_ptr<float>() : nullptr;
  args.qmap2 = eight_bit && adam ? qmap2->data_ptr<float>() : nullptr;
  args.block_sums = block_sums.data_ptr<float>();
  launcher.hold(block_sums);
  launcher.norms(to_kestrel_dtype(params[0].scalar_type()), adam, eight_bit, args);
  return norms;
}

// The four step ops' schemas into the one prologue (read_step_call, with the device values of a capturable step),
// then step_op. Each is a template on the Launcher; the native and the JIT registrations instantiate them.
template <typename Launcher>
void two_state8bit_step_op(Launcher& launcher, c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                           at::TensorList state1, at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                           const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& steps, double lr,
                           double beta1, double beta2, double beta3, double alpha, double eps, double weight_decay,
                           double gnorm_scale, int64_t round_seed, const std::optional<at::Tensor>& norms,
                           double max_unorm, const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  constexpr const char* op = "two_state8bit_step_";
  const StepCall call =
      read_step_call(op, true, optimizer, params, grads, state1, state2, absmax1, absmax2, &qmap1, &qmap2, steps,
                     {lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale}, round_seed, norms, max_unorm,
                     lr_tensor, robust_rounding, /*device_values=*/true);
  step_op(launcher, op, call, params, grads, state1, state2, absmax1, absmax2);
}

template <typename Launcher>
void two_state4bit_step_op(Launcher& launcher, c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                           at::TensorList state1, at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                           const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& steps, double lr,
                           double beta1, double beta2, double eps, double weight_decay, double gnorm_scale,
                           int64_t round_seed, const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* op = "two_state4bit_step_";
  const StepCall call = read_step_call(op, true, optimizer, params, grads, state1, state2, absmax1, absmax2, &qmap1,
                                       &qmap2, steps, {lr, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale},
                                       round_seed, std::nullopt, 0.0, lr_tensor, false, /*device_values=*/true,
                                       /*bits=*/4);
  step_op(launcher, op, call, params, grads, state1, state2, absmax1, absmax2);
}

template <typename Launcher>
void two_state32bit_step_op(Launcher& launcher, c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                            at::TensorList state1, at::TensorList state2, const at::Tensor& steps, double lr,
                            double beta1, double beta2, double beta3, double alpha, double eps, double weight_decay,
                            double gnorm_scale, int64_t round_seed, const std::optional<at::Tensor>& norms,
                            double max_unorm, const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  constexpr const char* op = "two_state32bit_step_";
  const StepCall call =
      read_step_call(op, true, optimizer, params, grads, state1, state2, {}, {}, nullptr, nullptr, steps,
                     {lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale}, round_seed, norms, max_unorm,
                     lr_tensor, robust_rounding, /*device_values=*/true);
  step_op(launcher, op, call, params, grads, state1, state2, {}, {});
}

template <typename Launcher>
void one_state8bit_step_op(Launcher& launcher, c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                           at::TensorList state1, at::TensorList absmax1, const at::Tensor& qmap1,
                           const at::Tensor& steps, double lr, double beta1, double beta2, double eps,
                           double weight_decay, double gnorm_scale, int64_t round_seed,
                           const std::optional<at::Tensor>& norms, double max_unorm,
                           const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  constexpr const char* op = "one_state8bit_step_";
  const StepCall call =
      read_step_call(op, false, optimizer, params, grads, state1, state1, absmax1, absmax1, &qmap1, &qmap1, steps,
                     {lr, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale}, round_seed, norms, max_unorm,
                     lr_tensor, robust_rounding, /*device_values=*/true);
  step_op(launcher, op, call, params, grads, state1, state1, absmax1, absmax1);
}

template <typename Launcher>
void one_state32bit_step_op(Launcher& launcher, c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                            at::TensorList state1, const at::Tensor& steps, double lr, double beta1, double beta2,
                            double eps, double weight_decay, double gnorm_scale, int64_t round_seed,
                            const std::optional<at::Tensor>& norms, double max_unorm,
                            const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  constexpr const char* op = "one_state32bit_step_";
  const StepCall call = read_step_call(op, false, optimizer, params, grads, state1, state1, {}, {}, nullptr, nullptr,
                                       steps, {lr, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale}, round_seed,
                                       norms, max_unorm, lr_tensor, robust_rounding, /*device_values=*/true);
  step_op(launcher, op, call, params, grads, state1, state1, {}, {});
}

}  // namespace kestrel
