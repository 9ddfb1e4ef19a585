"""Every CUDA kernel of kestrel executed on the CPU: the torch-facing CUDA launchers and the device code, unchanged,
built against tests/cuda_sim (kestrel_sim: threads, shared memory, __syncthreads, warp shuffles, CUDA's half
conversions) and registered as torch.ops.kestrel_sim.<op>. Each test runs an op through it and through the CPU
kernels (torch.ops.kestrel.<op>) on identical CPU tensors and asserts the same bits: several tensors per launch,
partial last blocks, several CTAs, every dtype, NaN/Inf, the edge cases of the CPU tests.

The extension is built once per session (about a minute on two cores) into build/cuda_sim."""

import sys
from pathlib import Path

import pytest
import torch

import kestrel
from kestrel.decoding import build_tree
from kestrel.ops import quantize as Q

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def sim():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_sim"))
    import build

    build.load()
    return torch.ops.kestrel_sim


def tensors_mapped(fn, a):
    """a with fn applied to every tensor in it (through lists and tuples)."""
    if torch.is_tensor(a):
        return fn(a)
    if isinstance(a, (list, tuple)):
        return type(a)(tensors_mapped(fn, x) for x in a)
    return a


def clone(a):
    return tensors_mapped(torch.Tensor.clone, a)


def both(sim, name, *args):
    """(CPU kernels' result, CUDA kernels' result) of op `name` on separate clones of the tensor arguments."""
    cpu_args, sim_args = clone(args), clone(args)
    cpu_out = getattr(torch.ops.kestrel, name)(*cpu_args)
    sim_out = getattr(sim, name)(*sim_args)
    return (cpu_out, cpu_args), (sim_out, sim_args)


def assert_same(a, b, what=""):
    """The same bits, except that NaNs only need to sit in the same places: a NaN's payload differs between
    c10's half conversions (the CPU kernels: the sign and a quiet bit kept) and CUDA's (the canonical 0x7fff)."""
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        if a.dtype.is_floating_point:
            nan_a, nan_b = torch.isnan(a), torch.isnan(b)
            assert torch.equal(nan_a, nan_b), f"{what}: NaNs in other places"
            a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{what}: bits differ"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def special_values(n, g, scale=1.0):
    x = torch.randn(n, generator=g) * scale * 10 ** torch.empty(n).uniform_(-4, 1, generator=g)
    if n >= 16:
        x[[1, 5, 9]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x[12] = 3e38
    return x


# ------------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", [64, 256, 1024, 4096, 1, 100, 5000, 16384])
def test_quantize_and_dequantize(sim, dtype, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    # partial blocks; one block or many, one CTA or many (a CTA covers 256 threads' worth of elements or one
    # large block, so the sizes scale with the blocksize to stay within a few dozen CTAs)
    for n in (1, 257, 6 * min(blocksize, 4096) + 7):
        x = special_values(n, g).to(dtype)
        code = Q.create_dynamic_map(signed=n % 2 == 1)
        (cpu, _), (cuda, _) = both(sim, "quantize_blockwise", x, code, blocksize)
        assert_same(cpu, cuda, f"quantize n={n}")
        for out in FLOATS:
            (cpu_y, _), (cuda_y, _) = both(sim, "dequantize_blockwise", cpu[0], cpu[1], code, blocksize, out)
            assert_same(cpu_y, cuda_y, f"dequantize n={n} {out}")


def test_quantize_subnormal_and_huge_blocks(sim):
    x = torch.cat([torch.full((256,), 1e-39) * torch.linspace(-1, 1, 256), torch.linspace(-3e38, 3e38, 256)])
    (cpu, _), (cuda, _) = both(sim, "quantize_blockwise", x, Q.create_dynamic_map(True), 256)
    assert_same(cpu, cuda)


# ------------------------------------------------------------------------------------------------- optimizers
SHAPES = [(4097,), (64, 100), (300,), (5000,), (1,)]  # several tensors, partial last blocks, several CTAs


def optimizer_inputs(dtype, eight_bit, two_state, moments1, g, non_negative=False):
    """Parameters, gradients (NaN, Inf, huge) and states of the SHAPES; `non_negative` first states (RMSprop's and
    Adagrad's accumulators: codes of the signed map's upper half, or absolute values)."""
    params = [(torch.randn(s, generator=g) * 0.1).to(dtype) for s in SHAPES]
    grads = []
    for p in params:
        grad = special_values(p.numel(), g, 0.1).reshape(p.shape)
        if p.numel() > 30:
            grad.view(-1)[20] = 2e19  # a square that overflows float32
        grads.append(grad.to(dtype))
    state1, state2, absmax1, absmax2 = [], [], [], []
    for p in params:
        n, blocks = p.numel(), (p.numel() + 255) // 256
        if eight_bit:
            state1.append(
                torch.randint(
                    127 if non_negative else 0,
                    256,
                    ((moments1, n) if moments1 > 1 else (n,)),
                    dtype=torch.uint8,
                    generator=g,
                )
            )
            absmax1.append(torch.rand((moments1, blocks) if moments1 > 1 else (blocks,), generator=g))
            if two_state:
                state2.append(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g))
                absmax2.append(torch.rand(blocks, generator=g))
        else:
            first = torch.randn((moments1, n) if moments1 > 1 else (n,), generator=g) * 0.01
            state1.append(first.abs() if non_negative else first)
            if two_state:
                state2.append(torch.rand(n, generator=g) * 1e-4)
    return params, grads, state1, state2, absmax1, absmax2


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("eight_bit", [True, False])
@pytest.mark.parametrize("optimizer", ["adam", "ademamix"])
@pytest.mark.parametrize("options", ["plain", "stochastic", "robust", "lamb"])
def test_two_state_step(sim, dtype, eight_bit, optimizer, options):
    if options == "lamb" and optimizer == "ademamix":
        pytest.skip("the trust ratio is LAMB's (adam)")
    g = torch.Generator().manual_seed(3)
    moments1 = 2 if optimizer == "ademamix" else 1
    params, grads, s1, s2, a1, a2 = optimizer_inputs(dtype, eight_bit, True, moments1, g)
    steps = torch.tensor([1, 7, 2, 30, 5])
    seed = 12345 if options == "stochastic" else -1
    scalars = (
        1e-3,
        0.9,
        0.999,
        0.9999 if optimizer == "ademamix" else 0.0,
        5.0 if optimizer == "ademamix" else 0.0,
        1e-8,
        0.01,
        1.0,
        seed,
    )
    norms, max_unorm = None, 0.0
    if options == "lamb":
        norm_args = (
            "adam",
            params,
            grads,
            s1,
            s2,
            a1,
            a2,
            Q.create_dynamic_map(True) if eight_bit else None,
            Q.create_dynamic_map(False) if eight_bit else None,
            steps,
            0.9,
            0.999,
            1e-8,
            0.01,
            1.0,
        )
        (cpu_norms, _), (cuda_norms, _) = both(sim, "update_norms", *norm_args)
        assert_same(cpu_norms, cuda_norms, "update_norms")
        norms, max_unorm = cpu_norms, 1.0
    extra = (norms, max_unorm, None, options == "robust")
    if eight_bit:
        args = (
            (optimizer, params, grads, s1, s2, a1, a2, Q.create_dynamic_map(True), Q.create_dynamic_map(False), steps)
            + scalars
            + extra
        )
        name = "two_state8bit_step_"
    else:
        args = (optimizer, params, grads, s1, s2, steps) + scalars + extra
        name = "two_state32bit_step_"
    (_, cpu_args), (_, cuda_args) = both(sim, name, *args)
    for index in (1, 3, 4, 5, 6) if eight_bit else (1, 3, 4):  # params, states, absmax: everything written
        assert_same(cpu_args[index], cuda_args[index], f"{name} argument {index}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("eight_bit", [True, False])
@pytest.mark.parametrize("optimizer", ["momentum", "rmsprop", "adagrad", "lion", "muon"])
@pytest.mark.parametrize("options", ["plain", "stochastic", "robust", "lars"])
def test_one_state_step(sim, dtype, eight_bit, optimizer, options):
    if options == "lars" and optimizer != "momentum":
        pytest.skip("the trust ratio is LARS's (momentum)")
    g = torch.Generator().manual_seed(4)
    params, grads, s1, _, a1, _ = optimizer_inputs(
        dtype, eight_bit, False, 1, g, non_negative=optimizer in ("rmsprop", "adagrad")
    )
    steps = torch.tensor([1, 7, 2, 30, 5])
    betas = {"momentum": (0.9, 0.0), "rmsprop": (0.99, 0.0), "adagrad": (0.0, 0.0), "lion": (0.9, 0.99)}.get(
        optimizer,
        (0.95, 0.95),  # muon: Nesterov
    )
    scalars = (1e-3,) + betas + (1e-8, 0.01, 1.0, 777 if options == "stochastic" else -1)
    norms, max_unorm = None, 0.0
    if options == "lars":
        q1 = Q.create_dynamic_map(True) if eight_bit else None
        norm_args = ("momentum", params, grads, s1, s1, a1, a1, q1, None, steps, betas[0], betas[1], 1e-8, 0.01, 1.0)
        (cpu_norms, _), (cuda_norms, _) = both(sim, "update_norms", *norm_args)
        assert_same(cpu_norms, cuda_norms, "update_norms")
        norms, max_unorm = cpu_norms, 0.02
    extra = (norms, max_unorm, None, options == "robust")
    if eight_bit:
        args = (optimizer, params, grads, s1, a1, Q.create_dynamic_map(True), steps) + scalars + extra
        name, written = "one_state8bit_step_", (1, 3, 4)
    else:
        args = (optimizer, params, grads, s1, steps) + scalars + extra
        name, written = "one_state32bit_step_", (1, 3)
    (_, cpu_args), (_, cuda_args) = both(sim, name, *args)
    for index in written:
        assert_same(cpu_args[index], cuda_args[index], f"{name} argument {index}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("options", ["plain", "stochastic"])
def test_two_state4bit_step(sim, dtype, options):
    """Adam with 4-bit states: packed codes (odd sizes end in half a byte), two 128-element blocks per warp (a
    partial second one), several parameters at different steps in one launch."""
    from kestrel.optim.adam4bit import QMAP4_SIGNED, QMAP4_UNSIGNED

    g = torch.Generator().manual_seed(5)
    params, grads, _, _, _, _ = optimizer_inputs(dtype, False, True, 1, g)
    state1, state2, absmax1, absmax2 = [], [], [], []
    for p in params:
        n = p.numel()
        for codes, absmax in ((state1, absmax1), (state2, absmax2)):
            codes.append(torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g))
            absmax.append(torch.rand((n + 127) // 128, generator=g))
    steps = torch.tensor([1, 7, 2, 30, 5])
    scalars = (1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0, 777 if options == "stochastic" else -1)
    args = ("adam", params, grads, state1, state2, absmax1, absmax2, QMAP4_SIGNED, QMAP4_UNSIGNED, steps) + scalars
    (_, cpu_args), (_, cuda_args) = both(sim, "two_state4bit_step_", *args)
    for index in (1, 3, 4, 5, 6):
        assert_same(cpu_args[index], cuda_args[index], f"two_state4bit_step_ argument {index}")
    assert any(p.numel() % 2 for p in params) and any(p.numel() % 256 > 128 for p in params)


def test_an_empty_step_launches_nothing(sim):
    empty = torch.zeros(0)
    (_, cpu_args), (_, cuda_args) = both(
        sim,
        "two_state32bit_step_",
        "adam",
        [empty],
        [empty.clone()],
        [empty.clone()],
        [empty.clone()],
        torch.tensor([1]),
        1e-3,
        0.9,
        0.999,
        0.0,
        0.0,
        1e-8,
        0.0,
        1.0,
    )
    assert_same(cpu_args[1], cuda_args[1])


# ------------------------------------------------------------------------------------------------- verification
def random_trees(B, T, g):
    parents = torch.full((B, T), -2, dtype=torch.long)
    for b in range(B):
        used = int(torch.randint(1, T + 1, (1,), generator=g))
        parents[b, 0] = -1
        for i in range(1, used):
            parents[b, i] = int(torch.randint(0, i, (1,), generator=g))
    return build_tree(parents)


@pytest.mark.parametrize("B,T,V", [(1, 1, 5), (3, 9, 40), (130, 16, 12), (2, 64, 3000)])
def test_tree_verification(sim, B, T, V):
    """Greedy (one thread per row: 130 rows are two CTAs) and sampling (a CTA of 256 threads per row, each owning a
    vocabulary segment: V 3000 gives multi-token segments, V 12 empty ones), with deterministic and sampled drafts."""
    g = torch.Generator().manual_seed(B * T)
    tree = random_trees(B, T, g)
    candidates = torch.randint(0, V, (B, T), generator=g)
    target = torch.randint(0, V, (B, T), generator=g)
    (cpu, _), (cuda, _) = both(
        sim, "verify_tree_greedy", candidates, target, tree.first_child, tree.next_sibling, tree.max_depth
    )
    assert_same(cpu, cuda, "greedy")
    if B > 3:
        return  # the sampling kernel runs a CTA of 256 threads per row: a few rows suffice
    probs = torch.rand(B, T, V, generator=g) ** 8
    probs[:, :, : V // 3] = 0.0
    drafts = torch.softmax(torch.randn(B, T, V, generator=g), -1)
    for draft in (None, drafts):
        args = (
            candidates,
            probs,
            tree.first_child,
            tree.next_sibling,
            torch.rand(B, T, generator=g),
            torch.rand(B, generator=g),
            draft,
            tree.max_depth,
        )
        (cpu, _), (cuda, _) = both(sim, "verify_tree_sample", *args)
        assert_same(cpu, cuda, f"sample draft={draft is not None}")


def test_tree_verification_with_a_residual_without_mass(sim):
    """All-zero and NaN rows: the walk's argmax fallback (a serial scan per thread on the GPU)."""
    g = torch.Generator().manual_seed(9)
    tree = random_trees(2, 5, g)
    probs = torch.zeros(2, 5, 20)
    probs[1] = float("nan")
    candidates = torch.randint(0, 20, (2, 5), generator=g)
    args = (
        candidates,
        probs,
        tree.first_child,
        tree.next_sibling,
        torch.rand(2, 5, generator=g),
        torch.rand(2, generator=g),
        None,
        tree.max_depth,
    )
    (cpu, _), (cuda, _) = both(sim, "verify_tree_sample", *args)
    assert_same(cpu, cuda)


# ------------------------------------------------------------------------------------------------- compaction
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8, torch.float64])
@pytest.mark.parametrize("layers", [0, 3])
def test_compaction(sim, dtype, layers):
    """Every element size; (B, H, L, D) and (NL, B, H, L, D); a strided K cache and a V of another head dim."""
    g = torch.Generator().manual_seed(layers)
    B, H, L = 3, 2, 24
    lead = (layers,) if layers else ()
    k = torch.randn(lead + (B, L, H, 8), generator=g).to(dtype).transpose(-3, -2)  # strided: (.., B, H, L, D)
    v = torch.randn(lead + (B, H, L, 5), generator=g).to(dtype)
    lens = torch.tensor([0, 5, 11], dtype=torch.int32)
    accept_index = torch.tensor([[0, 2, 3, -1], [0, 1, -1, -1], [0, 4, 7, 9]], dtype=torch.int32)
    (_, cpu_args), (_, cuda_args) = both(sim, "compact_kv_cache", k, v, lens, accept_index)
    for index in (0, 1, 2):
        assert_same(cpu_args[index], cuda_args[index], f"compact argument {index}")


def test_compaction_leaves_an_invalid_row_untouched_on_cuda(sim):
    """The CPU raises for an invalid row; the CUDA kernels (no host sync to report) leave that row and its length
    as they were, and compact the valid rows."""
    k, v = torch.randn(2, 1, 8, 4), torch.randn(2, 1, 8, 4)
    lens = torch.tensor([2, 7], dtype=torch.int32)
    accept_index = torch.tensor([[0, 1, 3], [0, 2, -1]], dtype=torch.int32)  # row 1: 7 + 2 is past the cache
    before_k = k.clone()
    sim.compact_kv_cache(k, v, lens, accept_index)
    assert lens.tolist() == [5, 7]
    assert torch.equal(k[1], before_k[1]) and torch.equal(k[0, :, 4], before_k[0, :, 5])
