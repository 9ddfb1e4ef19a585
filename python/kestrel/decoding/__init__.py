"""Speculative decoding: draft trees (tree.py); the KV cache (cache.py); generate() with plain or tree
speculative decoding (generate.py, speculative.py)."""

from .cache import KVCache
from .generate import GenerationStats, TreeSpec, generate
from .tree import StaticTree, TreeBuffers, build_tree, dynamic_tree, static_tree

__all__ = [
    "GenerationStats",
    "KVCache",
    "StaticTree",
    "TreeBuffers",
    "TreeSpec",
    "build_tree",
    "dynamic_tree",
    "generate",
    "static_tree",
]
