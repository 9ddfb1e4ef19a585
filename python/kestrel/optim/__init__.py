"""Block-wise 8-bit optimizers: drop-in replacements for bitsandbytes 0.50's (same arguments, numbers and
checkpoint layout), on CPU and CUDA."""

from .adam import (Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit,
                   PagedAdamW, PagedAdamW8bit, PagedAdamW32bit)
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit
from .lamb import LAMB, LAMB8bit, LAMB32bit
from .one_state import (LARS, SGD, SGD8bit, SGD32bit, Adagrad, Adagrad8bit, Adagrad32bit, LARS8bit, LARS32bit, Lion,
                        Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit, RMSprop, RMSprop8bit,
                        RMSprop32bit)
from .manager import GlobalOptimManager
from .optimizer import Optimizer8bit

__all__ = ["Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit", "AdEMAMix", "AdEMAMix8bit",
           "AdEMAMix32bit", "SGD", "SGD8bit", "SGD32bit",
           "RMSprop", "RMSprop8bit", "RMSprop32bit", "Adagrad", "Adagrad8bit", "Adagrad32bit", "Lion", "Lion8bit",
           "Lion32bit", "LAMB", "LAMB8bit", "LAMB32bit", "LARS", "LARS8bit", "LARS32bit", "PagedAdam", "PagedAdam8bit",
           "PagedAdam32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
           "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit",
           "GlobalOptimManager", "Optimizer8bit"]
