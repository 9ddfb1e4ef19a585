// CPU kernels of the fused Adam/AdamW step with 8-bit block-wise or 32-bit states: OpenMP over 256-element blocks,
// the per-element math of kestrel/optim.h, no tensor-sized temporaries.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../optim_checks.h"
#include "code_table.h"
#include "cpu_utils.h"
#include "kestrel/optim.h"
#include "optim_avx512.h"

namespace kestrel {
namespace {

using cpu::CodeTable;
using optim::AdamScalars;
using optim::kBlockSize;

template <typename T>
KESTREL_ALWAYS_INLINE void adam8bit_blocks(T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ c1,
                                           uint8_t* __restrict__ c2, float* __restrict__ absmax1,
                                           float* __restrict__ absmax2, int64_t n, const AdamScalars& a,
                                           const CodeTable& q1, const CodeTable& q2, int64_t first, int64_t end) {
  float s1[kBlockSize], s2[kBlockSize];
  int finite[kBlockSize];
  for (int64_t b = first; b < end; ++b) {
    const int64_t begin = b * kBlockSize;
    const int len = (int)std::min<int64_t>(kBlockSize, n - begin);
    const float old_max1 = absmax1[b], old_max2 = absmax2[b];
    float max1 = 0.0f, max2 = 0.0f;
    for (int i = 0; i < len; ++i) {
      const float grad = static_cast<float>(g[begin + i]) * a.gnorm_scale;
      float m1 = quant::dequantize_value(q1.code, c1[begin + i], old_max1);
      float m2 = quant::dequantize_value(q2.code, c2[begin + i], old_max2);
      optim::adam_moments(a, grad, m1, m2);
      const int ok = optim::is_finite(grad);
      m1 = ok ? m1 : 0.0f;
      m2 = ok ? m2 : 0.0f;
      s1[i] = m1;
      s2[i] = m2;
      finite[i] = ok;
      max1 = std::fabs(m1) > max1 ? std::fabs(m1) : max1;
      max2 = std::fabs(m2) > max2 ? std::fabs(m2) : max2;
    }
    absmax1[b] = max1;
    absmax2[b] = max2;
    for (int i = 0; i < len; ++i) {
      const T old_p = p[begin + i];
      T new_p = static_cast<T>(optim::adam_param_update(a, static_cast<float>(old_p), s1[i], s2[i]));
      if (a.apply_decay) new_p = static_cast<T>(static_cast<float>(new_p) * a.decay);
      p[begin + i] = finite[i] ? new_p : old_p;
    }
    for (int i = 0; i < len; ++i) {
      const float v1 = optim::normalize_state(s1[i], max1);
      c1[begin + i] = static_cast<uint8_t>(quant::apply_sign_fix(q1.code, q1.nearest(v1), v1));
      c2[begin + i] = static_cast<uint8_t>(q2.nearest(optim::normalize_state(s2[i], max2)));
    }
  }
}

// bnb's 32-bit kernel: an element with a NaN/Inf gradient is skipped (parameter and states unchanged).
template <typename T>
KESTREL_ALWAYS_INLINE void adam32bit_blocks(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ s1,
                                            float* __restrict__ s2, int64_t n, const AdamScalars& a, int64_t first,
                                            int64_t end) {
  const int64_t stop = std::min(n, end * kBlockSize);
  for (int64_t i = first * kBlockSize; i < stop; ++i) {
    const float grad = static_cast<float>(g[i]) * a.gnorm_scale;
    float m1 = s1[i], m2 = s2[i];
    optim::adam_moments(a, grad, m1, m2);
    T new_p = static_cast<T>(optim::adam_param_update(a, static_cast<float>(p[i]), m1, m2));
    if (a.apply_decay) new_p = static_cast<T>(static_cast<float>(new_p) * a.decay);
    const bool ok = optim::is_finite(grad);
    s1[i] = ok ? m1 : s1[i];
    s2[i] = ok ? m2 : s2[i];
    p[i] = ok ? new_p : p[i];
  }
}

#define KESTREL_DEFINE_ADAM_CPU(SUFFIX, T)                                                                         \
  KESTREL_CPU_CLONES void adam8bit_blocks_##SUFFIX(T* p, const T* g, uint8_t* c1, uint8_t* c2, float* absmax1,     \
                                                   float* absmax2, int64_t n, const AdamScalars& a,               \
                                                   const CodeTable& q1, const CodeTable& q2, int64_t first,       \
                                                   int64_t end) {                                                 \
    adam8bit_blocks<T>(p, g, c1, c2, absmax1, absmax2, n, a, q1, q2, first, end);                                 \
  }                                                                                                               \
  KESTREL_CPU_CLONES void adam32bit_blocks_##SUFFIX(T* p, const T* g, float* s1, float* s2, int64_t n,            \
                                                    const AdamScalars& a, int64_t first, int64_t end) {           \
    adam32bit_blocks<T>(p, g, s1, s2, n, a, first, end);                                                          \
  }
KESTREL_DEFINE_ADAM_CPU(f32, float)
KESTREL_DEFINE_ADAM_CPU(f16, c10::Half)
KESTREL_DEFINE_ADAM_CPU(bf16, c10::BFloat16)
#undef KESTREL_DEFINE_ADAM_CPU

template <typename T>
struct AdamCpu;
#define KESTREL_ADAM_CPU_TRAITS(SUFFIX, T)                                               \
  template <>                                                                            \
  struct AdamCpu<T> {                                                                    \
    template <typename... Args>                                                          \
    static void eight(Args... args) { adam8bit_blocks_##SUFFIX(args...); }                \
    template <typename... Args>                                                          \
    static void thirty_two(Args... args) { adam32bit_blocks_##SUFFIX(args...); }          \
  };
KESTREL_ADAM_CPU_TRAITS(f32, float)
KESTREL_ADAM_CPU_TRAITS(f16, c10::Half)
KESTREL_ADAM_CPU_TRAITS(bf16, c10::BFloat16)
#undef KESTREL_ADAM_CPU_TRAITS

template <typename Fn>
void dispatch_float(c10::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "unreachable dtype ", dtype);
  }
}

void adam8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                       at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
                       const at::Tensor& qmap2, c10::IntArrayRef steps, double lr, double beta1, double beta2,
                       double eps, double weight_decay, double gnorm_scale) {
  check_adam_args("adam8bit_step_", params, grads, state1, state2, absmax1, absmax2, &qmap1, &qmap2, steps, true);
  const auto q1 = cpu::code_table_for(qmap1.data_ptr<float>());
  const auto q2 = cpu::code_table_for(qmap2.data_ptr<float>());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    const AdamScalars a = optim::make_adam_scalars(steps[i], (float)lr, (float)beta1, (float)beta2, (float)eps,
                                                   (float)weight_decay, (float)gnorm_scale);
    dispatch_float(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* p = params[i].data_ptr<T>();
      const T* g = grads[i].data_ptr<T>();
      uint8_t* c1 = state1[i].data_ptr<uint8_t>();
      uint8_t* c2 = state2[i].data_ptr<uint8_t>();
      float* m1 = absmax1[i].data_ptr<float>();
      float* m2 = absmax2[i].data_ptr<float>();
#if defined(KESTREL_HAVE_AVX512_PATH)
      // The vector path needs the dynamic maps' one-comparison bucket search; a partial last block stays scalar.
      if (cpu::avx512::supported() && q1->bucket_steps == 1 && q2->bucket_steps == 1) {
        const int64_t full = n / kBlockSize;
        cpu::parallel_over_blocks(n, full, [&](int64_t first, int64_t end) {
          cpu::avx512::adam8bit_full_blocks<T>(p, g, c1, c2, m1, m2, a, *q1, *q2, first, end);
        });
        if (full * kBlockSize < n) AdamCpu<T>::eight(p, g, c1, c2, m1, m2, n, a, *q1, *q2, full, full + 1);
        return;
      }
#endif
      cpu::parallel_over_blocks(n, optim_num_blocks(n), [&](int64_t first, int64_t end) {
        AdamCpu<T>::eight(p, g, c1, c2, m1, m2, n, a, *q1, *q2, first, end);
      });
    });
  }
}

void adam32bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                        c10::IntArrayRef steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                        double gnorm_scale) {
  check_adam_args("adam32bit_step_", params, grads, state1, state2, {}, {}, nullptr, nullptr, steps, false);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    const AdamScalars a = optim::make_adam_scalars(steps[i], (float)lr, (float)beta1, (float)beta2, (float)eps,
                                                   (float)weight_decay, (float)gnorm_scale);
    dispatch_float(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* p = params[i].data_ptr<T>();
      const T* g = grads[i].data_ptr<T>();
      float* s1 = state1[i].data_ptr<float>();
      float* s2 = state2[i].data_ptr<float>();
      cpu::parallel_over_blocks(n, optim_num_blocks(n), [&](int64_t first, int64_t end) {
        AdamCpu<T>::thirty_two(p, g, s1, s2, n, a, first, end);
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("adam8bit_step_", &adam8bit_step_cpu);
  m.impl("adam32bit_step_", &adam32bit_step_cpu);
}

}  // namespace kestrel
