// The sampling walk of kestrel/tree_verify.h run the way the CUDA kernel runs it (kSegments threads, each owning one
// vocabulary segment and running the walk's scalar steps redundantly, with a barrier where the kernel has
// __syncthreads) gives the serial team's results on random trees, both draft modes. Built and run by
// tests/test_tree_verify.py (and clean under -fsanitize=thread: the barriers order every shared write and read).
#include <barrier>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>
#include "kestrel/tree_verify.h"
using namespace kestrel::tree;

// The CUDA block's team (TeamBlock in csrc/cuda/tree_verify.cu) with std::threads and a std::barrier.
struct TeamThreads {
  int64_t vocab; int tid; std::barrier<>* bar;
  bool leader() const { return tid == 0; }
  void sync() const { bar->arrive_and_wait(); }
  float sums(const Residual& w, float* seg) const {
    bar->arrive_and_wait();
    seg[tid] = segment_sum_of(w, vocab, tid);
    bar->arrive_and_wait();
    float total = 0.0f;
    for (int i = 0; i < kSegments; ++i) total += seg[i];
    return total;
  }
  template <typename Fn> void update(const Fn& fn) const {
    for (int64_t v = segment_begin(vocab, tid); v < segment_end(vocab, tid); ++v) fn(v);
  }
};

int main() {
  std::mt19937 rng(1);
  int failures = 0, cases = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int T = 1 + rng() % 20; const int64_t V = std::vector<int64_t>{5, 13, 300, 1000, 4099}[trial % 5];
    const bool sampled = trial % 2;
    std::vector<int32_t> parent(T), fc(T, -1), ns(T, -1);
    parent[0] = -1;
    for (int i = 1; i < T; ++i) parent[i] = rng() % i;
    for (int i = T - 1; i >= 1; --i) { ns[i] = fc[parent[i]]; fc[parent[i]] = i; }
    int maxd = 0; std::vector<int> depth(T, 0);
    for (int i = 1; i < T; ++i) { depth[i] = depth[parent[i]] + 1; maxd = std::max(maxd, depth[i]); }
    std::vector<int64_t> cand(T); for (auto& c : cand) c = rng() % 4;
    std::uniform_real_distribution<float> U(0.f, 1.f);
    std::vector<float> p(T * V), q(T * V), u(T);
    for (int i = 0; i < T; ++i) {
      float s = 0; for (int64_t v = 0; v < V; ++v) { q[i * V + v] = U(rng); s += q[i * V + v]; }
      for (int64_t v = 0; v < V; ++v) q[i * V + v] /= s;
      for (int64_t v = 0; v < V; ++v) p[i * V + v] = (rng() % 3 == 0) ? 0.f : U(rng) * (v < 4 ? 20.f : 1.f);
    }
    for (auto& x : u) x = U(rng);
    const float uf = U(rng);
    std::vector<float> scratch1(V), scratch2(V);
    SampleRow row{cand.data(), p.data(), sampled ? q.data() : nullptr, fc.data(), ns.data(), u.data(), uf,
                  scratch1.data(), T, V, maxd};
    std::vector<int32_t> ai1(maxd + 1), ai2(maxd + 1); int32_t al1, al2; int64_t nt1, nt2;
    std::vector<int64_t> ex1(T), ex2(T); float seg1[kSegments], seg2[kSegments];
    TeamSerial serial{V};
    verify_sample_row(serial, row, ex1.data(), seg1, ai1.data(), &al1, &nt1);
    SampleRow row2 = row; row2.scratch = scratch2.data();
    std::barrier<> bar(kSegments);
    std::vector<std::thread> threads;
    for (int t = 0; t < kSegments; ++t)
      threads.emplace_back([&, t] {
        TeamThreads team{V, t, &bar};
        verify_sample_row(team, row2, ex2.data(), seg2, ai2.data(), &al2, &nt2);
      });
    for (auto& th : threads) th.join();
    ++cases;
    if (ai1 != ai2 || al1 != al2 || nt1 != nt2) { ++failures; std::printf("mismatch trial %d\n", trial); }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
