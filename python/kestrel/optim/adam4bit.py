"""Adam and AdamW with 4-bit states (AdamW4bit, Adam4bit: torchao's argument names): the formats of the 4-bit
optimizer paper (Li et al., 2023) as torchao's AdamW4bit implements them, with kestrel's fused step. The formats,
kernels and checkpoint layout: kestrel.optim.four_bit, docs/optim8bit.md "4-bit states". AdamW / Adam with
optim_bits=4 keep the same states."""

from .adam import _Adam
from .four_bit import (  # noqa: F401  (re-exported: the 4-bit maps and codecs)
    BLOCK_4BIT,
    QMAP4_SIGNED,
    QMAP4_UNSIGNED,
    FourBitAdam,
    blocks4,
    dequantize4,
    pack4,
    quantize4,
    unpack4,
)
from .optimizer import check_int


class _Adam4bit(FourBitAdam, _Adam):
    supported_bits = (4, 32)

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        min_4bit_size=4096,
        bf16_stochastic_round=False,
        block_size=BLOCK_4BIT,
    ):
        name = type(self).__name__
        check_int(name, "min_4bit_size", min_4bit_size)
        if block_size != BLOCK_4BIT:
            raise ValueError(f"{name}: block_size must be {BLOCK_4BIT} (the 4-bit kernels' block), got {block_size!r}")
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            optim_bits=4,
            min_8bit_size=min_4bit_size,
            bf16_stochastic_round=bf16_stochastic_round,
        )


_DOC = """
    Arguments (torchao.optim.AdamW4bit's): params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay={wd},
    amsgrad=False (True raises); keywords min_4bit_size=4096 (smaller tensors keep float32 states), block_size=128
    (the only one), bf16_stochastic_round=False (bf16 parameters round stochastically, unbiased). Weight decay is
    decoupled (p *= 1 - lr * weight_decay after the update). FSDP2 (Shard(0) DTensor parameters) and
    torch.distributed.checkpoint work as for AdamW8bit. Not yet: capturable.
"""


class AdamW4bit(_Adam4bit):
    __doc__ = "AdamW with 4-bit states (block 128, torchao's formats; 1.06 bytes per parameter)." + _DOC.format(wd=1e-2)


class Adam4bit(_Adam4bit):
    __doc__ = "Adam with 4-bit states (block 128, torchao's formats), weight decay decoupled." + _DOC.format(wd=0)

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        *,
        min_4bit_size=4096,
        bf16_stochastic_round=False,
        block_size=BLOCK_4BIT,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            min_4bit_size=min_4bit_size,
            bf16_stochastic_round=bf16_stochastic_round,
            block_size=block_size,
        )
