"""vq_topk: exact selection against float64 (near ties compared as sets), every metric, k up to 64, C not a
multiple of the tile, banned codes, duplicated codes (ties to the lower index), per-head codebooks equal the
per-head loop, the chunked CPU path, and the Triton kernel (interpreted in CI)."""

import pytest
import torch

from helpers import gpu_available
from kestrel.ops import vq_topk
from kestrel.ops.vq_topk import _code_terms

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def float64_scores(x, cb, metric):
    x, cb = x.double(), cb.double()
    if metric == "l2":
        return -((x[:, :, None, :] - cb[:, None, :, :]) ** 2).sum(-1)
    if metric == "ip":
        return x @ cb.transpose(1, 2)
    return (x / x.norm(dim=-1, keepdim=True)) @ (cb / cb.norm(dim=-1, keepdim=True)).transpose(1, 2)


def assert_selection(scores, ids, x, cb, k, metric, banned=None, tol=1e-5):
    """ids are a correct top-k: their float64 scores are the k best (within tol of ties), sorted, distinct, allowed;
    the returned scores match float64."""
    ref = float64_scores(x, cb, metric)
    if banned is not None:
        ref = ref.masked_fill(banned[:, None, :], float("-inf"))
    best = ref.topk(k, dim=-1).values
    picked = torch.gather(ref, -1, ids)
    scale = ref.masked_fill(torch.isinf(ref), 0).abs().amax(-1, keepdim=True).clamp_min(1.0)
    assert bool(((picked - best).abs() <= tol * scale).all()), "a selected code is not among the k best"
    torch.testing.assert_close(scores.double(), picked, atol=tol * float(scale.max()), rtol=tol)
    assert bool((scores[..., :-1] >= scores[..., 1:] - tol * scale).all()), "rows are not sorted best first"
    assert all(len(set(row.tolist())) == k for row in ids.reshape(-1, k)), "duplicated ids"


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_cpu_path_selects_the_float64_top_k(metric, k):
    g = torch.Generator().manual_seed(k)
    x, cb = torch.randn(3, 40, 16, generator=g), torch.randn(3, 150, 16, generator=g)
    banned = torch.rand(3, 150, generator=g) < 0.1
    scores, ids = vq_topk(x, cb, k, metric=metric, banned=banned, chunk=48)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (3, 40, k)
    assert not bool(banned.gather(-1, ids.reshape(3, -1)).any())
    assert_selection(scores, ids, x, cb, k, metric, banned)
    # per-head codebooks in one call equal the per-head loop; chunking does not change the answer
    for h in range(3):
        s_h, i_h = vq_topk(x[h], cb[h], k, metric=metric, banned=banned[h])
        assert torch.equal(i_h, ids[h])
        torch.testing.assert_close(s_h, scores[h])


def test_ties_go_to_the_lower_index():
    cb = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    cb[30] = cb[7]  # a duplicated code
    cb[45] = cb[7]
    x = cb[7:8].clone()
    for metric in ("l2", "ip", "cosine"):
        _, ids = vq_topk(x, cb, 3, metric=metric, chunk=16)
        assert ids[0].tolist() == [7, 30, 45], metric


@pytest.mark.triton
@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_triton_kernel_equals_the_cpu_path(metric, k):
    from kestrel.kernels.vq_topk import vq_topk_triton

    device = "cuda" if gpu_available() else "cpu"
    g = torch.Generator().manual_seed(10 + k)
    x, cb = torch.randn(2, 37, 16, generator=g), torch.randn(2, 150, 16, generator=g)
    cb[1, 90] = cb[1, 20]  # a tie across tiles
    banned = torch.zeros(2, 150, dtype=torch.bool)
    banned[0, :5] = True
    scale, bias = _code_terms(cb, metric, banned)
    ranked, ids = vq_topk_triton(x.to(device), cb.to(device), bias.to(device), scale.to(device), k)
    _, ref_ids = vq_topk(x, cb, k, metric=metric, banned=banned)
    assert torch.equal(ids[..., :k].long().cpu(), ref_ids)


def test_argument_checks():
    x, cb = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="metric must be one of"):
        vq_topk(x, cb, 2, metric="dot")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, C=10\], got 11"):
        vq_topk(x, cb, 11)
    with pytest.raises(ValueError, match="banned leaves 1 codes, fewer than k=2"):
        vq_topk(x, cb, 2, banned=torch.arange(10) > 0)
    with pytest.raises(ValueError, match="must share d"):
        vq_topk(x, torch.randn(10, 9), 2)
