"""Speculative decoding: draft trees (tree.py)."""

from .tree import StaticTree, TreeBuffers, build_tree, dynamic_tree, static_tree

__all__ = ["StaticTree", "TreeBuffers", "build_tree", "dynamic_tree", "static_tree"]
