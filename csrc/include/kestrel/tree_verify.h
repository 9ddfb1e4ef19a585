// Draft-tree verification and KV-cache compaction (docs/tree_verification.md): the per-row walks, written once for the
// CPU kernels and the CUDA kernels. Framework-free: raw pointers, no torch headers.
//
// A tree row is given by first_child / next_sibling (T int32 each, -1 = none; children in increasing node index).
// Both walks start at the root (node 0) and move to an accepted child until none is accepted; they write
// accept_index[0 .. depth] (root first, the rest of the row keeps -1), accept_len and next_token.
//
// The sampling walk (verify_sample_row) is written against a `Team`: one CPU thread (TeamSerial below) or the
// threads of one CUDA block (tree_verify.cu), which all run the walk's scalar steps redundantly and split only the
// passes over the vocabulary. Every float sum over the vocabulary has one canonical order, so the CPU, the CUDA
// kernel and the Python reference (kestrel/reference/tree_verify.py) take the same decisions bit for bit:
//   * the vocabulary is split into kSegments contiguous segments of L = ceil(V / kSegments) tokens;
//   * a segment's sum adds its weights in token order, starting from 0.0f;
//   * the total adds the kSegments segment sums in segment order, starting from 0.0f.
// No operation here may be contracted into a fused multiply-add (the build passes -ffp-contract=off and
// --fmad=false; the products below also use mul_rn).
#pragma once

#include "kestrel/common.h"

namespace kestrel {
namespace tree {

constexpr int kSegments = 256;  // also the CUDA block size of the sampling kernel: one segment per thread

KESTREL_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KESTREL_HD int64_t segment_length(int64_t vocab) {
  return (vocab + kSegments - 1) / kSegments;
}

KESTREL_HD int64_t segment_begin(int64_t vocab, int s) {
  const int64_t b = segment_length(vocab) * s;
  return b < vocab ? b : vocab;
}

KESTREL_HD int64_t segment_end(int64_t vocab, int s) {
  return segment_begin(vocab, s + 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Greedy: from the root, move to the first child (lowest node index) whose candidate equals the target's argmax at
// the current node. Writes all max_depth + 1 entries of accept_index (-1 after the path).
KESTREL_HD void verify_greedy_row(const int64_t* candidates, const int64_t* target_ids, const int32_t* first_child,
                                  const int32_t* next_sibling, int64_t num_nodes, int64_t max_depth,
                                  int32_t* accept_index, int32_t* accept_len, int64_t* next_token) {
  int32_t node = 0;
  int64_t depth = 0;
  accept_index[0] = 0;
  while (depth < max_depth) {
    const int64_t want = target_ids[node];
    int32_t child = first_child[node];
    // (the step count only guards against malformed sibling lists: a node has fewer than num_nodes children)
    for (int64_t steps = 0; child >= 0 && child < num_nodes && candidates[child] != want; ++steps)
      child = steps < num_nodes ? next_sibling[child] : -1;
    if (child < 0 || child >= num_nodes) break;
    node = child;
    accept_index[++depth] = child;
  }
  for (int64_t j = depth + 1; j <= max_depth; ++j) accept_index[j] = -1;
  *accept_len = static_cast<int32_t>(depth);
  *next_token = target_ids[node];
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling (lossless). At the current node n, p = target_probs[n] (nonnegative weights, need not sum to 1) and M its
// canonical total. The children x of n are tried in order; child c uses the random number uniform[c] (so each
// node's uniform is used at most once: when it is tried as a child), except that a child whose token equals an
// earlier sibling's token (or lies outside [0, V)) is rejected without using its uniform: the earlier sibling was
// rejected, and a rejected token has no mass left in the residual.
//   deterministic drafts (no draft_probs): accept iff uniform[c] * M < p(x); on rejection p(x) <- 0, M <- M - p(x).
//   sampled drafts (q = draft_probs[n], a distribution the children were drawn from i.i.d.): accept iff
//     (uniform[c] * q(x)) * M < p(x), i.e. with probability min(1, (p(x)/M) / q(x)); on every rejection, duplicates
//     included (as for any fresh draw from q), p <- max(0, p - q * M) elementwise (kept in the row's scratch, V
//     floats) and M <- its canonical total.
// If no child is accepted (or n has none), next_token is drawn from the residual p by inverse CDF in token order:
// t = uniform_final * M; the first segment s whose running total (segment sums added in order) exceeds t, then the
// first token v of s with weight > 0 where (total before s) + (weights of s up to v, added in order) exceeds t; if
// rounding leaves no such token, the last token of s with weight > 0. If M is not > 0 (all weights zero or NaN),
// next_token is the argmax of target_probs[n] (lowest index among equals).

struct SampleRow {
  const int64_t* candidates;    // (T,)
  const float* target_probs;    // (T, V)
  const float* draft_probs;     // (T, V) or nullptr (deterministic drafts)
  const int32_t* first_child;   // (T,)
  const int32_t* next_sibling;  // (T,)
  const float* uniform;         // (T,)
  float uniform_final;
  float* scratch;  // (V,): the sampled-draft residual; unused with deterministic drafts
  int64_t num_nodes;
  int64_t vocab;
  int64_t max_depth;
};

// Weights of the residual at the current node: with sampled drafts after a rejection, the scratch row; otherwise
// target_probs[n] with the tokens rejected at n (deterministic drafts) set to 0.
struct Residual {
  const float* probs;
  const int64_t* excluded;  // rejected tokens of the current node (deterministic drafts), num_excluded of them
  int num_excluded;
  KESTREL_HD float operator()(int64_t v) const {
    for (int i = 0; i < num_excluded; ++i)
      if (excluded[i] == v) return 0.0f;
    return probs[v];
  }
};

// The canonical sum of segment s of the residual; segments without an excluded token skip the per-token check.
KESTREL_HD float segment_sum_of(const Residual& weight, int64_t vocab, int s) {
  const int64_t begin = segment_begin(vocab, s), end = segment_end(vocab, s);
  bool touched = false;
  for (int e = 0; e < weight.num_excluded; ++e) touched |= weight.excluded[e] >= begin && weight.excluded[e] < end;
  float sum = 0.0f;
  if (touched) {
    for (int64_t v = begin; v < end; ++v) sum += weight(v);
  } else {
    for (int64_t v = begin; v < end; ++v) sum += weight.probs[v];
  }
  return sum;
}

// The canonical segment sum of weight(v) over [begin, end).
template <typename Weight>
KESTREL_HD float segment_sum(const Weight& weight, int64_t begin, int64_t end) {
  float sum = 0.0f;
  for (int64_t v = begin; v < end; ++v) sum += weight(v);
  return sum;
}

// Inverse CDF over the residual with segment sums `seg` (kSegments of them) and total `total` > 0.
template <typename Weight>
KESTREL_HD int64_t inverse_cdf(const Weight& weight, const float* seg, float total, float u, int64_t vocab) {
  const float target = mul_rn(u, total);
  float before = 0.0f;
  int s = 0;
  for (; s < kSegments; ++s) {
    const float after = before + seg[s];
    if (target < after) break;
    before = after;
  }
  if (s == kSegments) {  // u * total rounded up to total: the last segment with mass
    s = kSegments - 1;
    while (s > 0 && !(seg[s] > 0.0f)) --s;
  }
  const int64_t begin = segment_begin(vocab, s), end = segment_end(vocab, s);
  float running = before;
  int64_t last_positive = -1;
  for (int64_t v = begin; v < end; ++v) {
    const float w = weight(v);
    running += w;
    if (w > 0.0f) {
      if (target < running) return v;
      last_positive = v;
    }
  }
  return last_positive >= 0 ? last_positive : begin;
}

// The first index of the largest value of probs[0, vocab) (NaN never wins).
KESTREL_HD int64_t argmax_first(const float* probs, int64_t vocab) {
  int64_t best = 0;
  for (int64_t v = 1; v < vocab; ++v)
    if (probs[v] > probs[best]) best = v;
  return best;
}

// True if an earlier sibling of `child` (children of the same parent, from first) carries the same token.
KESTREL_HD bool duplicate_of_earlier_sibling(const SampleRow& row, int32_t first, int32_t child) {
  const int64_t token = row.candidates[child];
  int64_t steps = 0;
  for (int32_t c = first; c != child && c >= 0 && c < row.num_nodes && steps < row.num_nodes;
       c = row.next_sibling[c], ++steps)
    if (row.candidates[c] == token) return true;
  return false;
}

// Team interface: `sums(weight, seg)` fills seg[0, kSegments) with the canonical segment sums (this member's
// segments), synchronises, and returns the canonical total (every member gets it); `update(fn)` runs fn(v) for each
// token of this member's segments; `sync()`; `leader()` is true for exactly one member.
template <typename Team>
KESTREL_HD void verify_sample_row(Team& team, const SampleRow& row, int64_t* excluded_buf, float* seg,
                                  int32_t* accept_index, int32_t* accept_len, int64_t* next_token) {
  const bool sampled = row.draft_probs != nullptr;
  int32_t node = 0;
  int64_t depth = 0;
  if (team.leader()) accept_index[0] = 0;
  for (;;) {
    const float* p = row.target_probs + node * row.vocab;
    const float* q = sampled ? row.draft_probs + node * row.vocab : nullptr;
    Residual residual{p, excluded_buf, 0};
    float total = team.sums(residual, seg);
    bool in_scratch = false;  // sampled drafts: the residual lives in row.scratch after the first rejection
    int32_t accepted = -1;
    const int32_t first = row.first_child[node];
    if (depth < row.max_depth) {
      int64_t steps = 0;
      for (int32_t child = first; child >= 0 && child < row.num_nodes && steps < row.num_nodes;
           child = row.next_sibling[child], ++steps) {
        const int64_t x = row.candidates[child];
        // A duplicate of an earlier (hence rejected) sibling, or a token outside the vocabulary, has no mass:
        // rejected without using its uniform.
        const bool tested = x >= 0 && x < row.vocab && !duplicate_of_earlier_sibling(row, first, child);
        if (tested) {
          const float px = in_scratch ? row.scratch[x] : p[x];
          const float u = row.uniform[child];
          const float bound = sampled ? mul_rn(mul_rn(u, q[x]), total) : mul_rn(u, total);
          if (bound < px) {
            accepted = child;
            break;
          }
          if (!sampled) {  // the leader records it; the others read it only after the barrier in team.sums
            if (team.leader()) excluded_buf[residual.num_excluded] = x;
            ++residual.num_excluded;
            total = total - px;
          }
        }
        if (sampled) {  // every rejected draw, duplicates included, takes the residual step (i.i.d. drafts)
          const float* src = in_scratch ? row.scratch : p;
          float* dst = row.scratch;
          const float mass = total;
          team.sync();  // every member has read the scratch before it changes
          team.update([=](int64_t v) {
            const float r = src[v] - mul_rn(q[v], mass);
            dst[v] = r > 0.0f ? r : 0.0f;
          });
          in_scratch = true;
          total = team.sums(Residual{row.scratch, excluded_buf, 0}, seg);
        }
      }
    }
    if (accepted >= 0) {
      node = accepted;
      ++depth;
      if (team.leader()) accept_index[depth] = accepted;
      team.sync();  // seg is rewritten at the next node
      continue;
    }
    // No child accepted: sample the next token from the residual at `node`.
    Residual final_weights{in_scratch ? row.scratch : p, excluded_buf, in_scratch ? 0 : residual.num_excluded};
    if (!sampled && residual.num_excluded > 0) total = team.sums(final_weights, seg);
    int64_t token;
    if (total > 0.0f)
      token = inverse_cdf(final_weights, seg, total, row.uniform_final, row.vocab);
    else
      token = argmax_first(p, row.vocab);
    if (team.leader()) {
      for (int64_t j = depth + 1; j <= row.max_depth; ++j) accept_index[j] = -1;
      *accept_len = static_cast<int32_t>(depth);
      *next_token = token;
    }
    return;
  }
}

// One CPU thread as the whole team.
struct TeamSerial {
  int64_t vocab;
  KESTREL_HD bool leader() const { return true; }
  KESTREL_HD void sync() const {}
  // Sixteen full segments at a time with independent accumulators (each still adds its tokens in order, so the
  // sums are the canonical ones; the interleaving only removes the serial dependence between segments). Segments
  // holding an excluded token are then summed again with it as 0.
  KESTREL_HD float sums(const Residual& weight, float* seg) const {
    constexpr int kGroup = 16;
    const int64_t length = segment_length(vocab);
    const int64_t full = length > 0 ? vocab / length : 0;  // segments of the full length
    int s = 0;
    for (; s + kGroup <= full && s + kGroup <= kSegments; s += kGroup) {
      float acc[kGroup];
      for (int g = 0; g < kGroup; ++g) acc[g] = 0.0f;
      const float* p = weight.probs + s * length;
      for (int64_t i = 0; i < length; ++i)
        for (int g = 0; g < kGroup; ++g) acc[g] += p[g * length + i];
      for (int g = 0; g < kGroup; ++g) seg[s + g] = acc[g];
    }
    const Residual plain{weight.probs, weight.excluded, 0};
    for (; s < kSegments; ++s) seg[s] = segment_sum(plain, segment_begin(vocab, s), segment_end(vocab, s));
    for (int e = 0; e < weight.num_excluded; ++e) {
      const int x = static_cast<int>(weight.excluded[e] / length);
      seg[x] = segment_sum(weight, segment_begin(vocab, x), segment_end(vocab, x));
    }
    float total = 0.0f;
    for (int i = 0; i < kSegments; ++i) total += seg[i];
    return total;
  }
  template <typename Fn>
  KESTREL_HD void update(const Fn& fn) const {
    for (int64_t v = 0; v < vocab; ++v) fn(v);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// KV-cache compaction of one (layer, sequence, head) row block: row len + accept_index[j] moves to row len + j for
// j = 1 .. accept_len, in increasing j. In-order copying is safe although sources and destinations overlap: a path's
// node indices increase with depth, so accept_index[j] >= j, and every row written at step j (len + j) is below every
// source still to be read (len + accept_index[j'] >= len + j' > len + j for j' > j); a row read at step j may be
// written at a later step, after it was read. The CUDA kernel splits the columns over threads, each running all j.
// One cache tensor (k or v) for the CUDA compaction kernel: element strides, layer stride 0 for a 4-D cache.
struct CacheView {
  void* data;
  int64_t stride_layer, stride_batch, stride_head, stride_pos, stride_dim;
  int64_t head_dim;
};

KESTREL_HD int32_t accepted_length(const int32_t* accept_index, int64_t width) {
  int32_t count = 0;
  for (int64_t j = 0; j < width; ++j) count += accept_index[j] >= 0;
  return count > 0 ? count - 1 : 0;
}

// Why a row's compaction is invalid (kRowOk: it is valid). The CPU launcher reports the reason; the CUDA kernels,
// which cannot report without a host sync, leave an invalid row and its length untouched. Index arithmetic is in
// 64 bits: a length near 2^31 plus a node index must not wrap into the cache.
enum RowCheck : int {
  kRowOk = 0,
  kRootNotZero,     // accept_index[0] != 0
  kNotAscending,    // a path entry not above the one before it
  kBadPadding,      // an entry after the path that is not -1
  kNegativeLength,  // cache_seqlens[b] < 0
  kOutsideCache,    // a source row len + accept_index[j] at or past max_len
  kLengthOverflow,  // the new length len + 1 + accept_len past max_len or INT32_MAX
};

KESTREL_HD RowCheck check_compaction_row(const int32_t* index, int64_t width, int64_t len, int64_t max_len,
                                         int64_t* where) {
  *where = 0;
  if (index[0] != 0) return kRootNotZero;
  const int32_t accepted = accepted_length(index, width);
  for (int64_t j = 1; j < width; ++j) {
    *where = j;
    if (j <= accepted && index[j] <= index[j - 1]) return kNotAscending;
    if (j > accepted && index[j] != -1) return kBadPadding;
  }
  *where = accepted;
  if (len < 0) return kNegativeLength;
  if (len + static_cast<int64_t>(index[accepted]) >= max_len) return kOutsideCache;
  const int64_t new_len = len + 1 + accepted;
  if (new_len > max_len || new_len > 0x7fffffffLL) return kLengthOverflow;
  return kRowOk;
}

}  // namespace tree
}  // namespace kestrel
