"""Modules: StableEmbedding (bnb's), and the kernel-backed layers of later families."""

from .attention import SoftplusAttention
from .embedding import StableEmbedding

__all__ = ["SoftplusAttention", "StableEmbedding"]
