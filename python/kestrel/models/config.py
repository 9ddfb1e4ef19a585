"""KestrelConfig: the hyper-parameters of a KestrelLM (docs/models_and_decoding.md)."""

from dataclasses import asdict, dataclass, fields

from .._checks import is_finite_number, is_int, require_bool, require_number

ATTENTION_KINDS = ("softmax", "lssa", "lssar", "plga")
_MAX_FLOAT32 = (2 - 2**-23) * 2.0**127


@dataclass
class KestrelConfig:
    """A decoder-only transformer: RoPE, RMSNorm, SwiGLU MLP, GQA (n_kv_heads key/value heads).

    attention: "softmax" (scaled dot-product), "lssa" (softplus attention), "lssar" (softplus attention with
    re-weighting, exponent lssar_p), "plga" (power-law graph attention with the metric learner; G is built from the
    prompt and kept in the cache). codebook_attn / codebook_mlp: a kestrel.nn.CodebookLayer (num_codes codes, top
    codebook_k) before the attention output projection / after the MLP. stable_embedding: kestrel.nn.StableEmbedding
    instead of nn.Embedding. num_draft_heads: Medusa-style draft heads (head k predicts the token k + 2 places
    ahead of the hidden state's position, one further than the LM head). max_seq_len: the RoPE and cache limit.

    What converted Hugging Face checkpoints need (kestrel.models.hf; softmax attention only): head_dim (None:
    d_model / n_heads; Qwen3 sets its own), attn_bias (biases on the q/k/v projections: Qwen2), qk_norm (an RMSNorm
    over each head of q and k before RoPE: Qwen3), rope_scaling (None, or Llama-3's {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}), norm_in_float32 (RMSNorm
    in float32 whatever the dtype, as transformers computes it), hf_architecture (the transformers class it came
    from, for to_hf).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    attention: str = "softmax"
    num_draft_heads: int = 0
    max_seq_len: int = 2048
    d_ff: int | None = None  # None: 8/3 d_model rounded up to a multiple of 32
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    lssar_p: float = 15.0
    softplus_eps: float = 1e-8
    plga_a_dff: int = 64
    plga_num_reslayer: int = 2
    plga_num_dense: int = 2
    codebook_attn: bool = False
    codebook_mlp: bool = False
    num_codes: int = 256
    codebook_k: int = 8
    stable_embedding: bool = False
    tie_embeddings: bool = True
    head_dim: int | None = None
    attn_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    norm_in_float32: bool = False
    hf_architecture: str | None = None

    def __post_init__(self):
        name = "KestrelConfig"
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        positive = [
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "n_kv_heads",
            "plga_a_dff",
            "plga_num_dense",
            "num_codes",
            "codebook_k",
        ] + ([] if self.d_ff is None else ["d_ff"])
        for key in positive + ["num_draft_heads", "plga_num_reslayer"]:
            value = getattr(self, key)
            if not is_int(value):
                raise TypeError(f"{name}: {key} must be an int, got {type(value).__name__} {value!r}")
            if value < (1 if key in positive else 0):
                raise ValueError(
                    f"{name}: {key} must be {'a positive int' if key in positive else 'an int >= 0'}, got {value!r}"
                )
        for key in (
            "codebook_attn",
            "codebook_mlp",
            "stable_embedding",
            "tie_embeddings",
            "attn_bias",
            "qk_norm",
            "norm_in_float32",
        ):
            require_bool(name, key, getattr(self, key))
        for key in ("rope_base", "norm_eps", "lssar_p", "softplus_eps"):
            value = getattr(self, key)
            require_number(name, key, value)
            if not (is_finite_number(value) and value > 0):
                raise ValueError(f"{name}: {key} must be a finite number > 0, got {value!r}")
        if self.lssar_p > _MAX_FLOAT32:  # the power is applied in float32
            raise ValueError(f"{name}: lssar_p must be at most {_MAX_FLOAT32:.4g}, got {self.lssar_p!r}")
        if self.codebook_k > self.num_codes:
            raise ValueError(f"{name}: codebook_k must be in [1, num_codes={self.num_codes}], got {self.codebook_k}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"{name}: attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(f"{name}: d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
            self.head_dim = self.d_model // self.n_heads
        elif not is_int(self.head_dim) or self.head_dim < 1:
            raise ValueError(
                f"{name}: head_dim must be None (d_model / n_heads) or a positive int, got {self.head_dim!r}"
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if (self.attn_bias or self.qk_norm or self.rope_scaling) and self.attention != "softmax":
            raise ValueError(
                f"{name}: attn_bias, qk_norm and rope_scaling go with attention='softmax' (converted "
                f"checkpoints), got attention={self.attention!r}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"{name}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"{name}: the head dim must be even for RoPE, got {self.head_dim}")
        if self.d_ff is None:
            self.d_ff = (8 * self.d_model // 3 + 31) // 32 * 32

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"KestrelConfig.from_dict: unknown keys {unknown}")
        return cls(**values)


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(scaling):
    name = "KestrelConfig"
    if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(
            f"{name}: rope_scaling must be None or Llama-3's {{'rope_type': 'llama3', ...}}, got {scaling!r}"
        )
    for key in LLAMA3_ROPE_KEYS:
        value = scaling.get(key)
        if not (is_finite_number(value) and value > 0):
            raise ValueError(f"{name}: rope_scaling[{key!r}] must be a finite number > 0, got {value!r}")
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError(f"{name}: rope_scaling needs low_freq_factor < high_freq_factor, got {scaling!r}")


__all__ = ["ATTENTION_KINDS", "KestrelConfig"]
