"""KestrelLM: a decoder-only transformer composed of kestrel.nn's layers (docs/models_and_decoding.md).

One forward serves three uses, the three modes of kestrel.nn.AttentionContext:
- training / scoring (`cache=None`, "block"): causal attention over the whole (B, L) block;
- cached decoding (`cache` a kestrel.decoding.KVCache, "decode"): the L new tokens of sequence b are written to the
  cache at positions [seqlens[b], seqlens[b] + L) and attend to everything before them; afterwards seqlens grows
  by L (or by `lengths[b]` when the block is right-padded: a prompt prefill with mixed lengths);
- a draft-tree forward (`tree_depth` and `tree_mask_bits` given, "tree"): the T tree tokens are written at
  [seqlens[b], seqlens[b] + T) with RoPE positions seqlens[b] + depth; each attends to the prefix and to its own
  ancestors (the packed bits go down to the kernels); seqlens is left alone (kestrel.ops.compact_kv_cache moves
  the accepted rows and advances it).

Each layer's attention is the core of its config's kind (kestrel.nn.SoftmaxCore, SoftplusCore, PowerLawGraphCore),
the same kernels in every mode. A one-token decode and a tree forward compute the same logits by different
numerics (other kernels, other matrix shapes): equal in exact arithmetic (the tests check float64), but in float32 /
bfloat16 they differ by rounding, and where two logits nearly tie the greedy token can differ.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CodebookLayer, StableEmbedding
from ..nn.attention import AttentionContext, PowerLawGraphCore, SoftmaxCore, SoftplusCore
from ..nn.norm import Float32RMSNorm
from ..nn.rope import apply_rope, rope_tables
from .config import KestrelConfig


class _Step:
    """One forward's shared state: its AttentionContext, the absolute positions and RoPE tables, and where the new
    K/V rows go in the cache."""

    def __init__(self, config, input_ids, cache, lengths, tree_depth, tree_mask_bits):
        B, L = input_ids.shape
        device = input_ids.device
        self.cache = cache
        steps = torch.arange(L, device=device)
        valid = steps[None, :] < lengths.to(device)[:, None] if lengths is not None else None  # (B, L) real rows
        g_cache = cache.G if cache is not None else None
        g_built = cache.g_built if cache is not None else False
        if cache is None:
            self.positions = steps[None, :].expand(B, L)
            self.context = AttentionContext("block", B, L, valid=valid)
        else:
            seqlens = cache.seqlens.to(torch.long)
            longest = cache.longest()  # the host mirror when known: no device read per decoding step
            if longest + L > cache.max_len:
                raise ValueError(
                    f"KestrelLM: the cache holds {cache.max_len} positions per sequence, this forward "
                    f"needs {longest + L} (longest sequence {longest} + {L} new)"
                )
            slots = seqlens[:, None] + steps[None, :]  # (B, L) cache rows written
            H, D = cache.k.shape[2], cache.k.shape[4]
            self.write_index = slots[:, None, :, None].expand(B, H, L, D)
            if tree_depth is not None:
                self.positions = seqlens[:, None] + tree_depth.to(device=device, dtype=torch.long)
                self.context = AttentionContext(
                    "tree",
                    B,
                    L,
                    prefix_lens=cache.seqlens.to(torch.int32),
                    tree_mask_bits=tree_mask_bits.to(device),
                    Lk=longest + L,
                    g_cache=g_cache,
                    g_built=g_built,
                )
            else:
                self.positions = slots
                self.context = AttentionContext(
                    "decode",
                    B,
                    L,
                    valid=valid,
                    key_lens=(seqlens + L).to(torch.int32),
                    prefix_lens=cache.seqlens.to(torch.int32),
                    Lk=longest + L,
                    g_cache=g_cache,
                    g_built=g_built,
                )
        cos, sin = rope_tables(self.positions, config.head_dim, config.rope_base, config.rope_scaling)
        self.cos, self.sin = cos[:, None], sin[:, None]  # (B, 1, L, head_dim / 2): broadcast over the heads


def rms_norm(config, dim):
    """torch's RMSNorm, or (norm_in_float32, converted checkpoints) transformers' float32 one."""
    if config.norm_in_float32:
        return Float32RMSNorm(dim, eps=config.norm_eps)
    return nn.RMSNorm(dim, eps=config.norm_eps)


def attention_core(config, layer_index):
    """The attention core of the config's kind."""
    if config.attention == "softmax":
        return SoftmaxCore()
    if config.attention in ("lssa", "lssar"):
        return SoftplusCore(config.lssar_p if config.attention == "lssar" else None, config.softplus_eps)
    return PowerLawGraphCore(
        config.head_dim, config.n_heads, config.plga_a_dff, config.plga_num_reslayer, config.plga_num_dense, layer_index
    )


class Attention(nn.Module):
    """GQA attention of one layer: q/k/v/o projections, RoPE, the cache write, and the configured core."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.config, self.layer_index = config, layer_index
        H, Hkv, D, d = config.n_heads, config.n_kv_heads, config.head_dim, config.d_model
        self.qkv_proj = nn.Linear(d, (H + 2 * Hkv) * D, bias=config.attn_bias)  # q, k, v in one product
        self.o_proj = nn.Linear(H * D, d, bias=False)
        # Qwen3's per-head RMSNorm of q and k, before RoPE
        self.q_norm = rms_norm(config, D) if config.qk_norm else None
        self.k_norm = rms_norm(config, D) if config.qk_norm else None
        self.core = attention_core(config, layer_index)
        # one codebook per attention head (codebook features' per-head placement), all heads in one lookup
        self.codebook = (
            CodebookLayer(D, config.num_codes, k=config.codebook_k, heads=H) if config.codebook_attn else None
        )

    def forward(self, x, step):
        config = self.config
        B, L, _ = x.shape
        H, Hkv, D = config.n_heads, config.n_kv_heads, config.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.view(B, L, H, D), k.view(B, L, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), step.cos, step.sin)
        k = apply_rope(k.transpose(1, 2), step.cos, step.sin)
        v = v.view(B, L, Hkv, D).transpose(1, 2)
        if step.cache is not None:  # the new rows into the cache; the core reads the cache
            k_cache, v_cache = step.cache.k[self.layer_index], step.cache.v[self.layer_index]
            k_cache.scatter_(2, step.write_index, k.to(k_cache.dtype))
            v_cache.scatter_(2, step.write_index, v.to(v_cache.dtype))
            rows = step.context.Lk  # the rows any sequence of this forward reads (a view: no copy in one dtype)
            k, v = k_cache[:, :, :rows].to(q.dtype), v_cache[:, :, :rows].to(q.dtype)
        out = self.core(q, k, v, step.context)
        out = out.transpose(1, 2).reshape(B, L, H * D)
        if self.codebook is not None:
            out = self.codebook(out, positions=step.positions)  # absolute positions: forced codes work in decoding
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x) (gate and up in one product), then the optional codebook."""

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.codebook = (
            CodebookLayer(config.d_model, config.num_codes, k=config.codebook_k) if config.codebook_mlp else None
        )

    def forward(self, x, positions=None):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return self.codebook(out, positions=positions) if self.codebook is not None else out


class Block(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.attn_norm = rms_norm(config, config.d_model)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = rms_norm(config, config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, step):
        x = x + self.attn(self.attn_norm(x), step)
        return x + self.mlp(self.mlp_norm(x), step.positions)


class DraftHead(nn.Module):
    """A Medusa head: a residual SiLU block h + silu(W h + b) whose output goes through the shared LM head. W starts
    at zero, so an untrained head repeats the LM head's prediction."""

    def __init__(self, d_model):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, hidden):
        return hidden + F.silu(self.proj(hidden))


class KestrelLM(nn.Module):
    """The decoder-only LM of KestrelConfig; see the module docstring for the three kinds of forward.

    `model(input_ids)` with input_ids (B, L) int64 returns logits (B, L, vocab_size).
    `model(input_ids, cache, lengths=None, tree_depth=None, tree_mask_bits=None, return_hidden=False)`: the cached
    and tree forwards; return_hidden also returns the final hidden states (B, L, d_model) (after the last norm:
    what the LM head and the draft heads read). lengths (B,), a tensor or a list of ints (a list keeps the cache's
    host mirror of its lengths known, see kestrel.decoding.KVCache): the real tokens of each right-padded row; the
    padding positions may hold any id (e.g. -1), they are embedded as token 0 and never attended to.
    """

    def __init__(self, config):
        super().__init__()
        if isinstance(config, dict):
            config = KestrelConfig.from_dict(config)
        self.config = config
        if config.stable_embedding:
            self.embed = StableEmbedding(config.vocab_size, config.d_model)
        else:
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norm = rms_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.draft_heads = nn.ModuleList([DraftHead(config.d_model) for _ in range(config.num_draft_heads)])
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self):
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("draft_heads"):
                if ".attn.core.reslayerAs" in name:
                    continue  # the PLGA metric learner keeps its own initialisation
                out_proj = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, std=residual_std if out_proj else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if not self.config.stable_embedding:
            nn.init.normal_(self.embed.weight, std=std)
        for head in self.draft_heads:
            nn.init.zeros_(head.proj.weight)
            nn.init.zeros_(head.proj.bias)

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def forward(
        self, input_ids, cache=None, *, lengths=None, tree_depth=None, tree_mask_bits=None, return_hidden=False
    ):
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError(
                "KestrelLM: input_ids must be an int64 tensor (B, L), got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} of shape "
                f"{tuple(getattr(input_ids, 'shape', ()))}"
            )
        B, L = input_ids.shape
        if (tree_depth is None) != (tree_mask_bits is None):
            raise ValueError("KestrelLM: a tree forward needs both tree_depth and tree_mask_bits")
        if tree_depth is not None and cache is None:
            raise ValueError("KestrelLM: a tree forward needs a cache (the prefix lives there)")
        if cache is not None and cache.k.shape[1] != B:
            raise ValueError(f"KestrelLM: the cache holds {cache.k.shape[1]} sequences, input_ids has {B}")
        if cache is None and L > self.config.max_seq_len:
            raise ValueError(f"KestrelLM: input_ids has {L} positions, max_seq_len is {self.config.max_seq_len}")
        if lengths is not None and tree_depth is not None:
            raise ValueError("KestrelLM: lengths applies to a plain or cached forward, not to a tree forward")
        host_lengths = None
        if isinstance(lengths, (list, tuple)):
            host_lengths = [int(n) for n in lengths]
            if len(host_lengths) != B:
                raise ValueError(f"KestrelLM: lengths must have B={B} entries, got {len(host_lengths)}")
            lengths = torch.tensor(host_lengths, dtype=torch.int64, device=input_ids.device)
        step = _Step(self.config, input_ids, cache, lengths, tree_depth, tree_mask_bits)
        if step.context.valid is not None:  # padding rows may hold any id (e.g. -1): embed a valid one, never read
            input_ids = torch.where(
                step.context.valid, input_ids, torch.zeros((), dtype=input_ids.dtype, device=input_ids.device)
            )
        try:  # before anything is written to the cache; no read when the ids are valid
            x = self.embed(input_ids)
        except IndexError as error:  # the CPU lookup's "index out of range in self" (a GPU asserts instead)
            lo, hi = int(input_ids.min()), int(input_ids.max())
            raise ValueError(
                f"KestrelLM: input_ids must hold token ids in [0, vocab_size={self.config.vocab_size}), "
                f"got {lo if lo < 0 else hi}"
            ) from error
        for block in self.layers:
            x = block(x, step)
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        if cache is not None and tree_depth is None:
            cache.advance(L, lengths, host_lengths)
        return (logits, hidden) if return_hidden else logits

    def draft_logits(self, hidden):
        """The draft heads' logits for hidden states (..., d_model): (..., num_draft_heads, vocab_size)."""
        if not len(self.draft_heads):
            raise ValueError("KestrelLM: this model has no draft heads (config.num_draft_heads == 0)")
        return torch.stack([self.lm_head(head(hidden)) for head in self.draft_heads], dim=-2)

    def num_parameters(self, include_draft_heads=True):
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if not include_draft_heads and name.startswith("draft_heads"):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    @classmethod
    def from_hf(cls, model_or_path, dtype=None, num_draft_heads=0):
        """A KestrelLM from a transformers Llama / Mistral / Qwen2 / Qwen3 causal LM or its local directory, with
        num_draft_heads untrained draft heads (kestrel.models.hf; needs the hf extra)."""
        from .hf import from_hf  # transformers: an optional dependency; hf imports this module

        return from_hf(model_or_path, dtype, num_draft_heads)

    def to_hf(self):
        """The transformers model of a converted KestrelLM, bit for bit (kestrel.models.hf)."""
        from .hf import to_hf  # transformers: an optional dependency; hf imports this module

        return to_hf(self)

    def save(self, path):
        """Write {"config": ..., "state_dict": ...} with torch.save; KestrelLM.load(path) restores it."""
        torch.save({"config": self.config.to_dict(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        payload = torch.load(path, map_location=map_location, weights_only=True)
        model = cls(KestrelConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
        return model


__all__ = ["Attention", "Block", "DraftHead", "KestrelLM", "MLP", "attention_core"]
