// The one TORCH_LIBRARY(kestrel, m) with the schema of every C++ op, and the pybind11 module kestrel._C (build
// information). The Triton-backed ops (tree_attention, softplus_attention and its backward, vq_topk,
// kv_bottleneck_lookup) are declared beside their Python wrappers, each by kestrel.ops._library.triton_kernel_op,
// which infers the schema from the CUDA function's annotations (docs/architecture.md, "How ops are registered").
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "kestrel/common.h"
#if defined(KESTREL_WITH_CUDA)
#include "kestrel/launch.h"
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

TORCH_LIBRARY(kestrel, m) {
  // Block-wise dynamic quantization (docs/optim8bit.md, "The numeric format").
  m.def("quantize_blockwise(Tensor x, Tensor code, int blocksize) -> (Tensor codes, Tensor absmax)");
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");

  // One fused step of a two-state optimizer (bnb's Optimizer2State: optimizer "adam" — Adam/AdamW with decoupled
  // weight decay after the update — or "ademamix", whose state1 holds two first moments) for a list of
  // parameters of one dtype and device: 8-bit block-wise states (signed map qmap1, unsigned map qmap2, blocks of
  // 256) or float32 states. steps[i] is parameter i's step count after this step; beta3 and alpha are AdEMAMix's.
  m.def(
      "two_state8bit_step_(str optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, "
      "Tensor(c!)[] state2, Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor qmap2, Tensor steps, "
      "float lr, float beta1, float beta2, float beta3, float alpha, float eps, float weight_decay, "
      "float gnorm_scale, int round_seed=-1, Tensor? norms=None, float max_unorm=0.0, Tensor? lr_tensor=None, bool "
      "robust_rounding=False) -> ()");
  // Adam with 4-bit states (kestrel.optim.AdamW4bit; kestrel/optim.h "4-bit states"): optimizer "adam"; state1 /
  // state2 uint8 of ceil(n / 2) bytes (two codes each), absmax1 / absmax2 ceil(n / 128) floats, 16-entry maps.
  m.def(
      "two_state4bit_step_(str optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, "
      "Tensor(c!)[] state2, Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor qmap2, Tensor steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, float gnorm_scale, int round_seed=-1, "
      "Tensor? lr_tensor=None) -> ()");
  m.def(
      "two_state32bit_step_(str optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, "
      "Tensor(c!)[] state2, Tensor steps, float lr, float beta1, float beta2, float beta3, float alpha, float eps, "
      "float weight_decay, float gnorm_scale, int round_seed=-1, Tensor? norms=None, float max_unorm=0.0, Tensor? "
      "lr_tensor=None, bool robust_rounding=False) -> ()");
  // The same for the one-state optimizers (bnb's Optimizer1State): optimizer is "momentum" (SGD), "rmsprop",
  // "adagrad", "lion" or "muon"; an 8-bit state1 uses the signed map qmap1. "muon" (Muon's momentum) writes each
  // element's update beta1 * m + (1 - beta1) * g into params (the update buffers), m = beta2 * m + (1 - beta2) * g;
  // elements with a non-finite gradient keep their buffer's value.
  m.def(
      "one_state8bit_step_(str optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, "
      "Tensor(c!)[] absmax1, Tensor qmap1, Tensor steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float gnorm_scale, int round_seed=-1, Tensor? norms=None, float max_unorm=0.0, Tensor? "
      "lr_tensor=None, bool robust_rounding=False) -> ()");
  m.def(
      "one_state32bit_step_(str optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, float gnorm_scale, int round_seed=-1, "
      "Tensor? norms=None, float max_unorm=0.0, Tensor? lr_tensor=None, bool robust_rounding=False) -> ()");
  // steps: a 1-D CPU int64 tensor, each parameter's step count after this step. lr_tensor (a one-element CPU
  // float tensor), when given, replaces lr (an LR schedule without recompiling a compiled step).
  // round_seed >= 0 (all four ops): bf16 parameters round stochastically (unbiased), deterministic given the seed.
  // robust_rounding (8-bit states): quantization never enlarges an update (kestrel/optim.h round_numerator_code).
  // norms (update_norms' result) with max_unorm > 0: LAMB ("adam") and LARS ("momentum") scale each parameter's
  // update by the trust ratio min(1, max_unorm * ||p|| / ||update||) (kestrel/optim.h, "trust ratio").
  // The norm pass of LAMB / LARS, before their step: per parameter {sum of squares of the update direction, sum of
  // squares of the parameter}, float32 (count, 2), reduced in one fixed order on every device. optimizer is "adam"
  // or "momentum" (state2/absmax2 repeat state1/absmax1); 8-bit states when qmap1 is given.
  m.def(
      "update_norms(str optimizer, Tensor[] params, Tensor[] grads, Tensor[] state1, Tensor[] state2, "
      "Tensor[] absmax1, Tensor[] absmax2, Tensor? qmap1, Tensor? qmap2, Tensor steps, float beta1, float beta2, "
      "float eps, float weight_decay, float gnorm_scale) -> Tensor");

  // Paged optimizer state (CUDA only): a zero-filled tensor in CUDA managed memory on the device of `like` (never
  // more than the device has free), and an asynchronous prefetch of managed tensors to their device.
  m.def("managed_zeros(Tensor like, int[] size, ScalarType dtype) -> Tensor");

  // The identical codes of every head of a codebook (H, C, d) (kestrel/ops/vq_topk.py, duplicate_groups): alias,
  // members, start, size (H, C) each. CPU only (the CUDA path runs the PyTorch twin).
  m.def(
      "duplicate_groups(Tensor codebook, Tensor? banned) -> (Tensor alias, Tensor members, Tensor start, Tensor size)");
  m.def("prefetch(Tensor[] tensors) -> ()");

  // Draft-tree verification (docs/tree_verification.md; walks and rounding in kestrel/tree_verify.h). The tree is
  // given by first_child / next_sibling (B, T) int32 (kestrel.decoding.build_tree); accept_index has max_depth + 1
  // columns.
  m.def(
      "verify_tree_greedy(Tensor candidates, Tensor target_ids, Tensor first_child, Tensor next_sibling, "
      "int max_depth) -> (Tensor accept_index, Tensor accept_len, Tensor next_token)");
  m.def(
      "verify_tree_sample(Tensor candidates, Tensor target_probs, Tensor first_child, Tensor next_sibling, "
      "Tensor uniform, Tensor uniform_final, Tensor? draft_probs, int max_depth) -> (Tensor accept_index, "
      "Tensor accept_len, Tensor next_token)");
  // Moves the accepted nodes' K/V rows (cache rows len + accept_index[b, j]) to rows len + j and adds
  // 1 + accept_len (from accept_index) to cache_seqlens, in place. Caches (B, H, Lmax, D) or (NL, B, H, Lmax, D).
  m.def(
      "compact_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) cache_seqlens, Tensor accept_index) "
      "-> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(KESTREL_VERSION)
  info["version"] = KESTREL_STR(KESTREL_VERSION);
#else
  info["version"] = "unknown";
#endif
  info["torch_version"] = TORCH_VERSION;
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(KESTREL_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = KESTREL_STR(KESTREL_CUDA_VERSION);
  info["cuda_archs"] = kestrel::cuda::compiled_archs();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = "";
#endif
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  return info;
}

}  // namespace

namespace kestrel {
void register_jit_bindings(pybind11::module_& m);  // csrc/jit_ops.cpp: the JIT path's host half
// csrc/cpu/optim.cpp; weak: the CUDA-on-CPU test build (tests/cuda_sim) compiles this file without the CPU kernels
__attribute__((weak)) std::vector<int64_t> requantize_check(const std::vector<float>& map, const std::string& isa);
__attribute__((weak)) std::vector<int64_t> round_check(const std::string& isa, const std::string& dtype);
__attribute__((weak)) std::vector<int64_t> requantize_states_check(const std::vector<float>& map,
                                                                   const std::string& isa,
                                                                   const std::vector<float>& states,
                                                                   const std::vector<float>& absmax);
}  // namespace kestrel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kestrel native extension: registers the kestrel:: ops with PyTorch's dispatcher";
  m.def("build_info", &build_info, "How this extension was built: version, torch, OpenMP, CUDA and its archs.");
  m.def(
      "cpu_isa", [] { return kestrel::cpu::isa_name(kestrel::cpu::active_isa()); },
      "The vector path of the CPU optimizer kernels in this call: avx512bf16, avx512vbmi, avx512, avx2 or scalar "
      "(KESTREL_CPU_ISA caps it).");
  m.def(
      "_requantize_check",
      [](const std::vector<float>& map, const std::string& isa) {
        TORCH_CHECK(&kestrel::requantize_check != nullptr, "this build has no CPU optimizer kernels");
        return kestrel::requantize_check(map, isa);
      },
      pybind11::arg("map"), pybind11::arg("isa"),
      "For tests: the vector requantization of `isa` (avx512bf16, avx512vbmi, avx512, avx2) against the scalar "
      "definition on "
      "every float32 bit pattern in [-1, 1], with each rounding: [values, mismatches, bits of the first mismatch].");
  m.def(
      "_requantize_states_check",
      [](const std::vector<float>& map, const std::string& isa, const std::vector<float>& states,
         const std::vector<float>& absmax) {
        TORCH_CHECK(&kestrel::requantize_states_check != nullptr, "this build has no CPU optimizer kernels");
        return kestrel::requantize_states_check(map, isa, states, absmax);
      },
      pybind11::arg("map"), pybind11::arg("isa"), pybind11::arg("states"), pybind11::arg("absmax"),
      "For tests: the kernels' requantization of `states` (groups of 64, one absmax each) on `isa` against the "
      "definition with the division, with each rounding: [values, mismatches, index of the first mismatch, values "
      "whose product with 1 / absmax alone would take another code].");
  m.def(
      "_round_check",
      [](const std::string& isa, const std::string& dtype) {
        TORCH_CHECK(&kestrel::round_check != nullptr, "this build has no CPU optimizer kernels");
        return kestrel::round_check(isa, dtype);
      },
      pybind11::arg("isa"), pybind11::arg("dtype"),
      "For tests: the parameter rounding of `isa`'s vector stores (dtype 'bfloat16' or 'float16') against c10's "
      "conversion on every float32 bit pattern: [values, mismatches, bits of the first mismatch].");
  kestrel::register_jit_bindings(m);
}
