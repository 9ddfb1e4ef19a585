"""Block-wise 8-bit optimizers: drop-in replacements for bitsandbytes 0.50's (same arguments, numbers and
checkpoint layout), on CPU and CUDA."""

from .adam import Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit
from .optimizer import Optimizer8bit

__all__ = ["Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit", "Optimizer8bit"]
