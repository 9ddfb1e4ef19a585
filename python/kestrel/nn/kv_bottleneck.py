"""Discrete key-value bottleneck (docs/kv_bottleneck.md; Träuble et al., "Discrete Key-Value Bottleneck", ICML 2023).

A frozen encoder's features z (B, dim_in) are projected once per codebook by fixed random projections; each of the
C codebooks holds P (key, value) pairs; a row's output in codebook c is the value of its nearest key (mean over
the top-k); a decoder maps the (B, C, dim_value) values to the task. Keys come from EMA k-means on unlabeled data
and are then frozen; values start at zero and are the only thing the bottleneck learns, sparsely: a value row no
input selected gets exactly zero gradient, which is what keeps old tasks intact under continual learning.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_finite_number, require_int, require_number
from ..ops.kv_bottleneck import kv_bottleneck_lookup
from ..ops.vq_topk import vq_topk

DECODERS = ("vote", "linear", "mlp")


class DiscreteKeyValueBottleneck(nn.Module):
    """DKVB over features of size `dim_in`.

    - buffers: `projection` (C, dim_in, dim_key), fixed random columns of unit norm; `keys` (C, P, dim_key);
      the EMA k-means statistics `ema_counts` (C, P) and `ema_sums` (C, P, dim_key); `keys_frozen`.
    - parameter `values` (C, P, dim_value), zeros.
    - forward(z) -> the decoder's output: decoder "vote" averages the C retrieved values (B, dim_value) — the
      paper's non-parametric vote when dim_value is the number of classes; "linear" / "mlp" map the flattened
      (B, C * dim_value) to `dim_out` (an MLP with one hidden layer of `hidden` units). `last_ids` (B, C, topk)
      holds the selected pairs.
    - keys: `update_keys(z)` is one EMA k-means step (decay `ema_decay`, dead keys re-seeded from the batch);
      `fit_keys(batches, epochs)` runs it over unlabeled data and then `freeze_keys()`.
    """

    def __init__(
        self,
        dim_in,
        num_codebooks=256,
        num_pairs=4096,
        dim_key=14,
        dim_value=10,
        *,
        topk=1,
        decoder="vote",
        dim_out=None,
        hidden=256,
        ema_decay=0.95,
        dead_threshold=1e-3,
        generator=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = "DiscreteKeyValueBottleneck"
        if decoder not in DECODERS:
            raise ValueError(f"{name}: decoder must be one of {DECODERS}, got {decoder!r}")
        sizes = [
            ("dim_in", dim_in),
            ("num_codebooks", num_codebooks),
            ("num_pairs", num_pairs),
            ("dim_key", dim_key),
            ("dim_value", dim_value),
        ]
        if decoder != "vote" and dim_out is None:
            raise ValueError(f"{name}: decoder={decoder!r} needs dim_out (the task's output size)")
        if decoder != "vote":
            sizes.append(("dim_out", dim_out))
        if decoder == "mlp":
            sizes.append(("hidden", hidden))
        for label, value in sizes:
            require_int(name, label, value)
            if value < 1:
                raise ValueError(f"{name}: {label} must be a positive integer, got {value!r}")
        require_int(name, "topk", topk)
        if not 1 <= topk <= num_pairs:
            raise ValueError(f"{name}: topk must be an integer in [1, num_pairs={num_pairs}], got {topk!r}")
        require_number(name, "ema_decay", ema_decay)
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"{name}: ema_decay must lie in (0, 1), got {ema_decay}")
        require_number(name, "dead_threshold", dead_threshold)
        if not (is_finite_number(dead_threshold) and dead_threshold >= 0):
            raise ValueError(f"{name}: dead_threshold must be a finite number >= 0, got {dead_threshold!r}")
        self.dim_in, self.num_codebooks, self.num_pairs = dim_in, num_codebooks, num_pairs
        self.dim_key, self.dim_value, self.topk = dim_key, dim_value, topk
        self.decoder_kind, self.ema_decay, self.dead_threshold = decoder, ema_decay, dead_threshold
        C, P = num_codebooks, num_pairs
        proj = torch.randn((C, dim_in, dim_key), generator=generator)
        self.register_buffer("projection", F.normalize(proj, dim=1).to(device=device, dtype=dtype))
        keys = torch.randn((C, P, dim_key), generator=generator) / dim_in**0.5
        self.register_buffer("keys", keys.to(device=device, dtype=dtype))
        self.register_buffer("ema_counts", torch.zeros((C, P), device=device))
        self.register_buffer("ema_sums", torch.zeros((C, P, dim_key), device=device))
        self.register_buffer("keys_frozen", torch.zeros((), dtype=torch.bool, device=device))
        self.values = nn.Parameter(torch.zeros((C, P, dim_value), device=device, dtype=dtype))
        if decoder == "linear":
            self.decoder = nn.Linear(C * dim_value, dim_out, device=device, dtype=dtype)
        elif decoder == "mlp":
            self.decoder = nn.Sequential(
                nn.Linear(C * dim_value, hidden, device=device, dtype=dtype),
                nn.ReLU(),
                nn.Linear(hidden, dim_out, device=device, dtype=dtype),
            )
        else:
            self.decoder = None
        self.last_ids = None

    def extra_repr(self):
        return (
            f"dim_in={self.dim_in}, num_codebooks={self.num_codebooks}, num_pairs={self.num_pairs}, "
            f"dim_key={self.dim_key}, dim_value={self.dim_value}, topk={self.topk}, "
            f"decoder={self.decoder_kind!r}"
        )

    def project(self, z):
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(
                f"DiscreteKeyValueBottleneck: z must be a float tensor (B, dim_in={self.dim_in}), got "
                f"{getattr(z, 'dtype', type(z).__name__)}"
            )
        if z.dim() != 2 or z.shape[1] != self.dim_in:
            raise ValueError(f"DiscreteKeyValueBottleneck: z must be (B, dim_in={self.dim_in}), got {tuple(z.shape)}")
        return torch.einsum("bi,cik->bck", z.to(self.projection.dtype), self.projection)

    def retrieve(self, z):
        """(values (B, C, dim_value), ids (B, C, topk)) for features z (B, dim_in)."""
        return kv_bottleneck_lookup(self.project(z).detach(), self.keys, self.values, self.topk)

    def forward(self, z):
        out, ids = self.retrieve(z)
        self.last_ids = ids
        if self.decoder is None:
            return out.mean(1)
        return self.decoder(out.reshape(out.shape[0], -1))

    # keys -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_keys(self, z, generator=None):
        """One EMA k-means step on a batch of unlabeled features z (B, dim_in): assign each projected row to its
        nearest key, decay the per-key counts and sums by ema_decay and add the batch's, set each key to its
        (Laplace-smoothed) mean, and re-seed keys whose EMA count fell under dead_threshold from random batch rows.
        Returns the number of re-seeded keys."""
        name = "DiscreteKeyValueBottleneck.update_keys"
        if bool(self.keys_frozen):
            raise RuntimeError(f"{name}: the keys are frozen")
        zp = self.project(z).float().transpose(0, 1).contiguous()  # (C, B, dk)
        if zp.shape[1] == 0:
            raise ValueError(f"{name}: z must hold at least one row, got shape {tuple(z.shape)}")
        # checked on the CPU only (on a GPU it would be a host sync per step): a NaN row would make the EMA
        # statistics, and so every later key, NaN
        if not zp.is_cuda and not bool(torch.isfinite(zp).all()):
            raise ValueError(f"{name}: z must be finite (its projection holds NaN/inf)")
        C, B, dk = zp.shape
        P = self.num_pairs
        _, ids = vq_topk(zp, self.keys.float(), 1, metric="l2")
        flat = (ids[..., 0] + torch.arange(C, device=zp.device)[:, None] * P).reshape(-1)
        counts = torch.bincount(flat, minlength=C * P).view(C, P).float()
        sums = torch.zeros((C * P, dk), device=zp.device).index_add_(0, flat, zp.reshape(-1, dk)).view(C, P, dk)
        decay = self.ema_decay
        self.ema_counts.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sums.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.ema_counts.sum(-1, keepdim=True)
        smoothed = (self.ema_counts + 1e-5) / (n + P * 1e-5) * n
        keys = self.ema_sums / smoothed[..., None]
        dead = self.ema_counts < self.dead_threshold
        pick = torch.randint(0, B, (C, P, 1), generator=generator).to(zp.device).expand(-1, -1, dk)
        fresh = torch.gather(zp, 1, pick)
        keys = torch.where(dead[..., None], fresh, keys)
        self.ema_sums.copy_(torch.where(dead[..., None], fresh, self.ema_sums))
        self.ema_counts.masked_fill_(dead, 1.0)
        self.keys.copy_(keys.to(self.keys.dtype))
        return int(dead.sum())

    def fit_keys(self, batches, epochs=1, generator=None):
        """EMA k-means over an iterable of feature batches (B, dim_in) for `epochs` passes, then freeze the keys."""
        for _ in range(epochs):
            for z in batches:
                self.update_keys(z, generator=generator)
        self.freeze_keys()

    def freeze_keys(self):
        self.keys_frozen.fill_(True)


__all__ = ["DiscreteKeyValueBottleneck", "DECODERS"]
