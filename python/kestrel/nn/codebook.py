"""Codebook features (docs/codebook.md): a layer that replaces its input by the mean (or sum) of its k nearest
codes, with a straight-through gradient to the input and a gradient to the selected codebook rows only.

Paper: Tamkin, Taufeeque & Goodman, "Codebook Features: Sparse and Discrete Interpretability for Neural Networks"
(2023). The selection is kestrel.ops.vq_topk (the fused top-k kernel: no N×C score matrix).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_finite_number, require_bool, require_int
from ..ops.vq_topk import METRICS, vq_topk


class _StraightThrough(torch.autograd.Function):
    """Forward: the codes. Backward: the upstream gradient goes unchanged both to the input (the straight-through
    estimator) and to the codes (and from them, through the embedding gather, to the selected codebook rows)."""

    @staticmethod
    def forward(ctx, x, codes):
        return codes.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


class _GatherCodes(torch.autograd.Function):
    """rows = codebook.reshape(-1, dim)[flat_ids]; the backward scatter-adds the rows' gradient into the selected
    codebook rows only (float32 accumulation), as a dense tensor or, with sparse=True, a sparse COO tensor of the
    codebook's shape (sparse dims: the code's (head,) index, dense dim: the code vector)."""

    @staticmethod
    def forward(ctx, codebook, flat_ids, sparse):
        ctx.save_for_backward(flat_ids)
        ctx.shape, ctx.sparse = codebook.shape, sparse
        return codebook.reshape(-1, codebook.shape[-1])[flat_ids]

    @staticmethod
    def backward(ctx, grad):
        (flat_ids,) = ctx.saved_tensors
        shape, dim = ctx.shape, ctx.shape[-1]
        flat = flat_ids.reshape(-1)
        rows = grad.reshape(-1, dim)
        if ctx.sparse:
            num_codes = shape[-2]
            index = torch.stack([flat // num_codes, flat % num_codes]) if len(shape) == 3 else flat[None]
            return torch.sparse_coo_tensor(index, rows, shape, check_invariants=False).coalesce(), None, None
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        total = torch.zeros((shape[:-1].numel(), dim), dtype=acc, device=rows.device)
        return total.index_add_(0, flat, rows.to(acc)).to(grad.dtype).view(shape), None, None


class CodebookLayer(nn.Module):
    """Top-k codebook bottleneck. `dim` is the size of one code; with `heads=H` the input's last dimension is
    H * dim, split into H heads, each with its own codebook (all heads in one kernel launch).

    - codebook: parameter (num_codes, dim), or (heads, num_codes, dim) when heads > 1.
    - forward(x, *, positions=None, return_ids=False): x (..., heads * dim) -> the same shape: per head, the mean
      (reduce="mean", the public codebook-features code) or the sum (reduce="sum", the paper) of the k codes
      nearest to LayerNorm(x) (layernorm=True; no affine parameters) by `metric` ("cosine", "l2" or "ip"). The
      input gets the upstream gradient through the straight-through estimator (and LayerNorm's backward when
      layernorm=True); the codebook gets gradient only in the selected rows (an embedding gather: a scatter-add,
      never a one-hot product; `sparse_grad=True` makes it a sparse tensor). The chosen ids (..., heads, k) are
      kept in `last_ids` after every call and returned with return_ids=True.
    - usage: in training mode `code_counts` (heads, num_codes) int64 counts exactly how many (token, slot) picks
      chose each code since the last `reset_counts()`; the layer keeps the latest `recent_size` inputs per head
      for `replace_dead_codes()`.
    - interventions (work during generation): `ban(codes)` excludes codes from the selection; `force(codes,
      positions=None)` replaces the selection at the given positions (None: everywhere) by the given codes;
      `positions` in forward are the tokens' absolute positions along dim -2 of x (default 0..L-1; a decoding loop
      passes its cache offsets; codes forced at a position win over codes forced everywhere);
      `clear_interventions()` removes both.
    - `kmeans_init(samples, iters=10)`: Lloyd's k-means on the device from sample activations, its assignment
      step the fused top-1 kernel.
    """

    def __init__(
        self,
        dim,
        num_codes,
        k=8,
        *,
        metric="cosine",
        heads=1,
        layernorm=True,
        reduce="mean",
        sparse_grad=False,
        recent_size=4096,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = "CodebookLayer"
        if metric not in METRICS:
            raise ValueError(f"{name}: metric must be one of {METRICS}, got {metric!r}")
        if reduce not in ("mean", "sum"):
            raise ValueError(f"{name}: reduce must be 'mean' or 'sum', got {reduce!r}")
        for label, value in (("dim", dim), ("num_codes", num_codes), ("heads", heads), ("recent_size", recent_size)):
            require_int(name, label, value)
            if value < 1:
                raise ValueError(f"{name}: {label} must be a positive integer, got {value!r}")
        require_int(name, "k", k)
        if not 1 <= k <= num_codes:
            raise ValueError(f"{name}: k must be an integer in [1, num_codes={num_codes}], got {k!r}")
        require_bool(name, "layernorm", layernorm)
        require_bool(name, "sparse_grad", sparse_grad)
        self.dim, self.num_codes, self.k, self.heads = dim, num_codes, k, heads
        self.metric, self.layernorm, self.reduce, self.sparse_grad = metric, layernorm, reduce, sparse_grad
        shape = (num_codes, dim) if heads == 1 else (heads, num_codes, dim)
        self.codebook = nn.Parameter(torch.randn(shape, device=device, dtype=dtype) / dim**0.5)
        self.register_buffer("code_counts", torch.zeros((heads, num_codes), dtype=torch.int64, device=device))
        self.recent_size = recent_size
        self.register_buffer(
            "recent", torch.zeros((heads, recent_size, dim), dtype=self.codebook.dtype, device=device), persistent=False
        )
        self._recent_filled = 0
        self._recent_next = 0
        self.banned = None  # bool (heads, num_codes) or None
        self.forced = {}  # absolute position (or None: every position) -> ids (heads, k)
        self.last_ids = None

    def extra_repr(self):
        return (
            f"dim={self.dim}, num_codes={self.num_codes}, k={self.k}, metric={self.metric!r}, "
            f"heads={self.heads}, layernorm={self.layernorm}, reduce={self.reduce!r}"
        )

    def _codebook3(self):
        return self.codebook if self.heads > 1 else self.codebook[None]

    def _split(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise TypeError(
                f"CodebookLayer: the input must be a float tensor (..., heads * dim), got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.shape[-1] != self.heads * self.dim:
            raise ValueError(
                f"CodebookLayer: the input's last dimension must be heads * dim = "
                f"{self.heads * self.dim}, got {x.shape[-1]}"
            )
        xh = x.reshape(-1, self.heads, self.dim)
        return F.layer_norm(xh, (self.dim,)) if self.layernorm else xh

    @staticmethod
    def _integer_ids(name, label, values):
        """values (an int, a sequence of ints or an integer tensor) as an int64 tensor; floats and bools are refused
        rather than truncated."""
        ids = torch.as_tensor(values)
        if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
            raise TypeError(f"{name}: {label} must be integers, got {ids.dtype} values")
        return ids.to(torch.int64)

    def _code_ids(self, codes):
        ids = self._integer_ids("CodebookLayer.force", "codes", codes).to(self.codebook.device)
        if ids.dim() == 0:
            ids = ids[None]
        if ids.dim() == 1:
            ids = ids[None].expand(self.heads, -1)
        if ids.dim() != 2 or ids.shape[0] != self.heads:
            raise ValueError(f"CodebookLayer: codes must be (k,) or (heads={self.heads}, k), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise ValueError(
                f"CodebookLayer: codes must lie in [0, num_codes={self.num_codes}), got "
                f"{ids.min().item()}..{ids.max().item()}"
            )
        return ids

    # interventions ----------------------------------------------------------------------------------------------
    def ban(self, codes, head=None):
        """Exclude `codes` (ints) from the selection, in every head or in `head` only."""
        ids = self._integer_ids("CodebookLayer.ban", "codes", codes).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise ValueError(
                f"CodebookLayer.ban: codes must lie in [0, num_codes={self.num_codes}), got {ids.tolist()}"
            )
        if head is not None:
            require_int("CodebookLayer.ban", "head", head)
        if head is not None and not 0 <= head < self.heads:
            raise ValueError(f"CodebookLayer.ban: head must lie in [0, heads={self.heads}), got {head}")
        banned = (
            self.banned.clone()
            if self.banned is not None
            else torch.zeros((self.heads, self.num_codes), dtype=torch.bool, device=self.codebook.device)
        )
        banned[slice(None) if head is None else head, ids.to(banned.device)] = True
        allowed = int((~banned).sum(-1).min())
        if allowed < self.k:
            raise ValueError(f"CodebookLayer.ban: banning {ids.tolist()} leaves {allowed} codes, fewer than k={self.k}")
        self.banned = banned

    def force(self, codes, positions=None):
        """Select `codes` ((k,) or (heads, k) ids) at the given absolute positions (ints), or everywhere (None)."""
        ids = self._code_ids(codes)
        if ids.shape[1] != self.k:
            raise ValueError(f"CodebookLayer.force: give k={self.k} codes per head, got {ids.shape[1]}")
        if positions is None:
            self.forced[None] = ids
            return
        for position in self._integer_ids("CodebookLayer.force", "positions", positions).reshape(-1).tolist():
            self.forced[position] = ids

    def clear_interventions(self):
        self.banned = None
        self.forced = {}

    # forward ----------------------------------------------------------------------------------------------------
    def forward(self, x, *, positions=None, return_ids=False):
        lead = x.shape[:-1]
        xh = self._split(x)  # (M, H, dim)
        cb = self._codebook3()
        banned = self.banned if self.banned is None else self.banned.to(cb.device)  # follows .to() / .cuda()
        with torch.no_grad():
            _, ids = vq_topk(xh.transpose(0, 1), cb, self.k, metric=self.metric, banned=banned)  # (H, M, k)
            ids = ids.transpose(0, 1)  # (M, H, k)
            if self.forced:
                ids = self._apply_forced(ids, lead, positions)
            if self.training:
                self._record(xh.detach(), ids)
        flat = ids + torch.arange(self.heads, device=ids.device)[None, :, None] * self.num_codes
        codes = _GatherCodes.apply(self.codebook, flat, self.sparse_grad)  # (M, H, k, dim)
        codes = codes.mean(2) if self.reduce == "mean" else codes.sum(2)
        out = _StraightThrough.apply(xh, codes).reshape(*lead, self.heads * self.dim)
        self.last_ids = ids.reshape(*lead, self.heads, self.k)
        return (out, self.last_ids) if return_ids else out

    def _apply_forced(self, ids, lead, positions):
        ids = ids.reshape(*lead, self.heads, self.k).clone()
        if None in self.forced:
            ids[...] = self.forced[None].to(ids.device)
        if any(p is not None for p in self.forced):
            if len(lead) == 0:
                raise ValueError("CodebookLayer: forcing codes at positions needs x with a position dimension")
            L = lead[-1]
            pos = (
                torch.arange(L, device=ids.device)
                if positions is None
                else torch.as_tensor(positions, device=ids.device)
            )
            if pos.shape[-1] != L:
                raise ValueError(
                    f"CodebookLayer: positions must have {L} entries along the last axis (x's dim -2), "
                    f"got shape {tuple(pos.shape)}"
                )
            pos = pos.expand(*lead)
            for position, forced_ids in self.forced.items():
                if position is not None:
                    ids[pos == position] = forced_ids.to(ids.device)
        return ids.reshape(-1, self.heads, self.k)

    def _record(self, xh, ids):
        counts = torch.bincount(
            (ids + torch.arange(self.heads, device=ids.device)[None, :, None] * self.num_codes).reshape(-1),
            minlength=self.heads * self.num_codes,
        )
        self.code_counts += counts.view(self.heads, self.num_codes)
        take = xh[-self.recent_size :].transpose(0, 1).to(self.recent.dtype)  # (H, m, dim): the latest rows
        m = take.shape[1]
        slots = (self._recent_next + torch.arange(m, device=self.recent.device)) % self.recent_size
        self.recent[:, slots] = take
        self._recent_next = (self._recent_next + m) % self.recent_size
        self._recent_filled = min(self.recent_size, self._recent_filled + m)

    # maintenance ------------------------------------------------------------------------------------------------
    def reset_counts(self):
        self.code_counts.zero_()

    @torch.no_grad()
    def replace_dead_codes(self, noise=0.01, generator=None):
        """Re-initialise every code unused since the last reset from randomly chosen recent inputs plus Gaussian
        noise of `noise` times their standard deviation; reset the counts. Returns the number replaced per head
        (heads,). Needs recent inputs (a forward in training mode)."""
        if not (is_finite_number(noise) and noise >= 0):
            raise ValueError(f"CodebookLayer.replace_dead_codes: noise must be a finite number >= 0, got {noise!r}")
        if self._recent_filled == 0:
            raise RuntimeError(
                "CodebookLayer.replace_dead_codes: no recent inputs yet (run forward in training mode first)"
            )
        dead = self.code_counts == 0
        cb = self._codebook3()
        recent = self.recent[:, : self._recent_filled]
        for h in range(self.heads):
            rows = dead[h].nonzero().flatten()
            if rows.numel() == 0:
                continue
            pick = torch.randint(0, recent.shape[1], (rows.numel(),), generator=generator).to(recent.device)
            fresh = recent[h, pick].to(cb.dtype)
            scale = recent[h].float().std().to(cb.dtype)
            fresh = fresh + noise * scale * torch.randn(fresh.shape, generator=generator).to(fresh)
            cb[h, rows] = fresh
        self.reset_counts()
        return dead.sum(-1)

    @torch.no_grad()
    def kmeans_init(self, samples, iters=10, *, seeding="kmeans++", generator=None):
        """Set the codebook by Lloyd's k-means on `samples` (..., heads * dim) (LayerNorm applied when the layer
        has it), on the samples' device. Seeding: "kmeans++" (D² sampling, every head at once, on the device:
        num_codes sequential passes over the samples, O(num_codes · M · dim) work) or "random" (distinct random
        samples: cheaper for very large codebooks). Assignment: the fused top-1 kernel (cosine for the cosine metric, l2
        otherwise); update: the mean of each cluster (scatter-add); an empty cluster takes a random sample of its
        head. Returns the final mean squared distance to the nearest centre per head (heads,)."""
        name = "CodebookLayer.kmeans_init"
        if seeding not in ("kmeans++", "random"):
            raise ValueError(f"{name}: seeding must be 'kmeans++' or 'random', got {seeding!r}")
        require_int(name, "iters", iters)
        if iters < 1:
            raise ValueError(f"{name}: iters must be >= 1, got {iters}")
        if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
            raise TypeError(
                f"{name}: samples must be a float tensor (..., heads * dim), got "
                f"{getattr(samples, 'dtype', type(samples).__name__)}"
            )
        xh = self._split(samples.to(self.codebook.device)).transpose(0, 1).float().contiguous()  # (H, M, dim)
        # one host read, once, before the codebook changes: a NaN or inf sample makes its cluster's centre NaN
        bad = ~torch.isfinite(xh)
        if bool(bad.any()):
            raise ValueError(
                f"{name}: samples must be finite in float32, got {int(bad.sum())} NaN/inf values among {xh.numel()}"
            )
        H, M, dim = xh.shape
        C = self.num_codes
        if M < C:
            raise ValueError(f"{name}: needs at least num_codes={C} samples, got {M}")
        metric = "cosine" if self.metric == "cosine" else "l2"
        centres = self._seed(xh, C, seeding, generator)
        offsets = torch.arange(H, device=xh.device)[:, None] * C
        for _ in range(iters):
            _, ids = vq_topk(xh, centres, 1, metric=metric)
            flat = (ids[..., 0] + offsets).reshape(-1)
            sums = torch.zeros((H * C, dim), device=xh.device).index_add_(0, flat, xh.reshape(-1, dim))
            counts = torch.bincount(flat, minlength=H * C).to(sums.dtype)[:, None]
            pick = torch.randint(0, M, (H, C, 1), generator=generator).to(xh.device).expand(-1, -1, dim)
            refill = torch.gather(xh, 1, pick).reshape(H * C, dim)  # an empty cluster's own head's sample
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), refill).view(H, C, dim)
        _, ids = vq_topk(xh, centres, 1, metric="l2")
        err = ((xh - torch.gather(centres, 1, ids.expand(-1, -1, dim))) ** 2).sum(-1).mean(-1)
        self._codebook3().copy_(centres.to(self.codebook.dtype))
        self.reset_counts()
        return err

    @staticmethod
    def _seed(xh, C, seeding, generator):
        H, M, dim = xh.shape
        if seeding == "random":
            return torch.stack([xh[h, torch.randperm(M, generator=generator)[:C].to(xh.device)] for h in range(H)])
        heads = torch.arange(H, device=xh.device)
        # all random numbers up front (from the caller's generator, on the CPU), then the C draws on the device:
        # each picks a sample with probability proportional to its squared distance to the nearest centre
        uniform = torch.rand((C, H), generator=generator, dtype=torch.float64).to(xh.device)
        first = (uniform[0] * M).long().clamp_max(M - 1)
        centres = [xh[heads, first]]  # (H, dim) each
        nearest = ((xh - centres[0][:, None]) ** 2).sum(-1)  # (H, M) squared distance to the nearest centre
        for step in range(1, C):
            cdf = torch.cumsum(nearest.double(), dim=-1)
            total = cdf[:, -1:]
            # a head whose samples are all covered (total 0) draws uniformly
            target = torch.where(total > 0, uniform[step][:, None] * total, uniform[step][:, None] * M)
            cdf = torch.where(total > 0, cdf, torch.arange(1, M + 1, device=xh.device, dtype=cdf.dtype))
            pick = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(M - 1)
            centres.append(xh[heads, pick])
            nearest = torch.minimum(nearest, ((xh - centres[-1][:, None]) ** 2).sum(-1))
        return torch.stack(centres, 1)


__all__ = ["CodebookLayer"]
