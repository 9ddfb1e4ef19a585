"""Tree attention: every node's output equals ordinary causal attention (float64) over the prefix and its root-to-node
path; random trees across the 32-bit word boundaries, batches with different prefix lengths (0 included), GQA,
D 64/128, the CPU path and the Triton kernel (interpreted in CI, split-K and single-pass), garbage past the tree and
in unused nodes' slots, the model's per-layer cache views, the op's checks, opcheck and torch.compile; the kernel's
sm_90 build keeps its tiles in registers."""

import math

import pytest
import torch
from helpers import gpu_available

from kestrel.ops import tree_attention
from kestrel.ops.tree_attention import tree_attention_cpu
from kestrel.reference.tree import ancestor_bits, ancestor_lists
from kestrel.reference.tree_attention import tree_attention as reference

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def random_parents(B, T, generator, unused=()):
    """(B, T) parents of random trees in topological order; row b pads its last unused[b] nodes with -2."""
    parents = torch.full((B, T), -2, dtype=torch.int32)
    for b in range(B):
        used = T - (unused[b] if b < len(unused) else 0)
        parents[b, 0] = -1
        for i in range(1, used):
            parents[b, i] = int(torch.randint(0, i, (1,), generator=generator))
    return parents


def make_inputs(B, Hq, Hkv, T, D, lens, l_max, dtype=torch.float32, seed=0, unused=(), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    parents = random_parents(B, T, g, unused)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, l_max, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, l_max, D, generator=g).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    bits = ancestor_bits(parents)
    return [t.to(device) for t in (q, k, v, lens, bits)] + [parents]


def causal_attention(queries, keys, values, scale):
    """Ordinary causal attention, float64, in decode form: the Lq query rows are the last Lq positions of the Lk
    keys, row r sees keys [0, Lk - Lq + r]. (H, Lq, D), (H, Lk, D) -> (H, Lq, D)."""
    Lq, Lk = queries.shape[1], keys.shape[1]
    visible = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    scores = (queries @ keys.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def path_attention(q, k, v, lens, parents, scale=None):
    """The defining property (docs/tree_verification.md), float64: tree node i of sequence b is a row of ordinary causal
    attention over the sequence "prefix, then the root-to-leaf path through i" (queries: the path's nodes); unused nodes
    see the prefix only (zeros when it is empty)."""
    q, k, v = q.cpu().double(), k.cpu().double(), v.cpu().double()
    B, Hq, T, D = q.shape
    scale = scale or 1 / math.sqrt(D)
    group = Hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        length = int(lens[b])
        paths = ancestor_lists(parents[b].tolist())
        inner = {j for path in paths if path for j in path[:-1]}
        for i, path in enumerate(paths):
            if path is None:  # an unused node: attention over the prefix alone
                if length:
                    out[b, :, i] = causal_attention(q[b][:, i : i + 1], k[b][:, :length], v[b][:, :length], scale)[:, 0]
            elif i not in inner:  # a leaf: its path gives every node on it
                slots = list(range(length)) + [length + j for j in path]
                out[b][:, path] = causal_attention(q[b][:, path], k[b][:, slots], v[b][:, slots], scale)
    return out


def tolerance(dtype):
    return dict(atol=2e-5, rtol=1e-4) if dtype in (torch.float32, torch.float64) else dict(atol=4e-3, rtol=4e-3)


TREE_SIZES = [1, 7, 8, 9, 63, 64, 65]  # around the 32-bit word boundaries


@pytest.mark.parametrize("T", TREE_SIZES)
@pytest.mark.parametrize("D", [64, 128])
def test_cpu_path_equals_causal_attention_over_each_path(T, D):
    lens = [37, 0, 5]
    q, k, v, lens_t, bits, parents = make_inputs(3, 4, 2, T, D, lens, 40 + T, seed=T + D, unused=(0, 0, min(2, T - 1)))
    out = tree_attention(q, k, v, lens_t, bits)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), path_attention(q, k, v, lens_t, parents), **tolerance(q.dtype))


def test_reference_equals_the_path_formulation():
    """The explicit-mask reference (the kernels' oracle below) against the per-path causal attention."""
    q, k, v, lens, bits, parents = make_inputs(2, 6, 3, 40, 64, [11, 0], 60, seed=3, unused=(0, 5))
    torch.testing.assert_close(reference(q, k, v, lens, bits), path_attention(q, k, v, lens, parents))


def test_unused_nodes_see_the_prefix_and_zeros_without_one():
    q, k, v, lens, bits, parents = make_inputs(2, 2, 1, 6, 64, [9, 0], 20, seed=4, unused=(2, 2))
    out = tree_attention(q, k, v, lens, bits)
    prefix_only = (
        torch.softmax(q[0, :, 4:].double() @ k[0, :, :9].double().transpose(-1, -2) / 8.0, dim=-1)
        @ v[0, :, :9].double()
    )
    torch.testing.assert_close(out[0, :, 4:].double(), prefix_only, **tolerance(torch.float32))
    assert torch.equal(out[1, :, 4:], torch.zeros_like(out[1, :, 4:]))
    assert bool(out[1, :, :4].abs().sum() > 0)


def test_cpu_chunks_and_float64():
    q, k, v, lens, bits, parents = make_inputs(3, 4, 1, 9, 64, [100, 3, 64], 120, seed=5)
    expected = reference(q, k, v, lens, bits, 0.3)
    for chunk in (7, 64, 1000):
        torch.testing.assert_close(
            tree_attention_cpu(q, k, v, lens, bits, 0.3, chunk=chunk).double(), expected, **tolerance(torch.float32)
        )
    out64 = tree_attention(q.double(), k.double(), v.double(), lens, bits, softmax_scale=0.3)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision_within_twice_pytorchs_error(dtype):
    """fp16/bf16 on the CPU path: error against float64 at most twice that of rounding the float64 result."""
    q, k, v, lens, bits, parents = make_inputs(2, 4, 2, 17, 64, [30, 12], 50, dtype=dtype, seed=6)
    expected = reference(q, k, v, lens, bits)
    ours = (tree_attention(q, k, v, lens, bits).double() - expected).abs().max()
    rounding = (expected.to(dtype).double() - expected).abs().max()
    assert ours <= 2 * rounding + 1e-6, (ours, rounding)


def with_garbage(k, v, lens, parents):
    """Copies of the caches with NaN in every slot no row may read: past len+T and at unused nodes."""
    k, v = k.clone(), v.clone()
    T = parents.shape[1]
    for b in range(k.shape[0]):
        length = int(lens[b])
        bad = list(range(length + T, k.shape[2])) + [length + j for j in range(T) if int(parents[b, j]) == -2]
        k[b, :, bad] = float("nan")
        v[b, :, bad] = float("nan")
    return k, v


def test_cpu_path_never_reads_unattended_slots():
    q, k, v, lens, bits, parents = make_inputs(3, 2, 2, 10, 64, [20, 0, 31], 45, seed=7, unused=(3, 0, 9))
    dirty_k, dirty_v = with_garbage(k, v, lens, parents)
    out = tree_attention(q, dirty_k, dirty_v, lens, bits)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), reference(q, k, v, lens, bits), **tolerance(torch.float32))


def test_per_layer_cache_views_and_strided_queries():
    """The model's call pattern: k_cache[l] of a (NL, B, Hkv, Lmax, D) tensor, q a transpose of (B, T, Hq, D)."""
    g = torch.Generator().manual_seed(8)
    NL, B, Hq, Hkv, T, D, l_max = 3, 2, 4, 2, 5, 64, 32
    k_all, v_all = torch.randn(NL, B, Hkv, l_max, D, generator=g), torch.randn(NL, B, Hkv, l_max, D, generator=g)
    q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    parents = random_parents(B, T, g)
    bits, lens = ancestor_bits(parents), torch.tensor([12, 27], dtype=torch.int32)
    for layer in range(NL):
        out = tree_attention(q, k_all[layer], v_all[layer], lens, bits)
        torch.testing.assert_close(
            out.double(), path_attention(q, k_all[layer], v_all[layer], lens, parents), **tolerance(torch.float32)
        )
    # int64 lengths are taken too
    torch.testing.assert_close(
        tree_attention(q, k_all[0], v_all[0], lens.long(), bits), tree_attention(q, k_all[0], v_all[0], lens, bits)
    )


# --------------------------------------------------------------------------------------------- the Triton kernel
def kernel_device():
    return "cuda" if gpu_available() else "cpu"


# every tree size in fp32 and fp16, alternately split-K and single-pass; the other half of the product is slow
TRITON_CASES = [
    pytest.param(
        T,
        dtype,
        splits,
        marks=[pytest.mark.slow] if (n + (dtype == torch.float16)) % 2 == (splits == 3) else [],
        id=f"T{T}-{str(dtype)[6:]}-splits{splits}",
    )
    for n, T in enumerate(TREE_SIZES)
    for dtype in (torch.float32, torch.float16)
    for splits in (1, 3)
]


@pytest.mark.triton
@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("T, dtype, num_splits", TRITON_CASES)
def test_triton_kernel_matches_float64(T, dtype, num_splits):
    """Random trees, three sequences (prefixes 0, short, long; padded nodes in the first two: zeros and prefix-only
    rows), GQA 2; num_splits 3 with short slices exercises split-K and the combine (empty slices included)."""
    from kestrel.kernels.tree_attention import tree_attention_forward

    device = kernel_device()
    D = 64 if T % 2 else 128
    q, k, v, lens, bits, parents = make_inputs(
        3, 4, 2, T, D, [0, 21, 70], 72 + T, dtype=dtype, seed=T, unused=(min(2, T - 1), min(3, T - 1), 0), device=device
    )
    out = tree_attention_forward(q, k, v, lens, bits, 1 / math.sqrt(D), num_splits=num_splits, min_split=16)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), path_attention(q, k, v, lens.cpu(), parents), **tolerance(dtype))


@pytest.mark.triton
@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_triton_kernel_groups_garbage_and_views():
    """GQA 4 with 2 row blocks per kv-head, odd head dim (80: masked to 128), NaN in every unattended slot,
    per-layer cache views and strided queries, a custom scale; split and single-pass agree."""
    from kestrel.kernels.tree_attention import tree_attention_forward

    device = kernel_device()
    g = torch.Generator().manual_seed(9)
    NL, B, Hq, Hkv, T, D, l_max = 2, 2, 8, 2, 20, 80, 90
    k_all, v_all = torch.randn(NL, B, Hkv, l_max, D, generator=g), torch.randn(NL, B, Hkv, l_max, D, generator=g)
    q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    parents = random_parents(B, T, g, unused=(6, 0))
    bits, lens = ancestor_bits(parents), torch.tensor([44, 9], dtype=torch.int32)
    expected = reference(q, k_all[1], v_all[1], lens, bits, 0.2)
    k_dirty, v_dirty = with_garbage(k_all[1], v_all[1], lens, parents)
    k_all[1], v_all[1] = k_dirty, v_dirty
    k_all, v_all, q_dev = k_all.to(device), v_all.to(device), q.to(device)
    outs = [
        tree_attention_forward(
            q_dev, k_all[1], v_all[1], lens.to(device), bits.to(device), 0.2, num_splits=s, min_split=16, block_m=32
        )
        for s in (1, 4)
    ]
    for out in outs:
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out.cpu().double(), expected, **tolerance(torch.float32))


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_triton_kernel_longer_prefix():
    from kestrel.kernels.tree_attention import tree_attention_forward

    device = kernel_device()
    q, k, v, lens, bits, parents = make_inputs(
        2, 8, 2, 33, 128, [700, 260], 800, dtype=torch.float16, seed=10, unused=(0, 4), device=device
    )
    expected = reference(q, k, v, lens.cpu(), bits.cpu())
    # the interpreter's small tiles, then the GPU's (BLOCK_M 128 over 132 rows, BLOCK_N 64)
    for splits, blocks in ((1, {}), (3, {}), (3, dict(block_m=128, block_n=64)), (1, dict(block_m=128, block_n=32))):
        out = tree_attention_forward(q, k, v, lens, bits, 1 / math.sqrt(128), num_splits=splits, min_split=64, **blocks)
        torch.testing.assert_close(out.cpu().double(), expected, **tolerance(torch.float16))


# ------------------------------------------------------------------------------------------------------ the op
def test_argument_checks():
    q, k, v, lens, bits, _ = make_inputs(2, 4, 2, 5, 64, [3, 4], 16)
    cases = [
        (ValueError, r"q must be \(B, Hq, T, D\), got \(4, 5, 64\)", (q[0], k, v, lens, bits)),
        (
            ValueError,
            r"query heads \(4\) must be a multiple of the key/value heads \(3\)",
            (q, torch.randn(2, 3, 16, 64), torch.randn(2, 3, 16, 64), lens, bits),
        ),
        (
            ValueError,
            r"k_cache must be \(B=2, Hkv, Lmax, D=64\), got \(2, 2, 16, 32\)",
            (q, k[..., :32], v[..., :32], lens, bits),
        ),
        (ValueError, "k_cache and v_cache must have one shape", (q, k, v[:, :, :8], lens, bits)),
        (TypeError, "q, k_cache and v_cache must share one dtype", (q, k.half(), v, lens, bits)),
        (TypeError, "q must be float16, bfloat16 or float32", (q.int(), k, v, lens, bits)),
        (
            ValueError,
            r"cache_seqlens must be an int32 \(or int64\) tensor of shape \(2,\), got torch.float32",
            (q, k, v, lens.float(), bits),
        ),
        (
            ValueError,
            r"cache_seqlens must be .* of shape \(2,\), got torch.int32 of shape \(3,\)",
            (q, k, v, torch.tensor([1, 2, 3], dtype=torch.int32), bits),
        ),
        (
            ValueError,
            r"tree_mask_bits must be an int32 tensor of shape \(B=2, T=5, ceil\(T/32\)=1\), got "
            r"torch.int64 of shape \(2, 5, 1\)",
            (q, k, v, lens, bits.long()),
        ),
        (
            ValueError,
            r"tree_mask_bits must be .* got torch.int32 of shape \(2, 5, 2\)",
            (q, k, v, lens, torch.zeros(2, 5, 2, dtype=torch.int32)),
        ),
        (
            ValueError,
            r"cache_seqlens must lie in \[0, Lmax - T = 11\] .* got values in \[3, 12\]",
            (q, k, v, torch.tensor([3, 12], dtype=torch.int32), bits),
        ),
        (ValueError, r"got values in \[-1, 4\]", (q, k, v, torch.tensor([-1, 4], dtype=torch.int32), bits)),
        (
            ValueError,
            r"the cache holds Lmax=4 positions, fewer than the T=5 tree nodes",
            (q, k[:, :, :4], v[:, :, :4], lens, bits),
        ),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            tree_attention(*args)
    with pytest.raises(ValueError, match="softmax_scale must be None or a finite positive number, got -1.0"):
        tree_attention(q, k, v, lens, bits, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="cache_seqlens is on meta but q on cpu"):
        tree_attention(q, k, v, lens.to("meta"), bits)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_empty_batch_gives_an_empty_result(device):
    """B = 0 is legal: an empty (0, Hq, T, D) result (the CPU path used to read the lengths' min of an empty
    tensor; no kernel grid of size 0 is launched on a GPU)."""
    q, k, v = torch.randn(0, 4, 3, 64), torch.randn(0, 2, 8, 64), torch.randn(0, 2, 8, 64)
    lens, bits = torch.zeros(0, dtype=torch.int32), torch.zeros(0, 3, 1, dtype=torch.int32)
    out = tree_attention(*(t.to(device) for t in (q, k, v, lens, bits)))
    assert out.shape == (0, 4, 3, 64) and out.dtype == q.dtype and out.device.type == device


def test_softmax_scale_must_be_a_number():
    q, k, v, lens, bits, _ = make_inputs(1, 2, 1, 3, 64, [4], 10, seed=13)
    for scale in (True, "0.1", torch.tensor(0.1)):
        with pytest.raises(TypeError, match="tree_attention: softmax_scale must be None or a number, got"):
            tree_attention(q, k, v, lens, bits, softmax_scale=scale)
    for scale in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softmax_scale must be None or a finite positive number"):
            tree_attention(q, k, v, lens, bits, softmax_scale=scale)


def test_forward_only():
    q, k, v, lens, bits, _ = make_inputs(1, 2, 1, 3, 64, [5], 10, seed=12)
    out = tree_attention(q.requires_grad_(True), k, v, lens, bits)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_opcheck_and_compile():
    q, k, v, lens, bits, _ = make_inputs(2, 4, 2, 9, 64, [5, 0], 24, seed=11, unused=(0, 2))
    torch.library.opcheck(torch.ops.kestrel.tree_attention.default, (q, k, v, lens, bits, 0.125))
    compiled = torch.compile(lambda *args: tree_attention(*args), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lens, bits), tree_attention(q, k, v, lens, bits))


SM90_BUILD_CHECK = r"""
import sys
from sm90_build import SHARED_MEMORY_LIMIT, build
from kestrel.kernels.tree_attention import cuda_blocks, tree_attention_fwd_kernel

cases = [(dt, rows, D, split) for dt in ("fp16", "bf16", "fp32") for rows in (1, 64, 256) for D in (64, 128)
         for split in (True, False) if dt == "fp16" or (rows == 64 and split)]
failures = []
for dt, rows, D, split in cases:
    block_m, block_n, block_d, num_warps = cuda_blocks(rows, D, dt == "fp32")
    constexprs = {"SPLIT": split, "FP32_DOT": dt == "fp32", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d}
    pointers = {"Q": dt, "K": dt, "V": dt, "O": dt, "LENS": "i32", "BITS": "i32", "PART_O": "fp32", "PART_LSE": "fp32"}
    shared, stack = build(tree_attention_fwd_kernel, lambda n: "*" + pointers[n] if n in pointers else
                          "fp32" if n == "qk_scale" else "i32", constexprs, num_warps, 2)
    print(dt, rows, D, "split" if split else "single", (block_m, block_n, block_d, num_warps), "shared", shared,
          "stack", stack)
    if stack or shared > SHARED_MEMORY_LIMIT:
        failures.append((dt, rows, D, split, shared, stack))
sys.exit(f"spills or over budget: {failures}" if failures else 0)
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_sm90_build_keeps_tiles_in_registers():
    """The kernel with the launcher's tile sizes, built for sm_90 with a launch's specialisation, keeps everything
    in registers (tests/sm90_build.py)."""
    from sm90_build import run_check

    run_check(SM90_BUILD_CHECK)


# ------------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_op_matches_float64(dtype, D):
    """The op's own split choice on a real GPU: bs 2 with 2 kv heads splits the prefix; T 64 and T 65."""
    for T in (64, 65):
        q, k, v, lens, bits, parents = make_inputs(
            2, 8, 2, T, D, [3000, 17], 3100, dtype=dtype, seed=12 + T, unused=(0, 5), device="cuda"
        )
        out = tree_attention(q, k, v, lens, bits)
        tol = tolerance(dtype) if dtype != torch.bfloat16 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out.cpu().double(), reference(q, k, v, lens, bits), **tol)


@pytest.mark.gpu
def test_cuda_opcheck_compile_and_cuda_graph():
    q, k, v, lens, bits, _ = make_inputs(1, 32, 8, 64, 128, [2048], 2200, dtype=torch.float16, seed=13, device="cuda")
    torch.library.opcheck(torch.ops.kestrel.tree_attention.default, (q, k, v, lens, bits, 0.1))
    eager = tree_attention(q, k, v, lens, bits)
    compiled = torch.compile(lambda *args: tree_attention(*args), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lens, bits), eager)
    graph = torch.cuda.CUDAGraph()  # no host sync inside: it captures
    with torch.cuda.graph(graph):
        captured = tree_attention(q, k, v, lens, bits)
    lens.fill_(1000)
    graph.replay()
    torch.testing.assert_close(captured, tree_attention(q, k, v, lens, bits))


def test_benchmark_runs_quick_on_cpu():
    from kestrel.benchmarks import bench_tree_attention

    rows = bench_tree_attention.run("cpu", quick=True)
    assert [r.baseline for r in rows] == ["SDPA one-token decode", "SDPA dense tree mask"]
    assert all(r.op == "tree_attention T16" and r.ours_ms > 0 and r.baseline_ms > 0 for r in rows)
