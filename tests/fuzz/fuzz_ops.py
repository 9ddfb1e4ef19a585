"""Fuzzing the ops (CPU paths, the C++ kernels, the Triton kernels under the interpreter): random shapes, lengths,
trees, extreme values and malformed arguments. Each case either raises a clear error and changes nothing, or
agrees with the plain-PyTorch reference (float64 where the kernels compute in float32)."""

import math

import pytest
import torch
from cases import CLEAR_ERRORS, note, raises_clearly, tensors
from hypothesis import given, settings
from hypothesis import strategies as st

import kestrel
from kestrel.decoding import build_tree
from kestrel.ops import (
    compact_kv_cache,
    kv_bottleneck_lookup,
    plga_attention,
    softplus_attention,
    tree_attention,
    verify_tree_greedy,
    verify_tree_sample,
    vq_topk,
)
from kestrel.reference import attention as ref_attention
from kestrel.reference.kv_bottleneck import kv_bottleneck_lookup as ref_kv_lookup
from kestrel.reference.tree import ancestor_bits
from kestrel.reference.tree_attention import tree_attention as ref_tree_attention
from kestrel.reference.tree_verify import compact_reference, verify_greedy_reference, verify_sample_reference
from kestrel.reference.vq_topk import vq_scores

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")
INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------------------- compaction
def row_is_valid(row, length, max_len):
    """The compaction rules written out (kestrel/tree_verify.h check_compaction_row), in Python integers."""
    if row[0] != 0 or length < 0:
        return False
    path = [row[0]]
    for j in range(1, len(row)):
        if row[j] < 0:
            if any(x != -1 for x in row[j:]):
                return False
            break
        if row[j] <= path[-1]:
            return False
        path.append(row[j])
    return length + path[-1] < max_len and length + len(path) <= min(max_len, INT32_MAX)


@st.composite
def compaction_cases(draw):
    B, H, L, D = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    layered = draw(st.booleans())
    W = draw(st.integers(1, 5))
    lens, rows = [], []
    for _ in range(B):
        lens.append(
            draw(st.one_of(st.integers(0, L), st.integers(-3, L + 3), st.sampled_from([INT32_MAX - 5, INT32_MAX])))
        )
        if draw(st.booleans()):  # a well-formed path, maybe leaving the cache
            depth = draw(st.integers(0, min(W - 1, L + 2)))
            nodes = sorted(draw(st.sets(st.integers(1, L + 2), min_size=depth, max_size=depth)))
            rows.append([0] + nodes + [-1] * (W - 1 - depth))
        else:
            rows.append([draw(st.integers(-3, L + 3)) for _ in range(W)])
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int8]))
    return B, H, L, D, layered, W, lens, rows, dtype


@given(compaction_cases())
def test_compaction_equals_the_reference_or_rejects_and_changes_nothing(case):
    B, H, L, D, layered, W, lens, rows, dtype = case
    note(f"compact B={B} H={H} L={L} D={D} layered={layered} lens={lens} rows={rows} dtype={dtype}")
    shape = ((2,) if layered else ()) + (B, H, L, D)
    k = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(-100, 100, shape, dtype=dtype)
    v = (
        torch.randn(shape[:-1] + (D + 1,)).to(k.dtype)
        if dtype.is_floating_point
        else torch.randint(-100, 100, shape[:-1] + (D + 1,), dtype=dtype)
    )
    seqlens = torch.tensor(lens, dtype=torch.int32).reshape(B)
    accept_index = torch.tensor(rows, dtype=torch.int32).reshape(B, W)
    valid = all(row_is_valid(row, length, L) for row, length in zip(rows, lens))
    before = (k.clone(), v.clone(), seqlens.clone())
    if valid:
        ref_k, ref_v, ref_lens = compact_reference(k, v, seqlens, accept_index)
        compact_kv_cache(k, v, seqlens, accept_index)
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v) and torch.equal(seqlens, ref_lens)
    else:
        error = raises_clearly(lambda: compact_kv_cache(k, v, seqlens, accept_index), "compact_kv_cache")
        assert error is not None, "an invalid row was accepted"
        assert torch.equal(k, before[0]) and torch.equal(v, before[1]) and torch.equal(seqlens, before[2])


# ------------------------------------------------------------------------------------------------- verification
@st.composite
def trees(draw, max_nodes=9):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, max_nodes))
    parents = []
    for _ in range(B):
        used = draw(st.integers(1, T))
        row = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, used)] + [-2] * (T - used)
        parents.append(row)
    return torch.tensor(parents)


def tree_case(kind, parents, vocab, seed, **extra):
    """Log the case; (generator, TreeBuffers, B, T)."""
    note(f"{kind} parents={parents.tolist()} V={vocab} seed={seed} {extra}")
    return torch.Generator().manual_seed(seed), build_tree(parents), *parents.shape


@given(trees(), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_greedy_verification_equals_the_reference(parents, vocab, seed):
    g, tree, B, T = tree_case("greedy", parents, vocab, seed)
    candidates = torch.randint(0, vocab, (B, T), generator=g)
    target = torch.randint(0, vocab, (B, T), generator=g)
    accept_index, accept_len, next_token = verify_tree_greedy(candidates, target, tree)
    ref = verify_greedy_reference(candidates, target, parents, tree.max_depth)
    assert accept_index.tolist() == ref[0] and accept_len.tolist() == ref[1] and next_token.tolist() == ref[2]


@given(
    trees(), st.integers(1, 40), st.booleans(), st.sampled_from(["plain", "zeros", "spiky"]), st.integers(0, 2**31 - 1)
)
def test_sampled_verification_equals_the_reference(parents, vocab, sampled_drafts, probs_kind, seed):
    g, tree, B, T = tree_case("sample", parents, vocab, seed, drafts=sampled_drafts, probs=probs_kind)
    candidates = torch.randint(0, vocab, (B, T), generator=g)
    probs = torch.rand(B, T, vocab, generator=g)
    if probs_kind == "zeros":
        probs = probs * (torch.rand(B, T, vocab, generator=g) < 0.3)
    elif probs_kind == "spiky":
        probs = probs**30
    draft = torch.softmax(torch.randn(B, T, vocab, generator=g), -1) if sampled_drafts else None
    uniform, uniform_final = torch.rand(B, T, generator=g), torch.rand(B, generator=g)
    out = verify_tree_sample(candidates, probs, tree, uniform, uniform_final, draft)
    ref = verify_sample_reference(candidates, probs, parents, uniform, uniform_final, draft, tree.max_depth)
    assert [t.tolist() for t in out] == [list(r) for r in ref]
    assert bool(((out[2] >= 0) & (out[2] < vocab)).all())


@given(trees(), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_sampled_verification_survives_non_finite_and_negative_probabilities(parents, vocab, seed):
    """Not a distribution at all: the walk must stay memory-safe and return tokens of the vocabulary."""
    g, tree, B, T = tree_case("sample-garbage", parents, vocab, seed)
    probs = torch.randn(B, T, vocab, generator=g)
    probs[torch.rand(B, T, vocab, generator=g) < 0.2] = float("nan")
    probs[torch.rand(B, T, vocab, generator=g) < 0.1] = float("inf")
    candidates = torch.randint(-2, vocab + 2, (B, T), generator=g)
    out = verify_tree_sample(candidates, probs, tree, torch.rand(B, T, generator=g), torch.rand(B, generator=g))
    assert bool(((out[2] >= 0) & (out[2] < vocab)).all())
    assert bool(((out[1] >= 0) & (out[1] <= tree.max_depth)).all())


# ------------------------------------------------------------------------------------------------- retrieval
@st.composite
def retrieval_cases(draw):
    H, N, C, d = draw(st.integers(1, 2)), draw(st.integers(0, 12)), draw(st.integers(1, 40)), draw(st.integers(1, 9))
    k = draw(st.integers(1, C))
    metric = draw(st.sampled_from(["l2", "ip", "cosine"]))
    x = tensors((H, N, d), draw, special_fraction=0.0, scale_range=(-2, 1))
    cb = tensors((H, C, d), draw, special_fraction=0.0, scale_range=(-2, 1))
    for _ in range(draw(st.integers(0, 3))):  # duplicated codes
        src, dst = draw(st.integers(0, C - 1)), draw(st.integers(0, C - 1))
        cb[:, dst] = cb[:, src]
    banned = None
    if draw(st.booleans()):
        banned = torch.rand(H, C, generator=torch.Generator().manual_seed(draw(st.integers(0, 999)))) < 0.3
    chunk = draw(st.sampled_from([None, 0, 1, 3, 16]))
    return x, cb, k, metric, banned, chunk


@given(retrieval_cases())
def test_vq_topk_selects_the_float64_top_k_with_the_tie_rule(case):
    x, cb, k, metric, banned, chunk = case
    note(
        f"vq_topk x={tuple(x.shape)} cb={tuple(cb.shape)} k={k} metric={metric} banned={banned is not None} "
        f"chunk={chunk}"
    )
    allowed = cb.shape[1] if banned is None else int((~banned).sum(-1).min())
    if allowed < k:
        assert raises_clearly(lambda: vq_topk(x, cb, k, metric=metric, banned=banned, chunk=chunk), "banned")
        return
    scores, ids = vq_topk(x, cb, k, metric=metric, banned=banned, chunk=chunk)
    ref = vq_scores(x, cb, metric)
    if banned is not None:
        ref = ref.masked_fill(banned[:, None, :], float("-inf"))
    picked = torch.gather(ref, -1, ids)
    best = ref.topk(k, dim=-1).values
    scale = ref.masked_fill(torch.isinf(ref), 0).abs().amax(-1, keepdim=True).clamp_min(1.0)
    assert bool(((picked - best).abs() <= 1e-5 * scale).all()), "not the k best"
    assert all(len(set(row)) == k for row in ids.reshape(-1, k).tolist()), "a code twice"
    if banned is not None:
        assert not bool(banned.gather(-1, ids.flatten(1)).any())
    # copies of one code come in index order, with one score
    for h in range(cb.shape[0]):
        for row_ids, row_scores in zip(ids[h].tolist(), scores[h].tolist()):
            for a in range(k):
                for b in range(a + 1, k):
                    if torch.equal(cb[h, row_ids[a]], cb[h, row_ids[b]]):
                        assert row_ids[a] < row_ids[b] and row_scores[a] == row_scores[b]


@given(
    st.integers(0, 6),
    st.integers(0, 3),
    st.integers(1, 30),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_kv_bottleneck_lookup_equals_the_reference(B, C, P, dk, dv, seed):
    k = 1 + seed % min(P, 3)
    note(f"kv_lookup B={B} C={C} P={P} dk={dk} dv={dv} k={k} seed={seed}")
    g = torch.Generator().manual_seed(seed)
    z, keys, values = (
        torch.randn(B, C, dk, generator=g),
        torch.randn(C, P, dk, generator=g),
        torch.randn(C, P, dv, generator=g),
    )
    out, ids = kv_bottleneck_lookup(z, keys, values, k)
    assert out.shape == (B, C, dv) and ids.shape == (B, C, k)
    if B and C:
        ref_out, ref_ids = ref_kv_lookup(z.double(), keys.double(), values, k)
        assert torch.equal(ids, ref_ids) or bool(torch.allclose(out.double(), ref_out, atol=1e-5))
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- attention
def poison(cache, lens, first_unused, value):
    """Write `value` into every cache row at or past first_unused[b] (rows the op must never read)."""
    cache = cache.clone()
    for b, start in enumerate(first_unused):
        cache[b, :, start:] = value
    return cache


@st.composite
def tree_attention_cases(draw):
    parents = draw(trees(max_nodes=9))
    B, T = parents.shape
    hkv, group, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 16))
    lmax = T + draw(st.integers(0, 10))
    lens = [draw(st.integers(0, lmax - T)) for _ in range(B)]
    poison_value = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    return parents, hkv, group, D, lmax, lens, poison_value, draw(st.integers(0, 2**31 - 1))


@given(tree_attention_cases())
def test_tree_attention_equals_float64_and_never_reads_unused_slots(case):
    parents, hkv, group, D, lmax, lens, poison_value, seed = case
    B, T = parents.shape
    note(
        f"tree_attention parents={parents.tolist()} Hkv={hkv} group={group} D={D} Lmax={lmax} lens={lens} "
        f"poison={poison_value}"
    )
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * group, T, D, generator=g)
    k, v = torch.randn(B, hkv, lmax, D, generator=g), torch.randn(B, hkv, lmax, D, generator=g)
    bits = ancestor_bits(parents)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    used = [(parents[b] != -2).sum().item() for b in range(B)]
    dirty_k = poison(k, lens, [lens[b] + used[b] for b in range(B)], poison_value)
    dirty_v = poison(v, lens, [lens[b] + used[b] for b in range(B)], poison_value)
    out = tree_attention(q, dirty_k, dirty_v, seqlens, bits)
    expected = ref_tree_attention(q, k, v, seqlens, bits)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@st.composite
def softplus_cases(draw):
    B, hkv, group = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    lk = draw(st.integers(0, 9))
    lq = draw(st.integers(0, lk)) if lk else 0
    D = draw(st.integers(1, 16))
    causal = draw(st.booleans())
    p = draw(st.sampled_from([None, 1.0, 3.0, 15.0]))
    use_lens = draw(st.booleans()) and lk > 0
    lens = [draw(st.integers(lq, lk)) for _ in range(B)] if use_lens else None
    return (
        B,
        hkv,
        group,
        lq,
        lk,
        D,
        causal,
        p,
        lens,
        draw(st.sampled_from([float("nan"), float("inf")])),
        draw(st.integers(0, 2**31 - 1)),
    )


@given(softplus_cases())
def test_softplus_attention_equals_float64_and_ignores_keys_past_the_lengths(case):
    B, hkv, group, lq, lk, D, causal, p, lens, poison_value, seed = case
    note(f"softplus B={B} Hkv={hkv} group={group} Lq={lq} Lk={lk} D={D} causal={causal} p={p} lens={lens}")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * group, lq, D, generator=g, requires_grad=True)
    k, v = torch.randn(B, hkv, lk, D, generator=g), torch.randn(B, hkv, lk, D, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32) if lens is not None else None
    dirty_k, dirty_v = (poison(t, lens, lens, poison_value) for t in (k, v)) if lens else (k, v)
    out = softplus_attention(q, dirty_k, dirty_v, causal=causal, reweight_p=p, cache_seqlens=seqlens)
    expected = ref_attention.softplus_attention(
        q.detach().double(), k.double(), v.double(), causal=causal, reweight_p=p, cache_seqlens=seqlens
    )
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    if out.numel():
        out.sum().backward()
        assert bool(torch.isfinite(q.grad).all())


@given(softplus_cases())
def test_plga_attention_equals_float64_and_ignores_keys_past_the_lengths(case):
    B, hkv, group, lq, lk, D, causal, _, lens, poison_value, seed = case
    note(f"plga B={B} Hkv={hkv} group={group} Lq={lq} Lk={lk} D={D} causal={causal} lens={lens}")
    if lq == 0:
        return
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * group, lq, D, generator=g)
    k, v = torch.randn(B, hkv, lk, D, generator=g), torch.randn(B, hkv, lk, D, generator=g)
    G = torch.randn(1, hkv * group, D, D, generator=g) / math.sqrt(D)
    seqlens = torch.tensor(lens, dtype=torch.int32) if lens is not None else None
    dirty_k, dirty_v = (poison(t, lens, lens, poison_value) for t in (k, v)) if lens else (k, v)
    out = plga_attention(q, dirty_k, dirty_v, G, causal=causal, cache_seqlens=seqlens)
    # the float64 formula, on the clean cache
    qg = q.double() @ G.double()
    kk, vv = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = qg @ kk.transpose(-1, -2) / math.sqrt(D)
    lengths = seqlens.long() if seqlens is not None else torch.full((B,), lk)
    keys = torch.arange(lk)
    rows = lengths[:, None] - lq + torch.arange(lq)[None, :]
    visible = keys[None, None, :] < lengths[:, None, None]
    if causal:
        visible = visible & (keys[None, None, :] <= rows[:, :, None])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    expected = torch.softmax(scores, -1).nan_to_num(0.0) @ vv
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- bad arguments
BAD_CALLS = {
    "tree_attention": lambda: tree_attention(
        torch.randn(1, 2, 3, 4),
        torch.randn(1, 3, 8, 4),
        torch.randn(1, 3, 8, 4),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1, 3, 1, dtype=torch.int32),
    ),
    "softplus_attention": lambda: softplus_attention(
        torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)
    ),
    "vq_topk": lambda: vq_topk(torch.randn(3, 4), torch.randn(5, 4), 6),
    "kv_bottleneck_lookup": lambda: kv_bottleneck_lookup(
        torch.randn(2, 3, 4), torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    ),
    "plga_attention": lambda: plga_attention(
        torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 5)
    ),
}


@settings(max_examples=len(BAD_CALLS))  # each once: the set is fixed
@given(st.sampled_from(sorted(BAD_CALLS)))
def test_malformed_calls_name_the_op(name):
    note(f"malformed {name}")
    assert isinstance(raises_clearly(BAD_CALLS[name], name), CLEAR_ERRORS)
