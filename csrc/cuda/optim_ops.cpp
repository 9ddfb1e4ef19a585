// The native CUDA registrations of the fused optimizer ops (two_state8bit_step_, two_state32bit_step_,
// one_state8bit_step_, one_state32bit_step_, update_norms): the op bodies of csrc/optim_op.h (checks, per-parameter
// metadata copied asynchronously on the current stream, one step-kernel launch for all parameters of a call) with the
// NativeLauncher (the kernels in optim.cu). Compiled by the host compiler.
#include <torch/library.h>

#include "../optim_op.h"
#include "native_launcher.h"

namespace kestrel {
namespace {

at::Tensor update_norms_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                             at::TensorList absmax2, const std::optional<at::Tensor>& qmap1,
                             const std::optional<at::Tensor>& qmap2, const at::Tensor& steps, double beta1,
                             double beta2, double eps, double weight_decay, double gnorm_scale) {
  NativeLauncher launcher;
  return update_norms_op(launcher, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps,
                         beta1, beta2, eps, weight_decay, gnorm_scale);
}

void two_state8bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                             at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                             const at::Tensor& steps, double lr, double beta1, double beta2, double beta3, double alpha,
                             double eps, double weight_decay, double gnorm_scale, int64_t round_seed,
                             const std::optional<at::Tensor>& norms, double max_unorm,
                             const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  NativeLauncher launcher;
  two_state8bit_step_op(launcher, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, lr,
                        beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, round_seed, norms, max_unorm,
                        lr_tensor, robust_rounding);
}

void two_state4bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, at::TensorList state2, at::TensorList absmax1,
                             at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                             const at::Tensor& steps, double lr, double beta1, double beta2, double eps,
                             double weight_decay, double gnorm_scale, int64_t round_seed,
                             const std::optional<at::Tensor>& lr_tensor) {
  NativeLauncher launcher;
  two_state4bit_step_op(launcher, optimizer, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, lr,
                        beta1, beta2, eps, weight_decay, gnorm_scale, round_seed, lr_tensor);
}

void two_state32bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                              at::TensorList state1, at::TensorList state2, const at::Tensor& steps, double lr,
                              double beta1, double beta2, double beta3, double alpha, double eps, double weight_decay,
                              double gnorm_scale, int64_t round_seed, const std::optional<at::Tensor>& norms,
                              double max_unorm, const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  NativeLauncher launcher;
  two_state32bit_step_op(launcher, optimizer, params, grads, state1, state2, steps, lr, beta1, beta2, beta3, alpha, eps,
                         weight_decay, gnorm_scale, round_seed, norms, max_unorm, lr_tensor, robust_rounding);
}

void one_state8bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                             at::TensorList state1, at::TensorList absmax1, const at::Tensor& qmap1,
                             const at::Tensor& steps, double lr, double beta1, double beta2, double eps,
                             double weight_decay, double gnorm_scale, int64_t round_seed,
                             const std::optional<at::Tensor>& norms, double max_unorm,
                             const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  NativeLauncher launcher;
  one_state8bit_step_op(launcher, optimizer, params, grads, state1, absmax1, qmap1, steps, lr, beta1, beta2, eps,
                        weight_decay, gnorm_scale, round_seed, norms, max_unorm, lr_tensor, robust_rounding);
}

void one_state32bit_step_cuda(c10::string_view optimizer, at::TensorList params, at::TensorList grads,
                              at::TensorList state1, const at::Tensor& steps, double lr, double beta1, double beta2,
                              double eps, double weight_decay, double gnorm_scale, int64_t round_seed,
                              const std::optional<at::Tensor>& norms, double max_unorm,
                              const std::optional<at::Tensor>& lr_tensor, bool robust_rounding) {
  NativeLauncher launcher;
  one_state32bit_step_op(launcher, optimizer, params, grads, state1, steps, lr, beta1, beta2, eps, weight_decay,
                         gnorm_scale, round_seed, norms, max_unorm, lr_tensor, robust_rounding);
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CUDA, m) {
  m.impl("update_norms", &update_norms_cuda);
  m.impl("two_state8bit_step_", &two_state8bit_step_cuda);
  m.impl("two_state4bit_step_", &two_state4bit_step_cuda);
  m.impl("two_state32bit_step_", &two_state32bit_step_cuda);
  m.impl("one_state8bit_step_", &one_state8bit_step_cuda);
  m.impl("one_state32bit_step_", &one_state32bit_step_cuda);
}

}  // namespace kestrel
