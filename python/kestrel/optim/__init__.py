"""Block-wise 8-bit optimizers: drop-in replacements for bitsandbytes 0.50's (same arguments, numbers and
checkpoint layout), on CPU and CUDA."""

from .adam import Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit
from .one_state import (SGD, SGD8bit, SGD32bit, Adagrad, Adagrad8bit, Adagrad32bit, Lion, Lion8bit, Lion32bit,
                        RMSprop, RMSprop8bit, RMSprop32bit)
from .manager import GlobalOptimManager
from .optimizer import Optimizer8bit

__all__ = ["Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit", "AdEMAMix", "AdEMAMix8bit",
           "AdEMAMix32bit", "SGD", "SGD8bit", "SGD32bit",
           "RMSprop", "RMSprop8bit", "RMSprop32bit", "Adagrad", "Adagrad8bit", "Adagrad32bit", "Lion", "Lion8bit",
           "Lion32bit", "GlobalOptimManager", "Optimizer8bit"]
