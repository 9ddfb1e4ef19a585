"""Plain-PyTorch reference of the discrete key-value bottleneck lookup (docs/kv_bottleneck.md), float64, dense."""

import torch

from .vq_topk import vq_topk


def kv_bottleneck_lookup(z_proj, keys, values, k=1):
    """(out (B, C, dv) float64, ids (B, C, k)): per codebook c the k keys nearest to z_proj[:, c] in squared L2
    (ties to the lower index), and the mean of their value rows."""
    B, C = z_proj.shape[:2]
    _, ids = vq_topk(z_proj.transpose(0, 1), keys, k, "l2")  # (C, B, k)
    rows = torch.gather(values.double(), 1, ids.reshape(C, B * k, 1).expand(-1, -1, values.shape[-1]))
    out = rows.reshape(C, B, k, -1).mean(2)
    return out.transpose(0, 1), ids.transpose(0, 1)


__all__ = ["kv_bottleneck_lookup"]
