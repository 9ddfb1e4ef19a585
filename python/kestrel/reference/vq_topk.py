"""Plain-PyTorch reference of vq_topk (docs/codebook.md): the dense float64 score matrix, written from the
formulas. A test oracle only: it builds the N×C matrix the kernels avoid."""

import torch


def vq_scores(x, codebook, metric):
    """(H, N, C) float64 scores: l2 −‖x−c‖², ip x·c, cosine x·c/(‖x‖‖c‖)."""
    x, cb = x.double(), codebook.double()
    if metric == "l2":
        return -((x[:, :, None, :] - cb[:, None, :, :]) ** 2).sum(-1)
    if metric == "ip":
        return x @ cb.transpose(1, 2)
    return (x / x.norm(dim=-1, keepdim=True)) @ (cb / cb.norm(dim=-1, keepdim=True)).transpose(1, 2)


def vq_topk(x, codebook, k, metric, banned=None):
    """(scores, ids) (H, N, k) in float64: a stable sort of the dense scores (ties to the lower index)."""
    scores = vq_scores(x, codebook, metric)
    if banned is not None:
        scores = scores.masked_fill(banned[:, None, :], float("-inf"))
    ids = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(scores, -1, ids), ids


__all__ = ["vq_scores", "vq_topk"]
