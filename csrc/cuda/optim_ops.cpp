// CUDA launchers of the fused optimizer ops (two_state8bit_step_, two_state32bit_step_, one_state8bit_step_,
// one_state32bit_step_, update_norms): checks, device guard, per-parameter metadata (in pinned memory, copied
// asynchronously on the current stream: no host synchronisation), one step-kernel launch for all parameters of a
// call (the norm pass: a per-block kernel and a fixed-order reduction kernel).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <vector>
#include <torch/library.h>

#include "../optim_checks.h"
#include "kestrel/launch.h"
#include "torch_dtype.h"

namespace kestrel {
namespace {

// The per-parameter metadata of one launch, in pinned host memory (params of one device and dtype; not pinned for CPU
// tensors, as when the tests run these launchers on the CPU), zero-filled so that every pointer the caller does not
// set (states, norms, device step/lr) is null. Returns the host tensor; total_blocks receives the launch's block
// count.
at::Tensor make_meta(const char* op, at::TensorList params, at::TensorList grads, const StepCall& call,
                     int64_t& total_blocks, bool pinned = true) {
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

// The metadata copied to the device on the current stream (the caching host allocator keeps the pinned block alive
// until the copy has run: no host synchronisation).
const optim::TensorMeta* to_device(const at::Tensor& meta_host, at::Device device, at::Tensor& keep) {
  keep = meta_host.to(device, /*non_blocking=*/true);
  return reinterpret_cast<const optim::TensorMeta*>(keep.data_ptr());
}

// During a CUDA graph capture: the metadata goes through a pinned buffer allocated for this capture and never
// freed (the graph's copy node reads it at every replay; a capturable step's metadata is the same at every step,
// since the step count and the lr are read on the device). Pinned memory is allocated in relaxed capture mode, as
// PyTorch's allocators do, outside the caching host allocator (whose blocks are reused).
const optim::TensorMeta* captured_device_meta(const at::Tensor& meta_host, at::Device device, at::Tensor& keep) {
  const size_t bytes = static_cast<size_t>(meta_host.numel());
  void* host = nullptr;
  {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    C10_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocDefault));
  }
  std::memcpy(host, meta_host.data_ptr(), bytes);
  keep = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cudaMemcpyAsync(keep.data_ptr(), host, bytes, cudaMemcpyHostToDevice,
                                 c10::cuda::getCurrentCUDAStream().stream()));
  return reinterpret_cast<const optim::TensorMeta*>(keep.data_ptr());
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// One step-kernel launch for every parameter of the call (read and checked by read_step_call); a one-state call
// ignores state2/absmax2.
void launch_step(const char* op, const StepCall& call, at::TensorList params, at::TensorList grads,
                 at::TensorList state1, at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  int64_t total_blocks = 0;
  const bool in_capture = capturing();
  TORCH_CHECK(!in_capture || call.step_dev != nullptr, op,
              ": a step captured in a CUDA graph must be "
              "capturable (step counts on the GPU: build the optimizer with capturable=True)");
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
  const optim::TensorMeta* device_meta =
      in_capture ? captured_device_meta(meta_host, device, meta_device) : to_device(meta_host, device, meta_device);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const c10::ScalarType dtype = params[0].scalar_type();
  const int error =
      call.two_state
          ? cuda::two_state_step(to_kestrel_dtype(dtype), static_cast<optim::TwoState>(call.kind), call.eight_bit,
                                 device_meta, static_cast<int>(count), total_blocks, call.qmap1, call.qmap2, stream)
          : cuda::one_state_step(to_kestrel_dtype(dtype), static_cast<optim::OneState>(call.kind), call.eight_bit,
                                 device_meta, static_cast<int>(count), total_blocks, call.qmap1, stream);
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
}

at::Tensor update_norms_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                             at::TensorList absmax2, const std::optional<at::Tensor>& qmap1,
                             const std::optional<at::Tensor>& qmap2, const at::Tensor& steps_tensor, double beta1,
                             double beta2, double eps, double weight_decay, double gnorm_scale) {
  const std::vector<int64_t> steps_vec = read_steps("update_norms", steps_tensor, params.size());
  const c10::IntArrayRef steps(steps_vec);
  constexpr const char* op = "update_norms";
  const bool adam =
      check_norm_args(op, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps);
  TORCH_CHECK(!capturing(), op, ": the trust ratio's norm pass cannot be captured in a CUDA graph yet");
  const bool eight_bit = qmap1.has_value();
  const int64_t count = static_cast<int64_t>(params.size());
  if (count == 0) return at::zeros({0, 2}, at::TensorOptions().dtype(at::kFloat));
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  int64_t total_blocks = 0;
  StepCall scalars_only;  // the norm pass reads the step's scalars (no lr, no rounding)
  scalars_only.steps = steps_vec;
  scalars_only.hyper = {0.0, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale};
  at::Tensor meta_host = make_meta(op, params, grads, scalars_only, total_blocks);
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
  const optim::TensorMeta* device_meta = to_device(meta_host, device, meta_device);
  const float* q1 = eight_bit ? qmap1->data_ptr<float>() : nullptr;
  const float* q2 = eight_bit && adam ? qmap2->data_ptr<float>() : nullptr;
  const int error = cuda::update_norms(to_kestrel_dtype(params[0].scalar_type()), adam, eight_bit, device_meta,
                                       static_cast<int>(count), total_blocks, q1, q2, block_sums.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
  return norms;
}

// The four ops' entry points: their schemas' arguments into the one prologue (read_step_call, with the device
// values of a capturable step), then the launch.
void two_state8bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                             at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                             const at::Tensor& steps, double lr, double beta1, double beta2, double beta3, double alpha,
                             double eps, double weight_decay, double gnorm_scale, int64_t round_seed,
                             const std::optional<at::Tensor>& norms, double max_unorm,
                             const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  constexpr const char* op = "two_state8bit_step_";
  const StepCall call =
      read_step_call(op, true, optimizer, params, grads, state1, state2, absmax1, absmax2, &qmap1, &qmap2, steps,
                     {lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale}, round_seed, norms, max_unorm,
                     lr_tensor, robust_rounding, /*device_values=*/true);
  launch_step(op, call, params, grads, state1, state2, absmax1, absmax2);
}

void two_state32bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                              at::TensorList state1, at::TensorList state2, const at::Tensor& steps, double lr,
                              double beta1, double beta2, double beta3, double alpha, double eps, double weight_decay,
                              double gnorm_scale, int64_t round_seed, const std::optional<at::Tensor>& norms,
                              double max_unorm, const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  constexpr const char* op = "two_state32bit_step_";
  const StepCall call =
      read_step_call(op, true, optimizer, params, grads, state1, state2, {}, {}, nullptr, nullptr, steps,
                     {lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale}, round_seed, norms, max_unorm,
                     lr_tensor, robust_rounding, /*device_values=*/true);
  launch_step(op, call, params, grads, state1, state2, {}, {});
}

void one_state8bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
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
  launch_step(op, call, params, grads, state1, state1, absmax1, absmax1);
}

void one_state32bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                              at::TensorList state1, const at::Tensor& steps, double lr, double beta1, double beta2,
                              double eps, double weight_decay, double gnorm_scale, int64_t round_seed,
                              const std::optional<at::Tensor>& norms, double max_unorm,
                              const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  constexpr const char* op = "one_state32bit_step_";
  const StepCall call = read_step_call(op, false, optimizer, params, grads, state1, state1, {}, {}, nullptr, nullptr,
                                       steps, {lr, beta1, beta2, 0.0, 0.0, eps, weight_decay, gnorm_scale}, round_seed,
                                       norms, max_unorm, lr_tensor, robust_rounding, /*device_values=*/true);
  launch_step(op, call, params, grads, state1, state1, {}, {});
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CUDA, m) {
  m.impl("update_norms", &update_norms_cuda);
  m.impl("two_state8bit_step_", &two_state8bit_step_cuda);
  m.impl("two_state32bit_step_", &two_state32bit_step_cuda);
  m.impl("one_state8bit_step_", &one_state8bit_step_cuda);
  m.impl("one_state32bit_step_", &one_state32bit_step_cuda);
}

}  // namespace kestrel
