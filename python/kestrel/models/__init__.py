"""Models that compose kestrel's kernels: KestrelConfig and KestrelLM (spec decoding.md §3)."""

from .config import ATTENTION_KINDS, KestrelConfig
from .lm import KestrelLM

__all__ = ["ATTENTION_KINDS", "KestrelConfig", "KestrelLM"]
