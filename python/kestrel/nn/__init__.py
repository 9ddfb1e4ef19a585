"""Modules: StableEmbedding (bnb's), and the kernel-backed layers of later families."""

from .attention import SoftplusAttention
from .codebook import CodebookLayer
from .embedding import StableEmbedding
from .kv_bottleneck import DiscreteKeyValueBottleneck
from .plga import PLGACache, PowerLawGraphAttention

__all__ = ["CodebookLayer", "DiscreteKeyValueBottleneck", "PLGACache", "PowerLawGraphAttention", "SoftplusAttention",
           "StableEmbedding"]
