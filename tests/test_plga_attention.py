"""Power-law graph attention and the G-cache: the op against float64 (G = I equals SDPA; q·G, not Gᵀ), GQA, decode,
backward (gradcheck), compile; the module's metric learner, G-cache, predefined G, parameter names."""

import math

import pytest
import torch
import torch.nn.functional as F

import kestrel
from kestrel.nn.plga import PLGACache, rope
from kestrel.ops import plga_attention


def float64_plga(q, k, v, G, causal=True, lens=None):
    """softmax((q·G)·kᵀ/√d + mask)·v in float64, row by row (rows at the end of each sequence's keys)."""
    q, k, v, G = q.double(), k.double(), v.double(), G.double()
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    G = G.expand(B, Hq, d, d)
    out = torch.zeros(B, Hq, Lq, d, dtype=torch.float64)
    for b in range(B):
        length = int(lens[b]) if lens is not None else Lk
        for i in range(Lq):
            n = length - Lq + i + 1 if causal else length
            scores = torch.einsum("hd,hnd->hn", torch.einsum("hd,hde->he", q[b, :, i], G[b]), k[b, :, :n])
            out[b, :, i] = torch.einsum("hn,hnd->hd", torch.softmax(scores / math.sqrt(d), -1), v[b, :, :n])
    return out


def inputs(B, Hq, Hkv, Lq, Lk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda H, L: torch.randn(B, H, L, d, generator=g).to(dtype)  # noqa: E731
    G = torch.randn(1, Hq, d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    return make(Hq, Lq), make(Hkv, Lk), make(Hkv, Lk), G


@pytest.mark.parametrize(
    "case",
    [
        (1, 2, 2, 1, 1, 16, True),
        (2, 4, 2, 3, 3, 16, True),
        (1, 2, 1, 4, 4, 64, False),
        (1, 4, 1, 65, 65, 64, True),
        (2, 2, 2, 3, 20, 32, True),
    ],
)
def test_matches_float64(case):
    B, Hq, Hkv, Lq, Lk, d, causal = case
    q, k, v, G = inputs(B, Hq, Hkv, Lq, Lk, d)
    torch.testing.assert_close(
        plga_attention(q, k, v, G, causal=causal).double(), float64_plga(q, k, v, G, causal), atol=2e-5, rtol=1e-4
    )


def test_identity_equals_sdpa_and_orientation_is_q_times_g():
    q, k, v, G = inputs(2, 4, 4, 9, 9, 32, seed=1)
    eye = torch.eye(32).expand(1, 4, 32, 32)
    torch.testing.assert_close(
        plga_attention(q, k, v, eye), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-5
    )
    # a non-symmetric G after RoPE: q·G, not Gᵀ
    positions = torch.arange(9)
    rq = rope(q.transpose(1, 2), positions).transpose(1, 2)
    rk = rope(k.transpose(1, 2), positions).transpose(1, 2)
    ours = plga_attention(rq, rk, v, G)
    torch.testing.assert_close(ours.double(), float64_plga(rq, rk, v, G), atol=2e-5, rtol=1e-4)
    transposed = float64_plga(rq, rk, v, G.transpose(-1, -2))
    assert (ours.double() - transposed).abs().max() > 1e-2


def test_decode_rows_and_cache_lengths():
    q, k, v, G = inputs(2, 2, 1, 12, 12, 16, seed=2)
    full = plga_attention(q, k, v, G)
    rows = torch.cat([plga_attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], G) for i in range(12)], 2)
    torch.testing.assert_close(rows, full, atol=1e-6, rtol=1e-5)
    lens = torch.tensor([12, 7])
    out = plga_attention(q[:, :, :2], k, v, G, cache_seqlens=lens)
    torch.testing.assert_close(out.double(), float64_plga(q[:, :, :2], k, v, G, lens=lens), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("causal", [True, False])
def test_keys_past_the_cache_lengths_are_ignored(bad, causal):
    """NaN or inf in the unused cache rows (past cache_seqlens) reach neither the output nor the gradients: a -inf
    score alone still multiplied those values by a zero weight (0 * NaN = NaN), and a NaN key made a NaN score."""
    q, k, v, G = inputs(2, 2, 1, 2, 20, 16, seed=8)
    lens = torch.tensor([20, 11])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    results = []
    for dirty in (False, True):
        keys, values = k.clone(), v.clone()
        if dirty:
            keys[1, :, 11:], values[1, :, 11:] = bad, bad
        leaves = [t.clone().requires_grad_(True) for t in (q, keys, values, G)]
        out = plga_attention(*leaves, causal=causal, cache_seqlens=lens)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for clean, dirty in zip(*results):
        assert bool(torch.isfinite(dirty).all())
        torch.testing.assert_close(dirty, clean, atol=0, rtol=0)


def test_empty_batch_with_cache_lengths_and_argument_checks():
    """B = 0 with cache_seqlens is an empty result (the length check read the min of an empty tensor); a zero head
    dim, an integer G and float or list cache lengths are clear errors."""
    q, k, v, G = inputs(0, 2, 1, 1, 5, 16)
    out = plga_attention(q, k, v, G, cache_seqlens=torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 2, 1, 16)
    q, k, v, G = inputs(1, 2, 1, 3, 5, 16)
    with pytest.raises(ValueError, match=r"plga_attention: the head dim d must be >= 1 \(q.shape\[-1\]\)"):
        plga_attention(q[..., :0], k[..., :0], v[..., :0], G[..., :0, :0])
    with pytest.raises(TypeError, match="plga_attention: G must be a floating-point tensor, got torch.int64"):
        plga_attention(q, k, v, G.long())
    with pytest.raises(
        ValueError,
        match=r"cache_seqlens must be an int32/int64 tensor of shape \(1,\), got "
        r"torch.float32",
    ):
        plga_attention(q, k, v, G, cache_seqlens=torch.tensor([4.0]))
    with pytest.raises(TypeError, match="cache_seqlens must be None or an int32/int64 tensor"):
        plga_attention(q, k, v, G, cache_seqlens=[4])


@pytest.mark.gpu
def test_gpu_lengths_of_a_cpu_computation_are_checked():
    q, k, v, G = inputs(1, 2, 1, 3, 5, 16)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[Lq=3, Lk=5\], got values in \[9, 9\]"):
        plga_attention(q, k, v, G, cache_seqlens=torch.tensor([9], device="cuda"))


def test_backward_gradcheck_and_formulas():
    q, k, v, G = (t.double().requires_grad_(True) for t in inputs(1, 2, 1, 5, 5, 8, seed=3))
    assert torch.autograd.gradcheck(lambda a, b, c, g: plga_attention(a, b, c, g), (q, k, v, G))
    # dG = Σ_l q_lᵀ dq'_l and dq = dq'·Gᵀ, against the explicit product
    qm = (q @ G).detach().requires_grad_(True)
    out = F.scaled_dot_product_attention(qm, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    grad = torch.randn_like(out)
    (dqm,) = torch.autograd.grad(out, qm, grad)
    dq, dG = torch.autograd.grad(plga_attention(q, k, v, G), (q, G), grad)
    torch.testing.assert_close(dq, dqm @ G.transpose(-1, -2))
    torch.testing.assert_close(dG, (q.transpose(-1, -2) @ dqm).sum(0, keepdim=True))


def test_compile_and_errors():
    q, k, v, G = inputs(1, 2, 1, 5, 5, 16, seed=4)
    compiled = torch.compile(lambda a, b, c, g: plga_attention(a, b, c, g), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, G), plga_attention(q, k, v, G))
    with pytest.raises(ValueError, match=r"G must be \(B=1 or 1, Hq=2, d=16, d=16\), got \(1, 2, 16, 8\)"):
        plga_attention(q, k, v, G[..., :8])
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of the key/value heads \(3\)"):
        plga_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), G)


def test_module_g_cache_decode_and_names():
    torch.manual_seed(5)
    layer = kestrel.nn.PowerLawGraphAttention(64, 4, A_dff=24)
    names = set(layer.state_dict())
    for name in (
        "wq.weight",
        "wk.bias",
        "dense.weight",
        "layernorm1.weight",
        "plgatt_layer.Wlst",
        "plgatt_layer.blst",
        "plgatt_layer.pwlst",
        "plgatt_layer.alst",
        "plgatt_layer.balst",
        "reslayerAs.7.layernormA.weight",
        "reslayerAs.0.denseAs.1.gluw3.weight",
        "reslayerAs.3.denseAs.0.gluw2.bias",
    ):
        assert name in names, name
    assert layer.plgatt_layer.Wlst.shape == (4, 16, 16)
    calls = []
    layer.reslayerAs[0].register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 10, 64)
    full, _ = layer(x)
    assert len(calls) == 1
    y, cache = layer(x[:, :6])
    assert isinstance(cache, PLGACache) and cache.G.shape == (2, 4, 16, 16) and cache.A.shape == (2, 4, 16, 16)
    prompt_G = cache.G
    rows = [y]
    for i in range(6, 10):
        y, cache = layer(x[:, i : i + 1], cache=cache)
        rows.append(y)
        assert cache.G is prompt_G  # the G-cache: built once from the prompt
    assert len(calls) == 2  # the metric learner ran on the two prompts only
    decoded = torch.cat(rows, 1)
    # the prompt fixes G: the first 6 rows equal the full pass's only if G came from the same prompt, so compare
    # with a full pass whose G is the 6-token prompt's
    fixed = kestrel.nn.PowerLawGraphAttention(64, 4, A_dff=24, G=prompt_G[0])
    fixed.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if k.split(".")[0] in ("wq", "wk", "wv", "dense")}, strict=False
    )
    torch.testing.assert_close(decoded[:1], fixed(x[:1])[0], atol=1e-5, rtol=1e-4)
    # use_g_cache=False rebuilds G from the cached metric each step: the same rows
    layer.use_g_cache = False
    y, cache = layer(x[:, :6])
    assert cache.G is None and cache.A is not None
    rebuilt = [y]
    for i in range(6, 10):
        y, cache = layer(x[:, i : i + 1], cache=cache)
        rebuilt.append(y)
    torch.testing.assert_close(torch.cat(rebuilt, 1), decoded, atol=1e-6, rtol=1e-5)


def test_predefined_identity_g_is_rope_attention():
    torch.manual_seed(6)
    layer = kestrel.nn.PowerLawGraphAttention(64, 4, G="identity")
    assert not any(name.startswith("plgatt_layer") or name.startswith("reslayerAs") for name in layer.state_dict())
    x = torch.randn(1, 8, 64)
    y, _ = layer(x)
    split = lambda t: t.view(1, 8, 4, 16)  # noqa: E731
    positions = torch.arange(8)
    q = rope(split(layer.wq(x)), positions).transpose(1, 2)
    k = rope(split(layer.wk(x)), positions).transpose(1, 2)
    v = split(layer.wv(x)).transpose(1, 2)
    expected = layer.dense(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 8, 64))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"a predefined G must be \(num_heads=4, d=16, d=16\)"):
        kestrel.nn.PowerLawGraphAttention(64, 4, G=torch.eye(8))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_heads=0), ValueError, "num_heads must be >= 1, got 0"),
        (dict(num_heads=-2), ValueError, "num_heads must be >= 1, got -2"),
        (dict(d_model=0), ValueError, "d_model must be >= 1, got 0"),
        (dict(num_heads=True), TypeError, "num_heads must be an int, got bool True"),
        (dict(num_heads=3), ValueError, r"d_model \(64\) must be a multiple of num_heads \(3\)"),
        (dict(d_model=6, num_heads=2), ValueError, "the head dim d_model / num_heads must be even for RoPE, got 3"),
        (dict(A_dff=0), ValueError, "A_dff must be >= 1, got 0"),
        (dict(num_reslayerA=-1), ValueError, "num_reslayerA must be >= 0, got -1"),
        (dict(num_denseA=0), ValueError, "num_denseA must be >= 1, got 0"),
        (dict(rope_base=0.0), ValueError, "rope_base must be a finite number > 0, got 0.0"),
        (dict(G=[[1.0]]), TypeError, "G must be None, 'identity' or a float tensor"),
        (dict(G=torch.ones(4, 16, 16, dtype=torch.long)), TypeError, "G must be None, 'identity' or a float tensor"),
    ],
)
def test_module_constructor_checks(kwargs, error, message):
    """num_heads=0 divided by zero, an odd head dim failed in RoPE at the first forward, A_dff=0 or a negative
    number of residual units built a module."""
    args = dict(d_model=64, num_heads=4)
    args.update(kwargs)
    with pytest.raises(error, match="PowerLawGraphAttention: " + message):
        kestrel.nn.PowerLawGraphAttention(**args)


def test_module_cache_of_another_batch_is_refused():
    layer = kestrel.nn.PowerLawGraphAttention(32, 2, A_dff=8, num_reslayerA=1)
    _, cache = layer(torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="PowerLawGraphAttention: the cache holds 2 sequences, x has 1"):
        layer(torch.randn(1, 1, 32), cache=cache)


def test_negative_powers_stay_finite_in_float32():
    torch.manual_seed(7)
    layer = kestrel.nn.PowerLawGraphAttention(32, 2, A_dff=8, num_reslayerA=2)
    with torch.no_grad():
        layer.plgatt_layer.pwlst.fill_(-1.5)
    y, cache = layer(torch.randn(1, 5, 32))
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(cache.G).all())
    assert bool((cache.a_lm > 0).all())  # iSwiGLU(x) + 1e-9 > 0


@pytest.mark.parametrize("Hkv", [1, 2])
def test_tree_mode_matches_float64(Hkv):
    """The draft-tree mode: q·G, then the tree attention over the prefix and the ancestors-or-self (the packed
    bits), GQA, per-sequence prefixes; slots no row sees hold NaN."""
    from kestrel.reference.tree import ancestor_bits

    parents = [[-1, 0, 0, 1, 1, 2, 3, -2, -2], [-1, 0, 1, 2, 0, 4, 4, 5, 6]]
    prefix, T, d = [11, 0], 9, 16
    q, k, v, G = inputs(2, 2, Hkv, T, max(prefix) + T + 2, d, seed=4)
    G = G.expand(2, 2, d, d).clone()
    for b in range(2):
        unused = [prefix[b] + j for j in range(T) if parents[b][j] == -2] + list(range(prefix[b] + T, k.shape[2]))
        k[b, :, unused], v[b, :, unused] = float("nan"), float("nan")
    out = plga_attention(
        q,
        k,
        v,
        G,
        cache_seqlens=torch.tensor(prefix, dtype=torch.int32),
        tree_mask_bits=ancestor_bits(torch.tensor(parents)),
    )
    expected = torch.zeros(2, 2, T, d, dtype=torch.float64)
    kk, vv = k.double().repeat_interleave(2 // Hkv, 1), v.double().repeat_interleave(2 // Hkv, 1)
    for b in range(2):
        for i in range(T):
            if parents[b][i] == -2 and prefix[b] == 0:
                continue
            path = [] if parents[b][i] == -2 else [i]
            while path and parents[b][path[-1]] >= 0:
                path.append(parents[b][path[-1]])
            keys = list(range(prefix[b])) + [prefix[b] + j for j in path]
            qg = torch.einsum("hd,hde->he", q[b, :, i].double(), G[b].double())
            scores = torch.einsum("hd,hnd->hn", qg, kk[b][:, keys]) / math.sqrt(d)
            expected[b, :, i] = torch.einsum("hn,hnd->hd", torch.softmax(scores, -1), vv[b][:, keys])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
