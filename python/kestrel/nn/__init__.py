"""Modules: StableEmbedding (bnb's), and the kernel-backed layers of later families."""

from .embedding import StableEmbedding

__all__ = ["StableEmbedding"]
