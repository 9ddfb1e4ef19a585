"""CodebookLayer (docs/codebook.md): the selection against float64, mean/sum of the codes, the straight-through
input gradient, gradient only in the selected codebook rows (gradcheck), per-head codebooks equal the per-head
loop, exact counts, dead-code replacement, k-means initialisation, and the interventions (ids, force, ban)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import devices

from kestrel.nn import CodebookLayer
from kestrel.reference.vq_topk import vq_topk as reference_topk


def make_layer(dim=8, num_codes=40, k=3, heads=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return CodebookLayer(dim, num_codes, k, heads=heads, **kwargs)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_forward_is_the_mean_or_sum_of_the_float64_top_k_codes(metric, reduce):
    layer = make_layer(metric=metric, reduce=reduce, layernorm=(metric != "ip"))
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    out, ids = layer(x, return_ids=True)
    assert out.shape == x.shape and ids.shape == (3, 7, 2, 3)
    xh = x.reshape(-1, 2, 8)
    if layer.layernorm:
        xh = F.layer_norm(xh, (8,))
    _, ref_ids = reference_topk(xh.transpose(0, 1), layer.codebook, 3, metric)
    assert torch.equal(ids.reshape(-1, 2, 3).transpose(0, 1), ref_ids)
    codes = torch.stack([layer.codebook[h][ref_ids[h]] for h in range(2)])  # (H, M, k, dim)
    expected = codes.mean(2) if reduce == "mean" else codes.sum(2)
    torch.testing.assert_close(out, expected.transpose(0, 1).reshape(3, 7, 16))


def test_straight_through_input_gradient_and_selected_rows_only():
    layer = make_layer(layernorm=False)
    x = torch.randn(5, 16, requires_grad=True)
    upstream = torch.randn(5, 16)
    out, ids = layer(x, return_ids=True)
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)  # grad_in == grad_out exactly
    grad = layer.codebook.grad
    expected = torch.zeros_like(grad)
    up = upstream.reshape(5, 2, 8)
    for m in range(5):
        for h in range(2):
            for j in ids[m, h].tolist():
                expected[h, j] += up[m, h] / 3
    torch.testing.assert_close(grad, expected)
    selected = torch.zeros(2, 40, dtype=torch.bool)
    for h in range(2):
        selected[h, ids[:, h].reshape(-1)] = True
    assert bool((grad[~selected] == 0).all()), "an unselected codebook row got gradient"


def test_layernorm_input_gradient_is_the_straight_through_gradient_through_layernorm():
    layer = make_layer(layernorm=True)
    x = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 16)
    layer(x).backward(upstream)
    x2 = x.detach().clone().requires_grad_(True)
    F.layer_norm(x2.reshape(4, 2, 8), (8,)).reshape(4, 16).backward(upstream)
    torch.testing.assert_close(x.grad, x2.grad)


def test_gradcheck_of_the_codebook_path_in_float64():
    layer = make_layer(dtype=torch.float64, layernorm=False, metric="l2")
    x = torch.randn(6, 16, dtype=torch.float64)
    with torch.no_grad():
        _, ids = layer(x, return_ids=True)

    def fn(codebook):
        layer.codebook.data = codebook.detach()
        # the selection is fixed by x; gradcheck perturbs the codebook by 1e-6, far from any ranking change
        flat = ids.reshape(-1, 2, 3) + torch.arange(2)[None, :, None] * 40
        return F.embedding(flat, codebook.reshape(-1, 8)).mean(2)

    codebook = layer.codebook.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (codebook,))
    # and the layer's own backward equals that autograd gradient
    layer.codebook.data = codebook.detach().clone()
    layer.codebook.grad = None
    upstream = torch.randn(6, 16, dtype=torch.float64)
    layer(x).backward(upstream)
    codebook.grad = None
    fn(codebook).reshape(6, 16).backward(upstream)
    torch.testing.assert_close(layer.codebook.grad, codebook.grad)


def test_sparse_gradient_equals_the_dense_one():
    dense, sparse = make_layer(seed=3), make_layer(seed=3, sparse_grad=True)
    x = torch.randn(9, 16)
    dense(x).sum().backward()
    sparse(x).sum().backward()
    assert sparse.codebook.grad.is_sparse
    torch.testing.assert_close(sparse.codebook.grad.to_dense(), dense.codebook.grad)


def test_heads_in_one_call_equal_the_per_head_loop():
    layer = make_layer(heads=3, dim=8)
    x = torch.randn(2, 6, 24)
    out, ids = layer(x, return_ids=True)
    for h in range(3):
        single = CodebookLayer(8, 40, 3, heads=1)
        single.codebook.data = layer.codebook.data[h].clone()
        o_h, i_h = single(x[..., h * 8 : (h + 1) * 8], return_ids=True)
        assert torch.equal(i_h[..., 0, :], ids[..., h, :])
        assert torch.equal(o_h, out[..., h * 8 : (h + 1) * 8])


def test_counts_equal_a_bincount_of_the_ids_and_only_in_training():
    layer = make_layer()
    all_ids = []
    for seed in range(3):
        _, ids = layer(torch.randn(10, 16, generator=torch.Generator().manual_seed(seed)), return_ids=True)
        all_ids.append(ids)
    ids = torch.cat(all_ids)
    for h in range(2):
        assert torch.equal(layer.code_counts[h], torch.bincount(ids[:, h].reshape(-1), minlength=40))
    layer.eval()
    before = layer.code_counts.clone()
    layer(torch.randn(10, 16))
    assert torch.equal(layer.code_counts, before)
    layer.reset_counts()
    assert int(layer.code_counts.sum()) == 0


def test_replace_dead_codes_reseeds_only_unused_codes_from_recent_inputs():
    layer = make_layer(num_codes=40, layernorm=False, metric="l2", recent_size=64)
    with pytest.raises(RuntimeError, match="no recent inputs"):
        layer.replace_dead_codes()
    x = torch.randn(30, 16)
    layer(x)
    alive = layer.code_counts > 0
    before = layer.codebook.detach().clone()
    replaced = layer.replace_dead_codes(noise=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(replaced, (~alive).sum(-1))
    assert torch.equal(layer.codebook[alive], before[alive])
    recent = x.reshape(30, 2, 8)
    for h in range(2):
        for row in layer.codebook[h][~alive[h]]:
            assert bool((recent[:, h] == row).all(-1).any()), "a re-seeded code is not a recent input"
    assert int(layer.code_counts.sum()) == 0


@pytest.mark.parametrize("device", devices())
def test_kmeans_init_finds_separated_clusters(device):
    """k-means++ seeding (D² sampling on the device) then Lloyd's iterations recover separated clusters."""
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(2, 6, 4, generator=g) * 10
    assign = torch.randint(0, 6, (600, 2), generator=g)
    samples = torch.stack([centres[h][assign[:, h]] for h in range(2)], 1) + 0.01 * torch.randn(600, 2, 4, generator=g)
    layer = CodebookLayer(4, 6, 1, heads=2, metric="l2", layernorm=False, device=device)
    err = layer.kmeans_init(samples.reshape(600, 8).to(device), iters=10, generator=torch.Generator().manual_seed(0))
    assert float(err.max()) < 1e-2
    codebook = layer.codebook.detach().cpu()
    for h in range(2):
        dist = torch.cdist(codebook[h], centres[h])
        assert bool((dist.min(0).values < 0.05).all()), "a true centre has no code near it"


def test_ban_and_force_interventions():
    layer = make_layer(k=2)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    _, ids = layer(x, return_ids=True)
    popular = ids[..., 0, :].reshape(-1).unique()[:3].tolist()
    layer.ban(popular, head=0)
    _, banned_ids = layer(x, return_ids=True)
    assert not set(banned_ids[..., 0, :].reshape(-1).tolist()) & set(popular)
    layer.clear_interventions()
    layer.force([5, 9], positions=[3])
    out, forced = layer(x, return_ids=True)
    assert forced[:, 3].tolist() == [[[5, 9], [5, 9]]] * 2
    assert torch.equal(forced[:, :3], ids[:, :3]) and torch.equal(forced[:, 4:], ids[:, 4:])
    expected = torch.stack([layer.codebook[h][[5, 9]].mean(0) for h in range(2)]).reshape(16)
    torch.testing.assert_close(out[1, 3], expected)
    # a decoding step passes absolute positions: the token at position 3 is forced, position 4 is not
    _, step_ids = layer(x[:, 3:4], positions=torch.tensor([3]), return_ids=True)
    assert step_ids[:, 0].tolist() == [[[5, 9], [5, 9]]] * 2
    _, step_ids = layer(x[:, 4:5], positions=torch.tensor([4]), return_ids=True)
    assert torch.equal(step_ids[:, 0], ids[:, 4])
    layer.force([[1, 2], [3, 4]])  # everywhere, per head; the codes forced at position 3 still win there
    _, everywhere = layer(x, return_ids=True)
    assert everywhere[:, 3].tolist() == [[[5, 9], [5, 9]]] * 2
    assert everywhere[:, 0].tolist() == [[[1, 2], [3, 4]]] * 2
    layer.clear_interventions()
    layer.force([[1, 2], [3, 4]])
    _, everywhere = layer(x, return_ids=True)
    assert bool((everywhere[..., 0, :] == torch.tensor([1, 2])).all())
    assert bool((everywhere[..., 1, :] == torch.tensor([3, 4])).all())


def test_argument_checks():
    with pytest.raises(ValueError, match="metric must be one of"):
        CodebookLayer(8, 10, metric="dot")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, num_codes=10\], got 11"):
        CodebookLayer(8, 10, 11)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'sum'"):
        CodebookLayer(8, 10, reduce="max")
    layer = CodebookLayer(8, 10, 2, heads=2)
    with pytest.raises(ValueError, match="last dimension must be heads \\* dim = 16, got 8"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="leaves 1 codes, fewer than k=2"):
        layer.ban(range(9))
    assert layer.banned is None  # a refused ban leaves the state untouched
    with pytest.raises(ValueError, match=r"codes must lie in \[0, num_codes=10\)"):
        layer.force([3, 12])
    with pytest.raises(ValueError, match="give k=2 codes per head, got 3"):
        layer.force([1, 2, 3])
    with pytest.raises(ValueError, match="needs at least num_codes=10 samples, got 4"):
        layer.kmeans_init(torch.randn(4, 16))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(recent_size=0), ValueError, "recent_size must be a positive integer, got 0"),
        (dict(recent_size=-3), ValueError, "recent_size must be a positive integer, got -3"),
        (dict(recent_size=2.5), TypeError, "recent_size must be an int, got float 2.5"),
        (dict(dim=0), ValueError, "dim must be a positive integer, got 0"),
        (dict(dim=True), TypeError, "dim must be an int, got bool True"),
        (dict(num_codes=-1), ValueError, "num_codes must be a positive integer, got -1"),
        (dict(k=0), ValueError, r"k must be an integer in \[1, num_codes=10\], got 0"),
        (dict(k=True), TypeError, "k must be an int, got bool True"),
        (dict(heads=0), ValueError, "heads must be a positive integer, got 0"),
        (dict(heads=2.0), TypeError, "heads must be an int, got float 2.0"),
        (dict(metric="dot"), ValueError, "metric must be one of"),
        (dict(reduce="max"), ValueError, "reduce must be 'mean' or 'sum'"),
        (dict(layernorm=None), TypeError, "layernorm must be a bool, got NoneType None"),
    ],
)
def test_constructor_checks(kwargs, error, message):
    """Every constructor argument is checked up front: recent_size=0 used to fail in the first training forward,
    after code_counts had been updated."""
    args = dict(dim=8, num_codes=10, k=2)
    args.update(kwargs)
    with pytest.raises(error, match="CodebookLayer: " + message):
        CodebookLayer(args.pop("dim"), args.pop("num_codes"), args.pop("k"), **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_kmeans_init_rejects_non_finite_samples_and_keeps_the_codebook(bad):
    """A NaN or inf sample gave a NaN codebook; now a clear error, and the codebook and counts stay as they were."""
    layer = make_layer(num_codes=4, k=1)
    layer.train()
    layer(torch.randn(5, 16))
    before, counts = layer.codebook.detach().clone(), layer.code_counts.clone()
    samples = torch.randn(50, 16)
    samples[7, 3] = bad
    with pytest.raises(ValueError, match=r"kmeans_init: samples must be finite in float32, got \d+ NaN/inf values"):
        layer.kmeans_init(samples)
    assert torch.equal(layer.codebook.detach(), before) and torch.equal(layer.code_counts, counts)


def test_kmeans_init_argument_checks():
    layer = make_layer(num_codes=4, k=1)
    before = layer.codebook.detach().clone()
    for iters, error, message in (
        (0, ValueError, "iters must be >= 1, got 0"),
        (-1, ValueError, "iters must be >= 1"),
        (True, TypeError, "iters must be an int, got bool"),
        (2.5, TypeError, "iters must be an int, got float"),
    ):
        with pytest.raises(error, match="CodebookLayer.kmeans_init: " + message):
            layer.kmeans_init(torch.randn(50, 16), iters=iters)
    with pytest.raises(TypeError, match="samples must be a float tensor"):
        layer.kmeans_init(torch.ones(50, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="last dimension must be heads \\* dim = 16, got 15"):
        layer.kmeans_init(torch.randn(50, 15))
    assert torch.equal(layer.codebook.detach(), before)


def test_interventions_refuse_float_ids_and_bad_noise():
    """Float codes, positions or heads were truncated silently; replace_dead_codes(noise=nan) made codes NaN."""
    layer = make_layer(k=1)
    with pytest.raises(TypeError, match="CodebookLayer.ban: codes must be integers, got torch.float32"):
        layer.ban([1.5])
    with pytest.raises(TypeError, match="CodebookLayer.ban: codes must be integers, got torch.bool"):
        layer.ban([True])
    with pytest.raises(TypeError, match="CodebookLayer.ban: head must be an int, got bool True"):
        layer.ban([1], head=True)
    with pytest.raises(TypeError, match="CodebookLayer.force: codes must be integers"):
        layer.force([2.7])
    with pytest.raises(TypeError, match="CodebookLayer.force: positions must be integers"):
        layer.force([2], positions=[1, 2.5])
    assert layer.banned is None and layer.forced == {}
    layer.force([2], positions=torch.tensor([3]))
    assert list(layer.forced) == [3]
    layer.train()
    layer(torch.randn(6, 16))
    before = layer.codebook.detach().clone()
    with pytest.raises(ValueError, match="replace_dead_codes: noise must be a finite number >= 0, got nan"):
        layer.replace_dead_codes(noise=float("nan"))
    assert torch.equal(layer.codebook.detach(), before)
    with pytest.raises(TypeError, match="the input must be a float tensor"):
        layer(torch.ones(3, 16, dtype=torch.long))


@pytest.mark.gpu
def test_cuda_layer_equals_cpu_layer():
    layer = make_layer()
    x = torch.randn(4, 9, 16)
    out, ids = layer(x, return_ids=True)
    gpu = make_layer().cuda()
    out_g, ids_g = gpu(x.cuda(), return_ids=True)
    assert torch.equal(ids_g.cpu(), ids)
    torch.testing.assert_close(out_g.cpu(), out)
    # interventions set before a move follow the module to the GPU
    moved = make_layer()
    moved.ban([0, 1])
    moved.force([4, 5, 6], positions=[2])
    moved.cuda()
    _, ids_m = moved(x.cuda(), return_ids=True)
    assert not bool(((ids_m == 0) | (ids_m == 1)).any())
    assert ids_m[:, 2].tolist() == [[[4, 5, 6], [4, 5, 6]]] * 4
