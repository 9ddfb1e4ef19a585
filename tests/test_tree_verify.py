"""verify_tree_greedy / verify_tree_sample / compact_kv_cache: exact agreement with the plain-Python reference,
distribution tests (chi-square) for losslessness, compaction against plain decoding, opcheck and torch.compile."""

import subprocess

import pytest
import torch
from helpers import devices
from test_build_tree import random_parents

from kestrel.decoding import build_tree, static_tree
from kestrel.ops import compact_kv_cache, sampling_probs, verify_tree_greedy, verify_tree_sample
from kestrel.reference.tree_verify import (
    children_lists,
    compact_reference,
    verify_greedy_reference,
    verify_sample_reference,
)


def as_lists(outputs):
    accept_index, accept_len, next_token = outputs
    return accept_index.cpu().tolist(), accept_len.cpu().tolist(), next_token.cpu().tolist()


def random_batch(T, B, generator, full=True):
    sizes = [T] * B if full else [max(1, T - 3 * b) for b in range(B)]
    return random_parents(sizes, T, generator)


# ------------------------------------------------------------------------------------------------- greedy


def greedy_targets_following(parents, candidates, generator, follow=0.8):
    """target_ids that often agree with some child, so that paths of every length occur."""
    B, T = candidates.shape
    target = torch.randint(0, 6, (B, T), generator=generator)
    for b, row in enumerate(parents.tolist()):
        children = children_lists(row)
        for node in range(T):
            if children[node] and float(torch.rand((), generator=generator)) < follow:
                pick = children[node][int(torch.randint(0, len(children[node]), (1,), generator=generator))]
                target[b, node] = candidates[b, pick]
    return target


@pytest.mark.parametrize("T", [1, 7, 8, 9, 63, 64, 65])
def test_greedy_matches_reference(T):
    g = torch.Generator().manual_seed(T)
    parents = random_batch(T, 5, g, full=False)
    tree = build_tree(parents)
    candidates = torch.randint(0, 6, parents.shape, generator=g)
    target = greedy_targets_following(parents, candidates, g)
    got = as_lists(verify_tree_greedy(candidates, target, tree))
    assert got == tuple(verify_greedy_reference(candidates, target, parents, tree.max_depth))


def test_greedy_leaf_and_empty_acceptance():
    tree = static_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])  # nodes: 1=(0,) 2=(1,) 3=(0,0) 4=(0,1) 5=(1,0)
    buffers = tree.buffers(3)
    candidates = torch.tensor([[9, 4, 5, 6, 7, 8]] * 3)
    target = torch.tensor(
        [
            [5, 7, 8, 1, 2, 3],  # root -> 2 (5) -> 5 (8), a leaf: next token target[5]
            [1, 7, 8, 1, 2, 3],  # nothing accepted
            [4, 7, 8, 1, 2, 3],
        ]
    )  # root -> 1 (4) -> 4 (7), a leaf
    accept_index, accept_len, next_token = verify_tree_greedy(candidates, target, buffers)
    assert accept_index.tolist() == [[0, 2, 5], [0, -1, -1], [0, 1, 4]]
    assert accept_len.tolist() == [2, 0, 2]
    assert next_token.tolist() == [3, 1, 2]
    assert accept_index.dtype == torch.int32 and accept_len.dtype == torch.int32 and next_token.dtype == torch.int64


def test_greedy_first_matching_child_wins():
    parents = torch.tensor([[-1, 0, 0, 1, 2]])
    candidates = torch.tensor([[0, 3, 3, 5, 6]])  # two children with token 3: node 1 (lower index) wins
    target = torch.tensor([[3, 4, 6, 0, 0]])
    accept_index, accept_len, next_token = verify_tree_greedy(candidates, target, build_tree(parents))
    assert accept_index.tolist() == [[0, 1, -1]] and accept_len.tolist() == [1] and next_token.tolist() == [4]


# ------------------------------------------------------------------------------------------------- sampling, exact


def random_probs(shape, generator, zeros=0.3):
    logits = torch.randn(shape, generator=generator) * 2
    probs = torch.softmax(logits, -1)
    mask = torch.rand(shape, generator=generator) < zeros
    mask[..., 0] = False
    return probs.masked_fill(mask, 0.0)  # unnormalised rows with holes


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("T,V", [(1, 8), (7, 8), (9, 13), (64, 12), (65, 300), (8, 600), (9, 4099)])
def test_sample_matches_reference(T, V, sampled):
    g = torch.Generator().manual_seed(T * 1000 + V + sampled)
    B = 4
    parents = random_batch(T, B, g, full=False)
    tree = build_tree(parents)
    target = random_probs((B, T, V), g)
    draft = torch.softmax(torch.randn(B, T, V, generator=g), -1) if sampled else None
    # few distinct tokens: duplicated siblings and frequent acceptance
    candidates = torch.randint(0, min(V, 4), (B, T), generator=g)
    for trial in range(6):
        uniform = torch.rand(B, T, generator=g)
        uniform_final = torch.rand(B, generator=g)
        if trial == 5:  # extremes of [0, 1)
            uniform[0], uniform_final[0] = 0.0, 0.0
            uniform[1], uniform_final[1] = 1 - 2**-24, 1 - 2**-24
        got = as_lists(verify_tree_sample(candidates, target, tree, uniform, uniform_final, draft))
        ref = verify_sample_reference(candidates, target, parents, uniform, uniform_final, draft, tree.max_depth)
        assert got == tuple(ref)


@pytest.mark.parametrize("T", [8, 65])
def test_sample_at_temperature_zero_is_greedy(T):
    g = torch.Generator().manual_seed(T)
    parents = random_batch(T, 4, g, full=False)
    tree = build_tree(parents)
    logits = torch.randn(4, T, 6, generator=g)
    candidates = torch.randint(0, 6, (4, T), generator=g)
    greedy = verify_tree_greedy(candidates, logits.argmax(-1), tree)
    for _ in range(3):
        probs = sampling_probs(logits, temperature=0)
        sample = verify_tree_sample(candidates, probs, tree, torch.rand(4, T, generator=g), torch.rand(4, generator=g))
        for a, b in zip(greedy, sample):
            assert torch.equal(a, b)


def test_sample_duplicate_sibling_is_not_retried():
    # root with children 1, 2, 3 all proposing token 1; p(1) = 0.5. The first test rejects token 1 (uniform 0.9);
    # the duplicates must be rejected too although their uniforms (0) would accept any positive p(1).
    parents = torch.tensor([[-1, 0, 0, 0]])
    candidates = torch.tensor([[0, 1, 1, 1]])
    target = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    uniform = torch.tensor([[0.0, 0.9, 0.0, 0.0]])
    out = verify_tree_sample(candidates, target, build_tree(parents), uniform, torch.tensor([0.99]))
    assert out[1].tolist() == [0] and out[2].tolist() == [0]  # the residual has only token 0
    draft = torch.tensor([[[0.2, 0.8]] * 4])  # sampled drafts: min(1, 0.5 / 0.8) < 0.9 rejects
    out = verify_tree_sample(candidates, target, build_tree(parents), uniform, torch.tensor([0.99]), draft)
    assert out[1].tolist() == [0] and out[2].tolist() == [0]


def test_sample_all_zero_row_falls_back_to_argmax():
    parents = torch.tensor([[-1, 0]])
    target = torch.zeros(1, 2, 5)
    out = verify_tree_sample(torch.tensor([[0, 3]]), target, build_tree(parents), torch.rand(1, 2), torch.rand(1))
    assert out[1].tolist() == [0] and out[2].tolist() == [0]


# ------------------------------------------------------------------------------------------------- distributions


def chi_square_pvalue(counts, expected_probs, min_expected=5.0):
    """p-value of Pearson's chi-square test; cells with expected count < min_expected are pooled into one."""
    counts = counts.double().flatten()
    expected = expected_probs.double().flatten() * counts.sum()
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was emitted"
    counts, expected = counts[keep], expected[keep]
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_chi_square_helper_rejects_a_wrong_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    right = torch.bincount(torch.multinomial(p, 20000, replacement=True, generator=g), minlength=4)
    wrong = torch.bincount(
        torch.multinomial(torch.tensor([0.12, 0.2, 0.3, 0.38]), 20000, replacement=True, generator=g), minlength=4
    )
    assert chi_square_pvalue(right, p) > 1e-3
    assert chi_square_pvalue(wrong, p) < 1e-6


def first_two_tokens(candidates, accept_index, accept_len, next_token, second_dist, generator):
    """(t1, t2) emitted by one verification; t2 is sampled from second_dist[t1] where the step ends after t1."""
    rows = torch.arange(candidates.shape[0])
    node1 = accept_index[:, 1].clamp(min=0).long()
    node2 = accept_index[:, 2].clamp(min=0).long() if accept_index.shape[1] > 2 else node1
    t1 = torch.where(accept_len >= 1, candidates[rows, node1], next_token)
    fresh = torch.multinomial(second_dist[t1], 1, generator=generator)[:, 0]
    t2 = torch.where(accept_len >= 2, candidates[rows, node2], torch.where(accept_len == 1, next_token, fresh))
    return t1, t2


def run_distribution_case(V, sampled, duplicates, transform, trials=30000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # target model over two steps: P0 after the root, P1[x] after token x (rows V); temperature etc. applied
    p0 = transform(torch.randn(V, generator=g) * 1.5)
    p1 = transform(torch.randn(V, V, generator=g) * 1.5)
    # tree: root with 3 children, each with 2 children (T = 10)
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    T = parents.numel()
    tree = build_tree(parents[None].expand(trials, T).contiguous())
    if sampled:
        # a draft near the target (sharper with `duplicates`, so that siblings repeat tokens more often)
        sharpness = 3.0 if duplicates else 1.0
        q0 = 0.6 * p0 + 0.4 * torch.softmax(torch.randn(V, generator=g) * sharpness, -1)
        q1 = 0.6 * p1 + 0.4 * torch.softmax(torch.randn(V, V, generator=g) * sharpness, -1)
        first = torch.multinomial(q0, trials * 3, replacement=True, generator=g).view(trials, 3)
        second = torch.multinomial(q1[first.flatten()], 2, replacement=True, generator=g).view(trials, 3, 2)
    else:
        ranked = torch.argsort(p0, descending=True)
        base = ranked[:3] if not duplicates else torch.stack([ranked[0], ranked[0], ranked[1]])
        first = base.expand(trials, 3)
        second = torch.stack([torch.argsort(p1[t], descending=True)[:2] for t in base]).expand(trials, 3, 2)
        if duplicates:
            second = second.clone()
            second[:, :, 1] = second[:, :, 0]
    candidates = torch.cat([torch.zeros(trials, 1, dtype=torch.long), first, second.reshape(trials, 6)], 1)
    repeated = (first[:, 0] == first[:, 1]) | (first[:, 0] == first[:, 2]) | (first[:, 1] == first[:, 2])
    if duplicates:
        assert repeated.float().mean() > 0.2
    node_token = candidates.clone()
    target = torch.empty(trials, T, V)
    target[:, 0] = p0
    target[:, 1:4] = p1[first]
    target[:, 4:] = p1[second.reshape(trials, 6)]  # depth 2: any distribution (only t3 would see it)
    draft = None
    if sampled:
        draft = torch.empty(trials, T, V)
        draft[:, 0] = q0
        draft[:, 1:4] = q1[first]
        draft[:, 4:] = q0
    uniform, uniform_final = torch.rand(trials, T, generator=g), torch.rand(trials, generator=g)
    out = verify_tree_sample(node_token, target, tree, uniform, uniform_final, draft)
    t1, t2 = first_two_tokens(node_token, *out, p1, g)
    assert (out[1] > 0).float().mean() > 0.2  # the tree is actually used
    p_first = chi_square_pvalue(torch.bincount(t1, minlength=V), p0)
    p_pair = chi_square_pvalue(torch.bincount(t1 * V + t2, minlength=V * V), p0[:, None] * p1)
    return p_first, p_pair


def plain(logits):
    return sampling_probs(logits)


def tempered(logits):
    return sampling_probs(logits, temperature=0.7, top_k=6, top_p=0.9)


@pytest.mark.parametrize("V", [8, 16])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("transform", [plain, tempered])
def test_sample_distribution(V, sampled, duplicates, transform):
    p_first, p_pair = run_distribution_case(V, sampled, duplicates, transform, seed=V + 2 * sampled + 4 * duplicates)
    assert p_first > 1e-3, p_first
    assert p_pair > 1e-3, p_pair


def test_distribution_test_detects_a_lossy_rule():
    """The same harness fails a verifier that is not lossless (greedy acceptance of the draft's own ranking)."""
    V, trials = 8, 30000
    g = torch.Generator().manual_seed(1)
    p0 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    parents = torch.tensor([[-1, 0]]).expand(trials, 2).contiguous()
    top = int(p0.argmax())
    candidates = torch.tensor([[0, top]]).expand(trials, 2).contiguous()
    target = p0.expand(trials, 2, V).contiguous()
    # a biased rule: accept iff u < sqrt(p(x)) (more often than p(x))
    biased = torch.rand(trials, 2, generator=g) ** 2
    out = verify_tree_sample(candidates, target, build_tree(parents), biased, torch.rand(trials, generator=g))
    t1 = torch.where(out[1] >= 1, torch.full((trials,), top), out[2])
    assert chi_square_pvalue(torch.bincount(t1, minlength=V), p0) < 1e-6


def test_sampling_probs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 11, generator=g)
    assert torch.allclose(sampling_probs(logits), torch.softmax(logits, -1))
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 11).float()
    assert torch.equal(sampling_probs(logits, temperature=0), one_hot)
    for row in range(4):
        x = logits[row].double() / 0.5
        kept = sorted(range(11), key=lambda i: -float(x[i]))[:5]
        p = torch.zeros(11, dtype=torch.float64)
        p[kept] = torch.softmax(x[kept], 0)
        order = sorted(kept, key=lambda i: -float(p[i]))
        mass, nucleus = 0.0, []
        for i in order:
            if mass >= 0.8:
                break
            nucleus.append(i)
            mass += float(p[i])
        expected = torch.zeros(11, dtype=torch.float64)
        expected[nucleus] = p[nucleus] / p[nucleus].sum()
        got = sampling_probs(logits[row], temperature=0.5, top_k=5, top_p=0.8)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), expected, atol=1e-6), (got, expected)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        sampling_probs(logits, temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be None or in \(0, 1\], got 0"):
        sampling_probs(logits, top_p=0)
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1, got 0"):
        sampling_probs(logits, top_k=0)


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 5e-324])
def test_sampling_probs_tiny_temperature_is_greedy(temperature):
    """logits / temperature overflowed to +-inf (softmax: NaN); shifted by the row max first, a tiny temperature
    gives the argmax's one-hot, and exact ties share the mass."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5], [40.0, -40.0, 0.0, 1.0], [2.0, 2.0, 1.0, float("-inf")]])
    probs = sampling_probs(logits, temperature=temperature)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert torch.equal(probs, expected)
    assert torch.equal(sampling_probs(logits, temperature=temperature, top_k=2, top_p=0.9), expected)


def test_sample_accepts_float64_probabilities():
    """float64 target/draft probabilities are converted to float32 as the other float dtypes are (they were refused
    with a TypeError, unlike the documented conversion)."""
    _, tree, candidates, probs = small_case("cpu")
    uniform, uniform_final = torch.rand(2, 6, generator=torch.Generator().manual_seed(4)), torch.rand(2)
    for draft in (None, probs.flip(-1)):
        expected = verify_tree_sample(candidates, probs, tree, uniform, uniform_final, draft)
        got = verify_tree_sample(
            candidates, probs.double(), tree, uniform, uniform_final, None if draft is None else draft.double()
        )
        for a, b in zip(expected, got):
            assert torch.equal(a, b)


def test_sampling_probs_infinite_temperature_and_edge_arguments():
    logits = torch.tensor([[1.0, 3.0, -2.0, float("-inf")]])
    assert torch.equal(sampling_probs(logits, temperature=float("inf")), torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))
    assert torch.equal(sampling_probs(logits, temperature=float("inf"), top_k=2), torch.tensor([[0.5, 0.5, 0, 0]]))
    assert torch.allclose(sampling_probs(logits, top_k=100), torch.softmax(logits, -1))  # top_k >= V keeps all
    assert sampling_probs(torch.randn(0, 5)).shape == (0, 5)
    with pytest.raises(TypeError, match="sampling_probs: top_k must be None or an int >= 1, got bool True"):
        sampling_probs(logits, top_k=True)
    with pytest.raises(TypeError, match="sampling_probs: temperature must be a number, got Tensor"):
        sampling_probs(logits, temperature=torch.tensor(0.5))
    with pytest.raises(TypeError, match="sampling_probs: top_p must be None or a number"):
        sampling_probs(logits, top_p="0.9")
    with pytest.raises(ValueError, match="temperature must be >= 0, got nan"):
        sampling_probs(logits, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"logits must have at least one token \(V >= 1\), got shape \(2, 0\)"):
        sampling_probs(torch.randn(2, 0), temperature=0)


# ------------------------------------------------------------------------------------------------- compaction


def kv_of(tokens, positions, H, D, layers=None):
    """K/V rows that depend only on (token, position): what a model's cache holds for that token there."""
    base = tokens.double()[..., None] * 0.37 + positions.double()[..., None] * 1.91
    k = torch.sin(base + torch.arange(H * D).double() * 0.13).view(*tokens.shape, H, D)
    v = torch.cos(base * 0.5 + torch.arange(H * D).double() * 0.07).view(*tokens.shape, H, D)
    k, v = k.transpose(-3, -2).float(), v.transpose(-3, -2).float()  # (..., H, L, D)
    if layers is not None:
        k = torch.stack([k * (i + 1) for i in range(layers)])
        v = torch.stack([v * (i + 1) for i in range(layers)])
    return k, v


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layers", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compaction_equals_plain_decoding(device, layers, dtype):
    g = torch.Generator().manual_seed(7)
    B, H, D, Lmax, T = 3, 2, 8, 40, 9
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 3, 6], [-1, 0, 1, 2, 3, 4, 5, 6, 7], [-1, 0, 0, 0, 0, 0, 0, 0, 0]])
    tree = build_tree(parents)
    candidates = torch.randint(0, 50, (B, T), generator=g)
    lens = torch.tensor([5, 0, 12], dtype=torch.int32)
    prefix = torch.randint(0, 50, (B, Lmax), generator=g)
    accept_index = torch.tensor([[0, 1, 3, 6, 8], [0, 1, 2, 3, 4], [0, -1, -1, -1, -1]], dtype=torch.int32)
    # the cache after the tree forward: prefix rows, then node i at row len + i with position len + depth[i]
    rows_tokens = prefix.clone()
    rows_pos = torch.arange(Lmax).expand(B, Lmax).clone()
    for b in range(B):
        n = int(lens[b])
        rows_tokens[b, n : n + T] = candidates[b]
        rows_pos[b, n : n + T] = n + tree.depth[b]
    k_cache, v_cache = kv_of(rows_tokens, rows_pos, H, D, layers)
    k_cache, v_cache = k_cache.to(dtype).to(device), v_cache.to(dtype).to(device)
    ref_k, ref_v, ref_lens = compact_reference(k_cache, v_cache, lens.to(device), accept_index.to(device))
    cache_seqlens = lens.clone().to(device)
    compact_kv_cache(k_cache, v_cache, cache_seqlens, accept_index.to(device))
    accept_len = (accept_index >= 0).sum(1) - 1
    assert cache_seqlens.cpu().tolist() == (lens + 1 + accept_len).tolist() == ref_lens.cpu().tolist()
    # plain decoding of root + accepted tokens writes token j at row len + j with position len + j
    for b in range(B):
        n, new = int(lens[b]), int(cache_seqlens[b])
        path = [int(i) for i in accept_index[b] if i >= 0]
        tokens = torch.cat([prefix[b, :n], candidates[b, path]])
        plain_k, plain_v = kv_of(tokens[None], torch.arange(new)[None], H, D, layers)
        got_k = k_cache[:, b, :, :new] if layers else k_cache[b, :, :new]
        got_v = v_cache[:, b, :, :new] if layers else v_cache[b, :, :new]
        exp_k = plain_k[:, 0] if layers else plain_k[0]
        exp_v = plain_v[:, 0] if layers else plain_v[0]
        assert torch.equal(got_k.cpu(), exp_k.to(dtype)) and torch.equal(got_v.cpu(), exp_v.to(dtype))
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_compaction_strided_views_and_different_head_dims():
    B, H, Lmax = 2, 3, 16
    big_k = torch.randn(B, Lmax, H, 8)  # (B, L, H, D) storage viewed as (B, H, L, D)
    k_cache = big_k.transpose(1, 2)
    v_cache = torch.randn(B, H, Lmax, 5)
    lens = torch.tensor([2, 4], dtype=torch.int32)
    accept_index = torch.tensor([[0, 2, 3], [0, 1, -1]], dtype=torch.int32)
    ref_k, ref_v, ref_lens = compact_reference(k_cache, v_cache, lens, accept_index)
    compact_kv_cache(k_cache, v_cache, lens, accept_index)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v) and torch.equal(lens, ref_lens)


def test_compaction_rejects_bad_accept_index():
    k, v = torch.zeros(1, 1, 8, 2), torch.zeros(1, 1, 8, 2)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"accept_index\[0\] must ascend"):
        compact_kv_cache(k, v, lens, torch.tensor([[0, 2, 1]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="outside the cache"):
        compact_kv_cache(k, v, lens, torch.tensor([[0, 5, -1]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"accept_index\[0, 0\] must be 0"):
        compact_kv_cache(k, v, lens, torch.tensor([[1, 2, -1]], dtype=torch.int32))
    assert lens.tolist() == [3]


COMPACT_CRASH_SCRIPT = r"""
import torch
import kestrel
from kestrel.ops import compact_kv_cache
k, v = torch.randn(1, 1, 16, 4), torch.randn(1, 1, 16, 4)
lens = torch.tensor([2**31 - 5], dtype=torch.int32)
before = (k.clone(), v.clone())
try:
    compact_kv_cache(k, v, lens, torch.tensor([[0, 5, 7]], dtype=torch.int32))
except RuntimeError as error:
    assert "outside the cache" in str(error), error
    assert lens.item() == 2**31 - 5 and torch.equal(k, before[0]) and torch.equal(v, before[1])
    print("rejected")
"""


def test_compaction_length_near_int32_max_is_rejected_not_a_crash():
    """The defect: `len + accept_index` was computed in int32, wrapped below Lmax and wrote far outside the cache
    (a segfault). Run in a subprocess, so a crash fails the test instead of the session."""
    import sys

    result = subprocess.run([sys.executable, "-c", COMPACT_CRASH_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "rejected" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_compaction_rejects_a_new_length_past_the_cache_and_changes_nothing():
    k, v = torch.randn(2, 1, 8, 2), torch.randn(2, 1, 8, 2)
    lens = torch.tensor([1, 6], dtype=torch.int32)
    before = (k.clone(), v.clone(), lens.clone())
    # row 1's last node sits at 6 + 2 = 8 = Lmax; row 0 is fine and must not be moved either
    accept_index = torch.tensor([[0, 2, -1], [0, 1, 2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[1\] = 6 plus accepted node 2 is outside the cache"):
        compact_kv_cache(k, v, lens, accept_index)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1]) and torch.equal(lens, before[2])
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[0\] must be >= 0, got -1"):
        compact_kv_cache(k, v, torch.tensor([-1, 0], dtype=torch.int32), accept_index)


def test_compaction_rejects_k_and_v_in_the_same_memory():
    k = torch.randn(1, 2, 8, 4)
    lens = torch.tensor([2], dtype=torch.int32)
    accept_index = torch.tensor([[0, 2, -1]], dtype=torch.int32)
    before = k.clone()
    for v in (k, k.view(1, 2, 8, 4), k[..., :4]):
        with pytest.raises(RuntimeError, match="k_cache and v_cache overlap in memory"):
            compact_kv_cache(k, v, lens, accept_index)
    kv = torch.randn(2, 1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="overlap"):  # partial overlap of two views
        compact_kv_cache(kv.view(-1)[:64].view(1, 2, 8, 4), kv.view(-1)[32:96].view(1, 2, 8, 4), lens, accept_index)
    assert torch.equal(k, before) and lens.tolist() == [2]
    with pytest.raises(RuntimeError, match="cache_seqlens has elements that share memory"):
        compact_kv_cache(
            torch.randn(2, 1, 8, 4),
            torch.randn(2, 1, 8, 4),
            torch.tensor([2], dtype=torch.int32).expand(2),
            torch.tensor([[0, 2, -1]] * 2, dtype=torch.int32),
        )
    # two halves of one buffer are separate caches: accepted
    ref_k, ref_v, ref_lens = compact_reference(kv[0], kv[1], lens, accept_index)
    compact_kv_cache(kv[0], kv[1], lens, accept_index)
    assert torch.equal(kv[0], ref_k) and torch.equal(kv[1], ref_v) and torch.equal(lens, ref_lens)


# ------------------------------------------------------------------------------------------------- argument checks


def test_argument_checks():
    tree = build_tree(torch.tensor([[-1, 0, 0]]))
    cand = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"verify_tree_greedy: target_ids must have shape \(1, 3\), got \(1, 2\)"):
        verify_tree_greedy(cand, torch.zeros(1, 2, dtype=torch.long), tree)
    with pytest.raises(TypeError, match="verify_tree_greedy: tree must be a kestrel.decoding.TreeBuffers"):
        verify_tree_greedy(cand, cand, object())
    with pytest.raises(ValueError, match=r"candidates must be \(B, T\) with T >= 1, got \(3,\)"):
        verify_tree_greedy(cand[0], cand, tree)
    with pytest.raises(TypeError, match="candidates must be int64"):
        verify_tree_greedy(cand.float(), cand, tree)
    with pytest.raises(ValueError, match=r"target_probs must be \(B, T, V\) = \(1, 3, V\), got \(1, 3\)"):
        verify_tree_sample(cand, torch.rand(1, 3), tree, torch.rand(1, 3), torch.rand(1))
    with pytest.raises(ValueError, match=r"uniform must have shape \(1, 3\), got \(3,\)"):
        verify_tree_sample(cand, torch.rand(1, 3, 5), tree, torch.rand(3), torch.rand(1))
    with pytest.raises(TypeError, match="uniform_final must be torch.float32, got torch.float64"):
        verify_tree_sample(cand, torch.rand(1, 3, 5), tree, torch.rand(1, 3), torch.rand(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"draft_probs must have shape \(1, 3, 5\), got \(1, 3, 4\)"):
        verify_tree_sample(cand, torch.rand(1, 3, 5), tree, torch.rand(1, 3), torch.rand(1), torch.rand(1, 3, 4))
    k = torch.zeros(2, 1, 8, 4)
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(2,\), got \(1,\)"):
        compact_kv_cache(k, k.clone(), torch.zeros(1, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_seqlens must be torch.int32, got torch.int64"):
        compact_kv_cache(k, k.clone(), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"v_cache must match k_cache \(2, 1, 8, 4\)"):
        compact_kv_cache(
            k, torch.zeros(2, 1, 7, 4), torch.zeros(2, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32)
        )
    with pytest.raises(ValueError, match=r"max_depth must be in \[0, T - 1\] = \[0, 2\], got 3"):
        torch.ops.kestrel.verify_tree_greedy(cand, cand, tree.first_child, tree.next_sibling, 3)


# ------------------------------------------------------------------------------------------------- opcheck, compile


def small_case(device, V=12):
    g = torch.Generator().manual_seed(11)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 2, -2, -2]])
    tree = build_tree(parents.to(device))
    candidates = torch.randint(0, 3, (2, 6), generator=g).to(device)
    probs = torch.softmax(torch.randn(2, 6, V, generator=g), -1).to(device)
    return parents, tree, candidates, probs


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    _, tree, candidates, probs = small_case(device)
    uniform, uniform_final = torch.rand(2, 6).to(device), torch.rand(2).to(device)
    torch.library.opcheck(
        torch.ops.kestrel.verify_tree_greedy,
        (candidates, probs.argmax(-1), tree.first_child, tree.next_sibling, tree.max_depth),
    )
    for draft in (None, probs.flip(-1).contiguous()):
        torch.library.opcheck(
            torch.ops.kestrel.verify_tree_sample,
            (candidates, probs, tree.first_child, tree.next_sibling, uniform, uniform_final, draft, tree.max_depth),
        )
    for shape in ((2, 2, 16, 4), (3, 2, 2, 16, 4)):
        k, v = torch.randn(shape).to(device), torch.randn(shape).to(device)
        accept_index = torch.tensor([[0, 1, 3], [0, 2, -1]], dtype=torch.int32, device=device)
        torch.library.opcheck(
            torch.ops.kestrel.compact_kv_cache,
            (k, v, torch.tensor([3, 5], dtype=torch.int32, device=device), accept_index),
        )


@pytest.mark.parametrize("device", devices())
def test_compiled_step(device):
    _, tree, candidates, _ = small_case(device)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 12, generator=g).to(device)
    k, v = torch.randn(2, 2, 20, 4).to(device), torch.randn(2, 2, 20, 4).to(device)
    lens = torch.tensor([3, 7], dtype=torch.int32, device=device)
    uniform, uniform_final = torch.rand(2, 6, generator=g).to(device), torch.rand(2, generator=g).to(device)

    def step(logits, k, v, lens, uniform, uniform_final):
        greedy = verify_tree_greedy(candidates, logits.argmax(-1), tree)
        p = sampling_probs(logits, temperature=0.8, top_k=5, top_p=0.95)
        sample = verify_tree_sample(candidates, p, tree, uniform, uniform_final)
        compact_kv_cache(k, v, lens, sample[0])
        return greedy, sample

    expected_k, expected_v, expected_lens = k.clone(), v.clone(), lens.clone()
    expected = step(logits, expected_k, expected_v, expected_lens, uniform, uniform_final)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(logits, k, v, lens, uniform, uniform_final)
    for a, b in zip(expected, got):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v) and torch.equal(lens, expected_lens)


# ------------------------------------------------------------------------------------------------- CUDA equals CPU
# (tests/test_cuda_sim.py runs the CUDA kernels themselves on the CPU against the CPU kernels; here, on a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("T,V", [(9, 13), (64, 600), (65, 32000)])
def test_cuda_equals_cpu(T, V, sampled):
    g = torch.Generator().manual_seed(T + V)
    B = 6
    parents = random_batch(T, B, g, full=False)
    tree_cpu, tree_gpu = build_tree(parents), build_tree(parents.cuda())
    for name in ("depth", "ancestor_bits", "first_child", "next_sibling", "leaf_paths", "num_leaves"):
        assert torch.equal(getattr(tree_cpu, name), getattr(tree_gpu, name).cpu()), name
    target = random_probs((B, T, V), g)
    draft = torch.softmax(torch.randn(B, T, V, generator=g), -1) if sampled else None
    candidates = torch.randint(0, 4, (B, T), generator=g)
    for _ in range(4):
        uniform, uniform_final = torch.rand(B, T, generator=g), torch.rand(B, generator=g)
        cpu = verify_tree_sample(candidates, target, tree_cpu, uniform, uniform_final, draft)
        gpu = verify_tree_sample(
            candidates.cuda(),
            target.cuda(),
            tree_gpu,
            uniform.cuda(),
            uniform_final.cuda(),
            None if draft is None else draft.cuda(),
        )
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b.cpu())
    target_ids = greedy_targets_following(parents, candidates, g)
    cpu = verify_tree_greedy(candidates, target_ids, tree_cpu)
    gpu = verify_tree_greedy(candidates.cuda(), target_ids.cuda(), tree_gpu)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
