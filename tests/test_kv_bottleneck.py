"""kv_bottleneck_lookup and DiscreteKeyValueBottleneck (docs/kv_bottleneck.md): selection and gathered values against
float64, the fused Triton kernel (interpreted in CI), gradcheck, zero gradient in unselected value rows, EMA
k-means keys, decoders, and the continual-learning property (values used only by task A stay bitwise unchanged
while training on task B with plain SGD)."""

import pytest
import torch
from helpers import gpu_available

from kestrel.nn import DiscreteKeyValueBottleneck
from kestrel.ops import kv_bottleneck_lookup
from kestrel.reference.kv_bottleneck import kv_bottleneck_lookup as reference

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def inputs(B=9, C=4, P=50, dk=14, dv=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, dk, generator=g, dtype=torch.float64).to(dtype)
    keys = torch.randn(C, P, dk, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(C, P, dv, generator=g, dtype=torch.float64).to(dtype)
    return z, keys, values


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lookup_equals_the_float64_reference(k, dtype):
    z, keys, values = inputs(seed=k, dtype=dtype)
    keys[2, 33] = keys[2, 7]  # a duplicated key: the lower index wins
    out, ids = kv_bottleneck_lookup(z, keys, values, k)
    ref_out, ref_ids = reference(z, keys, values, k)
    assert ids.shape == (9, 4, k) and ids.dtype == torch.int64 and out.dtype == dtype
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=1e-6)
    picked = ids[:, 2].reshape(-1).tolist()
    assert 33 not in picked or 7 in picked


@pytest.mark.triton
@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_triton_kernel_equals_the_cpu_path(k, dtype):
    from kestrel.kernels.vq_topk import vq_topk_triton
    from kestrel.ops.vq_topk import _code_terms, duplicate_groups

    device = "cuda" if gpu_available() else "cpu"
    z, keys, values = inputs(B=21, C=3, P=70, seed=10 + k, dtype=dtype)
    keys[1, 50] = keys[1, 12]  # a duplicated key: the copies tie, the lower index first
    scale, bias = _code_terms(keys, "l2", None)
    _, ids, out = vq_topk_triton(
        z.transpose(0, 1).to(device),
        keys.to(device),
        bias.to(device),
        scale.to(device),
        k,
        duplicate_groups(keys),
        values=values.to(device),
    )
    ref_out, ref_ids = kv_bottleneck_lookup(z.float(), keys.float(), values.float(), k)
    assert torch.equal(ids[..., :k].long().cpu().transpose(0, 1), ref_ids)
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.cpu().transpose(0, 1).float(), ref_out, atol=tol, rtol=tol)


def test_gradcheck_and_only_selected_value_rows_get_gradient():
    z, keys, values = inputs(B=6, C=3, P=20, dv=4, dtype=torch.float64)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: kv_bottleneck_lookup(z, keys, v, 2)[0], (values,))
    out, ids = kv_bottleneck_lookup(z, keys, values, 2)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected = torch.zeros_like(values)
    for b in range(6):
        for c in range(3):
            for p in ids[b, c].tolist():
                expected[c, p] += upstream[b, c] / 2
    torch.testing.assert_close(values.grad, expected)
    selected = torch.zeros(3, 20, dtype=torch.bool)
    for c in range(3):
        selected[c, ids[:, c].reshape(-1)] = True
    assert bool((values.grad[~selected] == 0).all())


def test_opcheck_and_compile():
    z, keys, values = inputs(B=5, C=2, P=16, dv=3)
    values.requires_grad_(True)
    torch.library.opcheck(torch.ops.kestrel.kv_bottleneck_lookup.default, (z, keys, values, 2))
    compiled = torch.compile(lambda a, b, c: kv_bottleneck_lookup(a, b, c, 2), fullgraph=True)
    out, ids = compiled(z, keys, values)
    ref_out, ref_ids = kv_bottleneck_lookup(z, keys, values, 2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(out, ref_out)


def test_lookup_argument_checks():
    z, keys, values = inputs(B=3, C=2, P=8)
    with pytest.raises(ValueError, match=r"keys must be \(C=2, P, dk=14\)"):
        kv_bottleneck_lookup(z, keys[:, :, :5], values)
    with pytest.raises(ValueError, match=r"values must be \(C, P, dv\) = \(2, 8, dv\)"):
        kv_bottleneck_lookup(z, keys, values[:, :5])
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, P=8\], got 9"):
        kv_bottleneck_lookup(z, keys, values, 9)
    with pytest.raises(ValueError, match=r"z_proj must be \(B, C, dk\)"):
        kv_bottleneck_lookup(z[0], keys, values)


@pytest.mark.parametrize("B, C", [(0, 4), (3, 0)])
def test_empty_batch_or_no_codebooks(B, C):
    """B = 0 (or C = 0) is legal: empty (B, C, dv) values and (B, C, k) ids, zero value gradient (the CPU path
    reshaped an empty tensor with -1; no kernel grid of size 0 is launched on a GPU)."""
    z, keys, values = inputs(B=B, C=C, P=8)
    values.requires_grad_(True)
    out, ids = kv_bottleneck_lookup(z, keys, values, 2)
    assert out.shape == (B, C, 10) and ids.shape == (B, C, 2) and ids.dtype == torch.int64
    out.sum().backward()
    assert values.grad.shape == values.shape and not bool(values.grad.any())


def test_k_must_be_an_int():
    z, keys, values = inputs(B=3, C=2, P=8)
    for k in (True, 2.0):
        with pytest.raises(TypeError, match="kv_bottleneck_lookup: k must be an int, got"):
            kv_bottleneck_lookup(z, keys, values, k)


def clustered(n, centres, generator, noise=0.05):
    pick = torch.randint(0, centres.shape[0], (n,), generator=generator)
    return centres[pick] + noise * torch.randn(n, centres.shape[1], generator=generator), pick


def test_ema_kmeans_keys_then_frozen():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 3
    dkvb = DiscreteKeyValueBottleneck(16, num_codebooks=4, num_pairs=8, dim_key=3, dim_value=2, generator=g)
    batches = [clustered(200, centres, g)[0] for _ in range(20)]
    dkvb.fit_keys(batches, epochs=2, generator=g)
    assert bool(dkvb.keys_frozen)
    with pytest.raises(RuntimeError, match="frozen"):
        dkvb.update_keys(batches[0])
    # every projected cluster centre has a key close to it (relative to the spread between centres)
    proj = dkvb.project(centres)  # (5, C, dk)
    for c in range(4):
        d = torch.cdist(proj[:, c], dkvb.keys[c]).min(-1).values
        spread = torch.cdist(proj[:, c], proj[:, c]).max()
        assert bool((d < 0.1 * spread).all())


@pytest.mark.parametrize("decoder", ["vote", "linear", "mlp"])
def test_decoders(decoder):
    dkvb = DiscreteKeyValueBottleneck(
        12, 6, 32, 4, 5, decoder=decoder, dim_out=None if decoder == "vote" else 3, topk=2
    )
    z = torch.randn(7, 12)
    out = dkvb(z)
    assert out.shape == ((7, 5) if decoder == "vote" else (7, 3))
    assert dkvb.last_ids.shape == (7, 6, 2)
    if decoder == "vote":
        values, _ = dkvb.retrieve(z)
        torch.testing.assert_close(out, values.mean(1))
    out.sum().backward()
    assert dkvb.values.grad is not None


def test_module_argument_checks():
    with pytest.raises(ValueError, match="decoder must be one of"):
        DiscreteKeyValueBottleneck(8, decoder="knn")
    with pytest.raises(ValueError, match="needs dim_out"):
        DiscreteKeyValueBottleneck(8, 4, 16, decoder="linear")
    with pytest.raises(ValueError, match=r"topk must be an integer in \[1, num_pairs=16\], got 17"):
        DiscreteKeyValueBottleneck(8, 4, 16, topk=17)
    with pytest.raises(ValueError, match=r"z must be \(B, dim_in=8\), got \(3, 9\)"):
        DiscreteKeyValueBottleneck(8, 4, 16)(torch.randn(3, 9))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(dim_in=True), TypeError, "dim_in must be an int, got bool True"),
        (dict(topk=True), TypeError, "topk must be an int, got bool True"),
        (dict(num_pairs=2.0), TypeError, "num_pairs must be an int, got float"),
        (dict(decoder="linear", dim_out=0), ValueError, "dim_out must be a positive integer, got 0"),
        (dict(decoder="mlp", dim_out=3, hidden=0), ValueError, "hidden must be a positive integer, got 0"),
        (dict(ema_decay=True), TypeError, "ema_decay must be a number, got bool True"),
        (dict(ema_decay=float("nan")), ValueError, r"ema_decay must lie in \(0, 1\), got nan"),
        (dict(dead_threshold=-1.0), ValueError, "dead_threshold must be a finite number >= 0, got -1.0"),
    ],
)
def test_module_constructor_checks(kwargs, error, message):
    args = dict(dim_in=8, num_codebooks=4, num_pairs=16)
    args.update(kwargs)
    with pytest.raises(error, match="DiscreteKeyValueBottleneck: " + message):
        DiscreteKeyValueBottleneck(**args)


def test_module_empty_batch_and_update_checks():
    """An empty batch retrieves nothing; update_keys refuses it (randint on an empty range) and a NaN batch (it made
    the EMA statistics NaN) before changing any state."""
    dkvb = DiscreteKeyValueBottleneck(8, 4, 16, dim_value=3)
    assert dkvb(torch.randn(0, 8)).shape == (0, 3)
    keys, counts = dkvb.keys.clone(), dkvb.ema_counts.clone()
    with pytest.raises(ValueError, match=r"update_keys: z must hold at least one row, got shape \(0, 8\)"):
        dkvb.update_keys(torch.randn(0, 8))
    z = torch.randn(5, 8)
    z[2, 1] = float("nan")
    with pytest.raises(ValueError, match="update_keys: z must be finite"):
        dkvb.update_keys(z)
    assert torch.equal(dkvb.keys, keys) and torch.equal(dkvb.ema_counts, counts)
    with pytest.raises(TypeError, match="z must be a float tensor"):
        dkvb(torch.ones(2, 8, dtype=torch.long))


def test_continual_learning_leaves_task_a_values_untouched():
    """Train on task A (classes 0-2), then on task B (classes 3-5) with plain SGD: every value row that task A's
    inputs select and task B's never do stays bitwise unchanged, and task A's predictions are unchanged."""
    g = torch.Generator().manual_seed(1)
    dim, classes = 24, 6
    centres = torch.randn(classes, dim, generator=g) * 4
    dkvb = DiscreteKeyValueBottleneck(dim, num_codebooks=16, num_pairs=64, dim_key=6, dim_value=classes, generator=g)
    dkvb.fit_keys([clustered(256, centres, g)[0] for _ in range(10)], generator=g)

    def task(class_ids, n):
        x, pick = clustered(n, centres[class_ids], g)
        return x, torch.as_tensor(class_ids)[pick]

    def train(x, y, steps=30):
        opt = torch.optim.SGD(dkvb.parameters(), lr=0.5)
        selected = torch.zeros(16, 64, dtype=torch.bool)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(dkvb(x), y)
            loss.backward()
            opt.step()
            for c in range(16):
                selected[c, dkvb.last_ids[:, c].reshape(-1)] = True
        return selected

    xa, ya = task([0, 1, 2], 300)
    xb, yb = task([3, 4, 5], 300)
    used_a = train(xa, ya)
    assert (dkvb(xa).argmax(-1) == ya).float().mean() > 0.9
    values_after_a = dkvb.values.detach().clone()
    predictions_a = dkvb(xa).detach().clone()
    used_b = train(xb, yb)
    only_a = used_a & ~used_b
    assert int(only_a.sum()) > 0
    assert torch.equal(dkvb.values.detach()[only_a], values_after_a[only_a])
    assert not torch.equal(dkvb.values.detach()[used_b], values_after_a[used_b])  # task B did learn
    assert (dkvb(xb).argmax(-1) == yb).float().mean() > 0.9
    if not bool((used_a & used_b).any()):
        assert torch.equal(dkvb(xa), predictions_a)


@pytest.mark.gpu
def test_cuda_lookup_equals_cpu():
    z, keys, values = inputs(B=33, C=5, P=300)
    out, ids = kv_bottleneck_lookup(z, keys, values, 2)
    out_g, ids_g = kv_bottleneck_lookup(z.cuda(), keys.cuda(), values.cuda(), 2)
    assert torch.equal(ids_g.cpu(), ids)
    torch.testing.assert_close(out_g.cpu(), out)
