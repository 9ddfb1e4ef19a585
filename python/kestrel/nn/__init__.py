"""Modules: StableEmbedding (bnb's), the kernel-backed layers, and the attention cores KestrelLM composes."""

from .attention import AttentionContext, PowerLawGraphCore, SoftmaxCore, SoftplusAttention, SoftplusCore
from .codebook import CodebookLayer
from .embedding import StableEmbedding
from .kv_bottleneck import DiscreteKeyValueBottleneck
from .plga import PLGACache, PowerLawGraphAttention
from .rope import apply_rope, rope_tables

__all__ = [
    "AttentionContext",
    "CodebookLayer",
    "DiscreteKeyValueBottleneck",
    "PLGACache",
    "PowerLawGraphAttention",
    "PowerLawGraphCore",
    "SoftmaxCore",
    "SoftplusAttention",
    "SoftplusCore",
    "StableEmbedding",
    "apply_rope",
    "rope_tables",
]
