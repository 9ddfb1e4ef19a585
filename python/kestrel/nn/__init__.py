"""Modules: StableEmbedding (bnb's), and the kernel-backed layers of later families."""

from .attention import SoftplusAttention
from .embedding import StableEmbedding
from .plga import PLGACache, PowerLawGraphAttention

__all__ = ["PLGACache", "PowerLawGraphAttention", "SoftplusAttention", "StableEmbedding"]
