"""The preallocated KV cache of a KestrelLM (docs/models_and_decoding.md): all layers in one tensor per K and V,
(num_layers, B, n_kv_heads, max_len, head_dim), so that kestrel.ops.compact_kv_cache moves every layer's accepted
rows in one launch; per-sequence lengths `seqlens (B,)` int32; for "plga" the G-cache (num_layers, B, n_heads,
head_dim, head_dim) float32, built from the prompt by the first cached forward and reused afterwards.

`host_seqlens` is a host-side mirror of `seqlens` (a list of ints), or None when unknown. A cached forward sizes its
key slice by the longest sequence: with the mirror known it reads it there, with None it reads `seqlens` from the
device (a synchronisation). KestrelLM's cached forward keeps the mirror up to date (a right-padded prefill needs
`lengths` as a list of ints for that); a draft-tree step that compacts the cache leaves it unknown, and
kestrel.decoding.generate restores it from the accepted lengths it reads on the host anyway. The mirror remembers
the version counter of `seqlens` when it was set: any later in-place write to `seqlens` that does not also set the
mirror (e.g. `cache.seqlens.copy_(saved)`) makes it unknown, so a stale mirror is never used. (Under
torch.inference_mode the counter is not tracked and the mirror is always unknown.)
"""

import torch


class KVCache:
    def __init__(
        self,
        num_layers,
        batch_size,
        num_kv_heads,
        max_len,
        head_dim,
        *,
        dtype=torch.float32,
        device="cpu",
        g_heads=None,
    ):
        for label, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("max_len", max_len),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache: {label} must be a positive int, got {value!r}")
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.G = (
            torch.zeros((num_layers, batch_size, g_heads, head_dim, head_dim), dtype=torch.float32, device=device)
            if g_heads
            else None
        )
        self.g_built = False
        self.host_seqlens = [0] * batch_size

    @classmethod
    def for_model(cls, model, batch_size, max_len=None, dtype=None):
        """A cache for `model` (a KestrelLM) in the model's dtype, max_len defaulting to config.max_seq_len."""
        config = model.config
        return cls(
            config.n_layers,
            batch_size,
            config.n_kv_heads,
            max_len or config.max_seq_len,
            config.head_dim,
            dtype=dtype or model.dtype,
            device=model.device,
            g_heads=config.n_heads if config.attention == "plga" else None,
        )

    def _seqlens_version(self):
        return None if self.seqlens.is_inference() else self.seqlens._version

    @property
    def host_seqlens(self):
        """The host mirror of seqlens (a list of ints), or None when unknown (never set, set to None, or seqlens
        written in place since it was set)."""
        if self._host_seqlens is None or self._host_version is None or self._host_version != self._seqlens_version():
            return None
        return list(self._host_seqlens)

    @host_seqlens.setter
    def host_seqlens(self, values):
        """Set the mirror to `values` (B ints: the current seqlens) or None."""
        if values is not None:
            values = [int(n) for n in values]
            if len(values) != self.batch_size:
                raise ValueError(f"KVCache: host_seqlens must have {self.batch_size} entries, got {len(values)}")
        self._host_seqlens, self._host_version = values, self._seqlens_version()

    @property
    def batch_size(self):
        return self.k.shape[1]

    @property
    def max_len(self):
        return self.k.shape[3]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.seqlens, self.G) if t is not None)

    def reset(self):
        """Forget every sequence (the buffers stay allocated; the G-cache is rebuilt by the next prefill)."""
        self.seqlens.zero_()
        self.host_seqlens = [0] * self.batch_size
        self.g_built = False

    def advance(self, L, lengths=None, host_lengths=None):
        """After a cached forward of L positions wrote its rows: seqlens grows by L, or by `lengths` (B,) (a tensor;
        `host_lengths` the same as a list of ints when known, which keeps the host mirror known); the G-cache, if
        any, counts as built (the forward stored it)."""
        if self.G is not None:
            self.g_built = True
        mirror = self.host_seqlens  # read before the write below (which leaves it unknown until set again)
        self.seqlens += lengths.to(self.seqlens) if lengths is not None else L
        if mirror is not None and lengths is None:
            self.host_seqlens = [n + L for n in mirror]
        elif mirror is not None and host_lengths is not None:
            self.host_seqlens = [n + m for n, m in zip(mirror, host_lengths)]
        else:
            self.host_seqlens = None  # device lengths: unknown on the host until someone reads them

    def longest(self):
        """The longest sequence's length: from the host mirror when known, else read from the device (a sync)."""
        mirror = self.host_seqlens
        return max(mirror) if mirror is not None else int(self.seqlens.max())


__all__ = ["KVCache"]
