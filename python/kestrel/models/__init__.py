"""Models that compose kestrel's kernels: KestrelConfig and KestrelLM (docs/models_and_decoding.md)."""

from .config import ATTENTION_KINDS, KestrelConfig
from .lm import KestrelLM

__all__ = ["ATTENTION_KINDS", "KestrelConfig", "KestrelLM"]
