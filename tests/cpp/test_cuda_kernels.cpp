// Every CUDA launcher of kestrel/launch.h, run on the CPU through tests/cuda_sim on random inputs, with its results
// checked against the serial form of the same framework-free code (the headers the CPU kernels share). No torch:
// built by CMake three ways (plain, -fsanitize=address, -fsanitize=thread) and run by ctest, so an out-of-bounds
// access of a kernel is an AddressSanitizer report and a shared-memory race (a missing __syncthreads) a
// ThreadSanitizer one; planted-defect builds check that each is caught (CMakeLists.txt).
// Usage: test_cuda_kernels [quantize|optim|tree|compact]... (default: all).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kestrel/launch.h"
#include "kestrel/launch_plan.h"
#include "kestrel/quantize.h"
#include "kestrel/tree_verify.h"

using namespace kestrel;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    if (failures <= 20) fprintf(stderr, "MISMATCH: %s\n", what.c_str());
  }
}

void check_launch(int error, const std::string& what) {
  check(error == cudaSuccess, what + ": launch failed");
}

std::vector<float> dynamic_map(bool is_signed) {
  // the shape of bnb's dynamic map: 0, and per decade i a few values 10^(i-6) * (0.1 .. 1), mirrored when signed
  std::vector<float> values{0.0f, 1.0f};
  for (int i = 0; i < 7 && (int)values.size() < 256; ++i) {
    const int count = is_signed ? (1 << i) + 1 : (1 << (i + 1)) + 1;
    for (int j = 0; j + 1 < count; ++j) {
      const float a = 0.1f + 0.9f * j / (count - 1), b = 0.1f + 0.9f * (j + 1) / (count - 1);
      const float v = (a + b) * 0.5f * powf(10.0f, (float)(i - 6));
      values.push_back(v);
      if (is_signed) values.push_back(-v);
    }
  }
  values.resize(256, 1.0f);
  std::sort(values.begin(), values.end());
  return values;
}

// ------------------------------------------------------------------------------------------------- quantize
void test_quantize(std::mt19937& rng) {
  const std::vector<float> code = dynamic_map(true);
  std::vector<float> midpoints(quant::kMidpointsSize);
  for (int j = 0; j < quant::kCodeSize - 1; ++j) midpoints[j] = quant::midpoint(code.data(), j);
  midpoints[quant::kCodeSize - 1] = INFINITY;
  std::normal_distribution<float> normal;
  for (const int64_t blocksize : {64, 256, 4096, 1, 100, 5000}) {
    for (const int64_t n : {int64_t(1), int64_t(257), 6 * blocksize + 5}) {
      std::vector<float> x(n);  // exactly n: a read past the end is an AddressSanitizer report
      for (auto& v : x) v = normal(rng);
      if (n > 10) x[3] = NAN, x[7] = INFINITY;
      const int64_t blocks = (n + blocksize - 1) / blocksize;
      std::vector<uint8_t> codes(n);
      std::vector<float> absmax(blocks);
      const cuda::QuantizeArgs qargs{x.data(), code.data(), codes.data(), absmax.data(), n, blocksize, blocks};
      check_launch(cuda::quantize_blockwise(DType::kFloat32, qargs, nullptr), "quantize");
      for (int64_t b = 0; b < blocks; ++b) {
        float expected = 0.0f;
        for (int64_t i = b * blocksize; i < std::min(n, (b + 1) * blocksize); ++i)
          expected = quant::finite_absmax_combine(expected, fabsf(x[i]));
        check(absmax[b] == expected,
              "quantize absmax, blocksize " + std::to_string(blocksize) + " block " + std::to_string(b));
        const quant::BlockScale scale = quant::block_scale(expected);
        for (int64_t i = b * blocksize; i < std::min(n, (b + 1) * blocksize); ++i) {
          const int want = quant::nearest_code_bsearch(midpoints.data(), quant::normalize(x[i], scale));
          check(codes[i] == want,
                "quantize code, blocksize " + std::to_string(blocksize) + " element " + std::to_string(i));
        }
      }
      std::vector<float> y(n);
      const cuda::DequantizeArgs dargs{
          codes.data(), absmax.data(), code.data(), y.data(), n, blocksize, cuda::dequantize_log2_blocksize(blocksize)};
      check_launch(cuda::dequantize_blockwise(DType::kFloat32, dargs, nullptr), "dequantize");
      for (int64_t i = 0; i < n; ++i)
        check(y[i] == quant::dequantize_value(code.data(), codes[i], absmax[i / blocksize]), "dequantize");
    }
  }
}

// ------------------------------------------------------------------------------------------------- optimizers
struct Tensors {  // one parameter's buffers, each exactly its size
  std::vector<float> p, g, f1, f2;
  std::vector<uint8_t> c1, c2;
  std::vector<float> a1, a2;
  std::vector<float> norms = std::vector<float>(2);
};

Tensors make_tensors(int64_t n, int moments1, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> code(0, 255);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const int64_t blocks = (n + 255) / 256;
  Tensors t;
  t.p.resize(n), t.g.resize(n), t.f1.resize(moments1 * n), t.f2.resize(n), t.c1.resize(moments1 * n), t.c2.resize(n);
  t.a1.resize(moments1 * blocks), t.a2.resize(blocks);
  for (auto& v : t.p) v = 0.1f * normal(rng);
  for (auto& v : t.g) v = 0.1f * normal(rng);
  if (n > 10) t.g[4] = NAN, t.g[9] = 3e19f;
  for (auto& v : t.f1) v = 0.01f * normal(rng);
  for (auto& v : t.f2) v = 1e-4f * unit(rng);
  for (auto& v : t.c1) v = (uint8_t)code(rng);
  for (auto& v : t.c2) v = (uint8_t)code(rng);
  for (auto& v : t.a1) v = unit(rng);
  for (auto& v : t.a2) v = unit(rng);
  return t;
}

// The metadata of a launch over `ts` (each parameter's own step), as the torch-facing launcher fills it.
std::vector<optim::TensorMeta> meta_of(std::vector<Tensors>& ts, bool eight_bit, bool two_state, int64_t* total) {
  std::vector<optim::TensorMeta> meta(ts.size());
  *total = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    optim::TensorMeta& m = meta[i];
    memset(&m, 0, sizeof(m));
    Tensors& t = ts[i];
    m.param = t.p.data(), m.grad = t.g.data(), m.numel = (int64_t)t.p.size(), m.first_block = *total;
    m.state1 = eight_bit ? (void*)t.c1.data() : (void*)t.f1.data();
    m.state2 = two_state ? (eight_bit ? (void*)t.c2.data() : (void*)t.f2.data()) : nullptr;
    m.absmax1 = eight_bit ? t.a1.data() : nullptr;
    m.absmax2 = eight_bit && two_state ? t.a2.data() : nullptr;
    m.norms_out = t.norms.data();
    m.scalars = optim::make_step_scalars(1 + (int64_t)i, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 1.0f, 0.9999f, 5.0f);
    m.scalars.robust_rounding = (int)(i % 2);
    *total += (m.numel + 255) / 256;
  }
  return meta;
}

bool same_tensors(const Tensors& a, const Tensors& b) {
  auto bits = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  return bits(a.p, b.p) && bits(a.f1, b.f1) && bits(a.f2, b.f2) && a.c1 == b.c1 && a.c2 == b.c2 && bits(a.a1, b.a1) &&
         bits(a.a2, b.a2) && bits(a.norms, b.norms);
}

// One launch over several tensors equals one launch per tensor: the metadata, the block offsets and the CTAs'
// split of the work do not change any element's result.
template <typename Launch>
void check_multi_tensor(const char* what, int moments1, bool eight_bit, bool two_state, std::mt19937& rng,
                        const Launch& launch) {
  const std::vector<int64_t> sizes{4097, 300, 1, 2050};  // partial blocks; 8 blocks per CTA: several CTAs
  std::vector<Tensors> together, alone;
  for (const int64_t n : sizes) together.push_back(make_tensors(n, moments1, rng));
  alone = together;
  int64_t total = 0;
  std::vector<optim::TensorMeta> meta = meta_of(together, eight_bit, two_state, &total);
  check_launch(launch(meta.data(), (int)meta.size(), total), what);
  for (size_t i = 0; i < alone.size(); ++i) {
    std::vector<Tensors> one{alone[i]};
    std::vector<optim::TensorMeta> single = meta_of(one, eight_bit, two_state, &total);
    single[0].scalars = meta[i].scalars;  // its own step and rounding mode, as in the joint launch
    check_launch(launch(single.data(), 1, total), what);
    check(same_tensors(one[0], together[i]),
          std::string(what) + ": tensor " + std::to_string(i) + " differs when launched alone");
  }
}

void test_optim(std::mt19937& rng) {
  const std::vector<float> signed_map = dynamic_map(true), unsigned_map = dynamic_map(false);
  const float* q1 = signed_map.data();
  const float* q2 = unsigned_map.data();
  for (const bool eight_bit : {true, false}) {
    for (const auto kind : {optim::TwoState::kAdam, optim::TwoState::kAdEMAMix}) {
      const int moments1 = kind == optim::TwoState::kAdEMAMix ? 2 : 1;
      check_multi_tensor("two_state_step", moments1, eight_bit, true, rng, [&](auto* meta, int count, int64_t total) {
        const cuda::StepArgs args{meta, count, total, q1, q2, nullptr};
        return cuda::step(DType::kFloat32, true, static_cast<int>(kind), eight_bit, args, nullptr);
      });
    }
    for (const auto kind : {optim::OneState::kMomentum, optim::OneState::kRMSprop, optim::OneState::kAdagrad,
                            optim::OneState::kLion, optim::OneState::kMuon}) {
      check_multi_tensor("one_state_step", 1, eight_bit, false, rng, [&](auto* meta, int count, int64_t total) {
        const cuda::StepArgs args{meta, count, total, q1, nullptr, nullptr};
        return cuda::step(DType::kFloat32, false, static_cast<int>(kind), eight_bit, args, nullptr);
      });
    }
    for (const bool adam : {true, false}) {
      check_multi_tensor("update_norms", 1, eight_bit, adam, rng, [&](auto* meta, int count, int64_t total) {
        std::vector<float> block_sums(2 * std::max<int64_t>(total, 1));
        const cuda::StepArgs args{meta, count, total, q1, adam ? q2 : nullptr, block_sums.data()};
        return cuda::update_norms(DType::kFloat32, adam, eight_bit, args, nullptr);
      });
    }
  }
}

// ------------------------------------------------------------------------------------------------- trees
struct Tree {
  std::vector<int32_t> first_child, next_sibling;
  int64_t max_depth = 0;
};

Tree random_tree(int T, std::mt19937& rng) {
  Tree t;
  t.first_child.assign(T, -1), t.next_sibling.assign(T, -1);
  std::vector<int32_t> parent(T, -1), depth(T, 0);
  for (int i = 1; i < T; ++i) parent[i] = (int32_t)(rng() % i), depth[i] = depth[parent[i]] + 1;
  for (int i = T - 1; i >= 1; --i) t.next_sibling[i] = t.first_child[parent[i]], t.first_child[parent[i]] = i;
  for (int i = 0; i < T; ++i) t.max_depth = std::max<int64_t>(t.max_depth, depth[i]);
  return t;
}

void test_tree(std::mt19937& rng) {
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (const auto& [B, T, V] : std::vector<std::tuple<int, int, int64_t>>{{3, 9, 40}, {2, 17, 3000}, {130, 5, 7}}) {
    std::vector<int64_t> candidates(B * T), target(B * T);
    std::vector<int32_t> first_child, next_sibling;
    int64_t max_depth = 0;
    std::vector<Tree> trees;
    for (int b = 0; b < B; ++b) {
      trees.push_back(random_tree(T, rng));
      max_depth = std::max(max_depth, trees[b].max_depth);
    }
    for (const Tree& t : trees) {
      first_child.insert(first_child.end(), t.first_child.begin(), t.first_child.end());
      next_sibling.insert(next_sibling.end(), t.next_sibling.begin(), t.next_sibling.end());
    }
    for (auto& c : candidates) c = rng() % 4;
    for (auto& c : target) c = rng() % 4;
    const int64_t W = max_depth + 1;
    std::vector<int32_t> ai(B * W), al(B), ai_ref(B * W), al_ref(B);
    std::vector<int64_t> nt(B), nt_ref(B);
    const cuda::VerifyGreedyArgs gargs{
        candidates.data(), target.data(), first_child.data(), next_sibling.data(), B, T, max_depth,
        ai.data(),         al.data(),     nt.data()};
    check_launch(cuda::verify_tree_greedy(gargs, nullptr), "verify_tree_greedy");
    for (int b = 0; b < B; ++b)
      tree::verify_greedy_row(candidates.data() + b * T, target.data() + b * T, first_child.data() + b * T,
                              next_sibling.data() + b * T, T, max_depth, ai_ref.data() + b * W, al_ref.data() + b,
                              nt_ref.data() + b);
    check(ai == ai_ref && al == al_ref && nt == nt_ref, "verify_tree_greedy");
    if (B > 3) continue;  // the sampling kernel: a CTA of 256 threads per row
    std::vector<float> probs(B * T * V), drafts(B * T * V), uniform(B * T), uniform_final(B), scratch(B * V);
    for (auto& p : probs) p = (rng() % 3 == 0) ? 0.0f : unit(rng);
    for (int r = 0; r < B * T; ++r) {
      float sum = 0.0f;
      for (int64_t v = 0; v < V; ++v) sum += (drafts[r * V + v] = unit(rng));
      for (int64_t v = 0; v < V; ++v) drafts[r * V + v] /= sum;
    }
    for (auto& u : uniform) u = unit(rng);
    for (auto& u : uniform_final) u = unit(rng);
    for (const bool sampled : {false, true}) {
      std::vector<int64_t> excluded(B * T);
      const cuda::VerifySampleArgs sargs{candidates.data(),
                                         probs.data(),
                                         sampled ? drafts.data() : nullptr,
                                         first_child.data(),
                                         next_sibling.data(),
                                         uniform.data(),
                                         uniform_final.data(),
                                         sampled ? scratch.data() : nullptr,
                                         excluded.data(),
                                         B,
                                         T,
                                         V,
                                         max_depth,
                                         ai.data(),
                                         al.data(),
                                         nt.data()};
      check_launch(cuda::verify_tree_sample(sargs, nullptr), "verify_tree_sample");
      std::vector<float> serial_scratch(V), seg(tree::kSegments);
      std::vector<int64_t> serial_excluded(T);
      for (int b = 0; b < B; ++b) {
        const tree::SampleRow row{candidates.data() + b * T,
                                  probs.data() + b * T * V,
                                  sampled ? drafts.data() + b * T * V : nullptr,
                                  first_child.data() + b * T,
                                  next_sibling.data() + b * T,
                                  uniform.data() + b * T,
                                  uniform_final[b],
                                  sampled ? serial_scratch.data() : nullptr,
                                  T,
                                  V,
                                  max_depth};
        tree::TeamSerial team{V};
        tree::verify_sample_row(team, row, serial_excluded.data(), seg.data(), ai_ref.data() + b * W, al_ref.data() + b,
                                nt_ref.data() + b);
      }
      check(ai == ai_ref && al == al_ref && nt == nt_ref, std::string("verify_tree_sample, sampled drafts: ") +
                                                              (sampled ? "yes" : "no") + ", V " + std::to_string(V));
    }
  }
}

// ------------------------------------------------------------------------------------------------- compaction
void test_compact(std::mt19937& rng) {
  const int64_t L = 2, B = 3, H = 2, Lmax = 12, D = 5;
  std::vector<float> k(L * B * H * Lmax * D), v(k.size());
  for (auto& x : k) x = (float)(rng() % 1000);
  for (auto& x : v) x = (float)(rng() % 1000);
  std::vector<float> k_ref = k, v_ref = v;
  std::vector<int32_t> lens{0, 4, 9}, accept{0, 2, 3, -1, 0, 1, -1, -1, 0, 1, 3, -1};  // row 2: 9 + 3 = Lmax: skipped
  const int64_t W = 4;
  const tree::CacheView kv{k.data(), B * H * Lmax * D, H * Lmax * D, Lmax * D, D, 1, D};
  const tree::CacheView vv{v.data(), B * H * Lmax * D, H * Lmax * D, Lmax * D, D, 1, D};
  std::vector<int32_t> new_lens = lens;
  const cuda::CompactArgs cargs{kv, vv, new_lens.data(), accept.data(), W, L, B, H, Lmax};
  check_launch(cuda::compact_kv_cache(4, cargs, nullptr), "compact_kv_cache");
  for (int64_t b = 0; b < B; ++b) {
    int64_t where;
    const bool ok = tree::check_compaction_row(accept.data() + b * W, W, lens[b], Lmax, &where) == tree::kRowOk;
    const int32_t accepted = tree::accepted_length(accept.data() + b * W, W);
    check(new_lens[b] == (ok ? lens[b] + 1 + accepted : lens[b]), "compact_kv_cache length " + std::to_string(b));
    if (!ok) continue;
    for (std::vector<float>* cache : {&k_ref, &v_ref})
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < H; ++h)
          for (int32_t j = 1; j <= accepted; ++j) {
            float* rows = cache->data() + ((l * B + b) * H + h) * Lmax * D + lens[b] * D;
            memmove(rows + j * D, rows + accept[b * W + j] * D, D * sizeof(float));
          }
  }
  check(k == k_ref && v == v_ref, "compact_kv_cache rows");
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(20261201);
  const auto wanted = [&](const char* name) {
    if (argc < 2) return true;
    for (int i = 1; i < argc; ++i)
      if (strcmp(argv[i], name) == 0) return true;
    return false;
  };
  if (wanted("quantize")) test_quantize(rng);
  if (wanted("optim")) test_optim(rng);
  if (wanted("tree")) test_tree(rng);
  if (wanted("compact")) test_compact(rng);
  if (failures) {
    fprintf(stderr, "%d mismatches\n", failures);
    return 1;
  }
  printf("all CUDA launchers ran on kestrel_sim and matched\n");
  return 0;
}
