// The arguments of the fused optimizer ops, read and checked once for the CPU and the CUDA launchers alike
// (torch-facing): read_step_call is the one prologue of every step op, check_norm_args that of update_norms.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "kestrel/optim.h"

namespace kestrel {

// The per-parameter step counts: a CPU int64 tensor of one value per parameter (a tensor, so that a compiled
// optimizer step does not recompile as the count grows).
inline std::vector<int64_t> read_steps(const char* op, const at::Tensor& steps, size_t count) {
  TORCH_CHECK(steps.device().is_cpu() && steps.scalar_type() == at::kLong && steps.dim() == 1 &&
                  steps.numel() == static_cast<int64_t>(count),
              op, ": steps must be a 1-D CPU int64 tensor of ", count, " step counts (one per parameter), got ",
              steps.scalar_type(), " of shape ", steps.sizes(), " on ", steps.device());
  const at::Tensor contiguous = steps.contiguous();
  const int64_t* data = contiguous.data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + count);
}

// The learning rate: `lr`, or the value of lr_tensor (a 0-d CPU float tensor, for schedulers under torch.compile).
inline double read_lr(const char* op, double lr, const std::optional<at::Tensor>& lr_tensor) {
  if (!lr_tensor.has_value()) return lr;
  const at::Tensor& t = *lr_tensor;
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.is_floating_point(), op,
              ": lr_tensor must be a one-element CPU float tensor, got ", t.scalar_type(), " of shape ", t.sizes(),
              " on ", t.device());
  return t.item<double>();
}

inline int64_t optim_num_blocks(int64_t n) {
  return (n + optim::kBlockSize - 1) / optim::kBlockSize;
}

// Every list has one entry per parameter; each parameter is a dense, contiguous float tensor with a gradient of the
// same dtype and size on the same device; states have the sizes and dtypes of an 8-bit (or 32-bit) state.
// A one-state optimizer passes its state1/absmax1/qmap1 also as state2/absmax2/qmap2. state1 holds `moments1`
// moments per element (2 for AdEMAMix: shape (2, *param.shape), absmax1 (2, blocks)).
inline void check_step_args(const char* op, at::TensorList params, at::TensorList grads, at::TensorList state1,
                            at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                            const at::Tensor* qmap1, const at::Tensor* qmap2, c10::IntArrayRef steps, bool eight_bit,
                            int64_t moments1 = 1, int bits = 8) {
  // bits = 4 (two_state4bit_step_): codes two per byte, ceil(n / 2) bytes; absmax per 128 elements; 16-entry maps
  const int64_t map_size = bits == 4 ? optim::k4bitCodes : 256;
  const int64_t block = bits == 4 ? optim::k4bitBlockSize : optim::kBlockSize;
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && state1.size() == count && state2.size() == count && steps.size() == count, op,
              ": params, grads, states and steps must have one entry per parameter, got ", count, ", ", grads.size(),
              ", ", state1.size(), ", ", state2.size(), ", ", steps.size());
  if (eight_bit) {
    TORCH_CHECK(absmax1.size() == count && absmax2.size() == count, op,
                ": absmax1 and absmax2 must have one entry per parameter, got ", absmax1.size(), " and ",
                absmax2.size(), " for ", count, " parameters");
    for (const at::Tensor* qmap : {qmap1, qmap2}) {
      TORCH_CHECK(qmap->scalar_type() == at::kFloat && qmap->numel() == map_size && qmap->is_contiguous(), op,
                  ": qmap1 and qmap2 must be contiguous float32 tensors of ", map_size, " values, got ",
                  qmap->scalar_type(), " of shape ", qmap->sizes());
    }
  }
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const int64_t n = p.numel();
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16, op,
                ": parameter ", i, " must be float32, float16 or bfloat16, got ", p.scalar_type());
    TORCH_CHECK(g.layout() == at::kStrided, op, ": the gradient of parameter ", i,
                " is sparse; sparse gradients are "
                "not supported");
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, ": the gradient of parameter ", i, " must have its dtype (",
                p.scalar_type(), "), got ", g.scalar_type());
    TORCH_CHECK(g.numel() == n, op, ": the gradient of parameter ", i, " must have ", n, " elements, got ", g.numel());
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), op, ": parameter ", i, " and its gradient must be contiguous");
    TORCH_CHECK(g.device() == p.device() && state1[i].device() == p.device() && state2[i].device() == p.device(), op,
                ": parameter ", i, ", its gradient and states must be on one device (", p.device(), ")");
    TORCH_CHECK(steps[i] >= 1, op, ": steps[", i, "] must be >= 1, got ", steps[i]);
    const auto state_dtype = eight_bit ? at::kByte : at::kFloat;
    int64_t moments = moments1;
    const int64_t held = bits == 4 ? (n + 1) / 2 : n;  // state elements (bytes of codes, or floats) per moment
    for (const at::Tensor* s : {&state1[i], &state2[i]}) {
      TORCH_CHECK(s->scalar_type() == state_dtype && s->numel() == moments * held && s->is_contiguous(), op,
                  ": the states of parameter ", i, " must be contiguous ", state_dtype, " tensors of ", moments, " x ",
                  held, bits == 4 ? " bytes (two 4-bit codes per byte)" : " elements", ", got ", s->scalar_type(),
                  " with ", s->numel());
      moments = 1;
    }
    if (eight_bit) {
      const int64_t blocks = (n + block - 1) / block;
      moments = moments1;
      for (const at::Tensor* a : {&absmax1[i], &absmax2[i]}) {
        TORCH_CHECK(a->scalar_type() == at::kFloat && a->numel() == moments * blocks && a->is_contiguous() &&
                        a->device() == p.device(),
                    op, ": absmax1/absmax2 of parameter ", i, " must be contiguous float32 tensors of ", moments,
                    " x ceil(", n, " / ", block, ") = ", moments * blocks, " values on ", p.device(), ", got ",
                    a->scalar_type(), " with ", a->numel());
        moments = 1;
      }
    }
  }
}

// round_seed < 0: parameters round to nearest even; otherwise bf16 parameters round stochastically with that seed
// and salt `index` (the tensor's position in the call).
inline optim::StepScalars with_rounding(optim::StepScalars a, int64_t round_seed, size_t index, bool robust_rounding) {
  a.stochastic_round = round_seed >= 0;
  a.round_seed = round_seed >= 0 ? static_cast<uint64_t>(round_seed) : 0;
  a.salt = static_cast<int>(index);
  a.robust_rounding = robust_rounding ? 1 : 0;
  return a;
}

// The trust-ratio inputs of a step: `norms` (update_norms' float32 (count, 2) result on the parameters' device)
// with max_unorm > 0, for LAMB ("adam") or LARS ("momentum") only. Returns the norms' data pointer, or nullptr.
inline const float* check_norms(const char* op, const std::optional<at::Tensor>& norms, double max_unorm, size_t count,
                                bool supported, c10::string_view optimizer, at::Device params_device) {
  TORCH_CHECK(max_unorm >= 0.0, op, ": max_unorm must be >= 0, got ", max_unorm);
  if (!norms.has_value()) {
    TORCH_CHECK(max_unorm == 0.0, op, ": max_unorm = ", max_unorm, " needs the norms from update_norms, got None");
    return nullptr;
  }
  TORCH_CHECK(supported, op, ": the trust ratio (norms, max_unorm) applies to adam (LAMB) and momentum (LARS), got ",
              optimizer);
  const at::Tensor& t = *norms;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == static_cast<int64_t>(count) &&
                  t.size(1) == 2 && t.is_contiguous(),
              op, ": norms must be a contiguous float32 tensor of shape (", count, ", 2), got ", t.scalar_type(),
              " of shape ", t.sizes());
  TORCH_CHECK(count == 0 || t.device() == params_device, op, ": norms must be on ", params_device, ", got ",
              t.device());
  return t.data_ptr<float>();
}

// update_norms' arguments: optimizer "adam" (LAMB: two states) or "momentum" (LARS: state2/absmax2 repeat
// state1/absmax1); 8-bit states when qmap1 is given (and qmap2, for adam). Returns true for adam.
inline bool check_norm_args(const char* op, c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                            at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                            at::TensorList absmax2, const std::optional<at::Tensor>& qmap1,
                            const std::optional<at::Tensor>& qmap2, c10::IntArrayRef steps) {
  TORCH_CHECK(optimizer == "adam" || optimizer == "momentum", op,
              ": optimizer must be adam (LAMB) or momentum (LARS), got ", optimizer);
  const bool adam = optimizer == "adam";
  const bool eight_bit = qmap1.has_value();
  TORCH_CHECK(!adam || qmap2.has_value() == eight_bit, op,
              ": qmap1 and qmap2 must both be given (8-bit states) or both be None (32-bit states)");
  const at::Tensor* q1 = eight_bit ? &*qmap1 : nullptr;
  const at::Tensor* q2 = eight_bit ? (adam ? &*qmap2 : q1) : nullptr;
  check_step_args(op, params, grads, state1, state2, absmax1, absmax2, q1, q2, steps, eight_bit);
  for (size_t i = 0; eight_bit && i < params.size(); ++i) {
    TORCH_CHECK(q1->device() == params[i].device() && q2->device() == params[i].device(), op,
                ": the maps must be on the parameters' device ", params[i].device(), ", got ", q1->device(), " and ",
                q2->device());
  }
  return adam;
}

inline optim::TwoState parse_two_state(const char* op, c10::string_view name) {
  if (name == "adam") return optim::TwoState::kAdam;  // (kAdam4bit: two_state4bit_step_'s "adam")
  if (name == "ademamix") return optim::TwoState::kAdEMAMix;
  TORCH_CHECK(false, op, ": optimizer must be adam or ademamix, got ", name);
}

inline optim::OneState parse_one_state(const char* op, c10::string_view name) {
  if (name == "momentum") return optim::OneState::kMomentum;
  if (name == "rmsprop") return optim::OneState::kRMSprop;
  if (name == "adagrad") return optim::OneState::kAdagrad;
  if (name == "lion") return optim::OneState::kLion;
  if (name == "muon") return optim::OneState::kMuon;
  TORCH_CHECK(false, op, ": optimizer must be one of momentum, rmsprop, adagrad, lion, muon, got ", name);
}

// The hyper-parameters of a step op, by name (beta3 and alpha are AdEMAMix's; the one-state ops pass 0).
struct StepHyper {
  double lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale;
};

// A step op's arguments as its launcher uses them, read and checked by read_step_call.
struct StepCall {
  bool two_state = true;
  int kind = 0;  // optim::TwoState (two_state) or optim::OneState
  bool eight_bit = false;
  std::vector<int64_t> steps;         // each parameter's step count after this step (1s when step_dev is set)
  const int64_t* step_dev = nullptr;  // a capturable CUDA step: the counts, read by the kernel
  const float* lr_dev = nullptr;      // an lr_tensor on the device, read by the kernel
  StepHyper hyper{};                  // hyper.lr is lr_tensor's value when that is on the host
  const float* qmap1 = nullptr;       // the maps of 8-bit states (a one-state op: qmap2 = qmap1)
  const float* qmap2 = nullptr;
  const float* norms = nullptr;  // the trust-ratio inputs (LAMB / LARS: update_norms' result), or nullptr
  double max_unorm = 0.0;
  int64_t round_seed = -1;
  bool robust_rounding = false;

  // Parameter i's scalars: the step's, its rounding and the trust-ratio bound. (The trust ratio itself needs the
  // norms: the CPU launcher applies it on the host, the CUDA kernel on the device.)
  optim::StepScalars scalars(size_t i) const {
    optim::StepScalars a =
        with_rounding(optim::make_step_scalars(steps[i], (float)hyper.lr, (float)hyper.beta1, (float)hyper.beta2,
                                               (float)hyper.eps, (float)hyper.weight_decay, (float)hyper.gnorm_scale,
                                               (float)hyper.beta3, (float)hyper.alpha),
                      round_seed, i, robust_rounding);
    a.max_unorm = (float)max_unorm;
    return a;
  }
};

// The one prologue of the four step ops, on every backend: the optimizer's name, the lists and states
// (check_step_args), the maps (on the parameters' device), the step counts and lr (host values; with device_values, a
// CUDA launcher's capturable step, also device tensors whose pointers the kernel reads), the trust-ratio inputs. A
// one-state op passes state1/absmax1/qmap1 again as state2/absmax2/qmap2; qmap1 == nullptr means 32-bit states.
inline StepCall read_step_call(const char* op, bool two_state, c10::string_view optimizer, at::TensorList params,
                               at::TensorList grads, at::TensorList state1, at::TensorList state2,
                               at::TensorList absmax1, at::TensorList absmax2, const at::Tensor* qmap1,
                               const at::Tensor* qmap2, const at::Tensor& steps, const StepHyper& hyper,
                               int64_t round_seed, const std::optional<at::Tensor>& norms, double max_unorm,
                               const std::optional<at::Tensor>& lr_tensor, bool robust_rounding, bool device_values,
                               int bits = 8) {
  StepCall call;
  call.two_state = two_state;
  call.eight_bit = qmap1 != nullptr;
  call.hyper = hyper;
  call.round_seed = round_seed;
  call.robust_rounding = robust_rounding;
  call.max_unorm = max_unorm;
  const size_t count = params.size();
  const at::Device device = params.empty() ? steps.device() : params[0].device();
  if (device_values && steps.is_cuda()) {
    TORCH_CHECK(steps.scalar_type() == at::kLong && steps.dim() == 1 && steps.numel() == static_cast<int64_t>(count) &&
                    steps.is_contiguous(),
                op, ": steps on the GPU (a capturable step) must be a contiguous 1-D int64 tensor of ", count,
                " step counts, got ", steps.scalar_type(), " of shape ", steps.sizes());
    TORCH_CHECK(count == 0 || steps.device() == device, op, ": steps must be on ", device, " or the CPU, got ",
                steps.device());
    call.steps.assign(count, 1);  // placeholders: the kernel reads the counts
    call.step_dev = steps.data_ptr<int64_t>();
  } else {
    call.steps = read_steps(op, steps, count);
  }
  if (device_values && lr_tensor.has_value() && lr_tensor->is_cuda()) {
    TORCH_CHECK(lr_tensor->scalar_type() == at::kFloat && lr_tensor->numel() == 1 &&
                    (count == 0 || lr_tensor->device() == device),
                op, ": an lr_tensor on the GPU must be one float32 value on the parameters' device, got ",
                lr_tensor->scalar_type(), " with ", lr_tensor->numel(), " values on ", lr_tensor->device());
    call.lr_dev = lr_tensor->data_ptr<float>();
  } else {
    call.hyper.lr = read_lr(op, hyper.lr, lr_tensor);
  }
  bool trust_ratio = false;  // the optimizers with a trust ratio: adam (LAMB) and momentum (LARS)
  int64_t moments1 = 1;
  if (bits == 4) {  // two_state4bit_step_: Adam only, no trust ratio, no robust rounding (the maps are the rule)
    TORCH_CHECK(optimizer == "adam", op, ": optimizer must be adam, got ", optimizer);
    TORCH_CHECK(!robust_rounding, op,
                ": robust_rounding does not apply to 4-bit states (their second-moment map has no zero)");
    call.kind = static_cast<int>(optim::TwoState::kAdam4bit);
  } else if (two_state) {
    const optim::TwoState kind = parse_two_state(op, optimizer);
    call.kind = static_cast<int>(kind);
    trust_ratio = kind == optim::TwoState::kAdam;
    moments1 = kind == optim::TwoState::kAdEMAMix ? 2 : 1;
  } else {
    const optim::OneState kind = parse_one_state(op, optimizer);
    call.kind = static_cast<int>(kind);
    trust_ratio = kind == optim::OneState::kMomentum;
  }
  check_step_args(op, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, call.steps, call.eight_bit,
                  moments1, bits);
  call.norms = check_norms(op, norms, max_unorm, count, trust_ratio, optimizer, device);
  if (call.eight_bit) {
    TORCH_CHECK(count == 0 || (qmap1->device() == device && qmap2->device() == device), op, ": the maps must be on ",
                device, ", got ", qmap1->device(), " and ", qmap2->device());
    call.qmap1 = qmap1->data_ptr<float>();
    call.qmap2 = qmap2->data_ptr<float>();
  }
  return call;
}

}  // namespace kestrel
