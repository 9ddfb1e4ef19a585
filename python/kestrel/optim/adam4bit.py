"""Adam and AdamW with 4-bit states: the formats of the 4-bit optimizer paper (Li et al., 2023, "Memory Efficient
Optimizers with 4-bit States") as torchao's AdamW4bit implements them, with kestrel's fused step.

Each state is quantized in blocks of 128 elements by the block's absmax: the first moment on the 16-entry signed
dynamic map (3 exponent bits), the second moment on the linear map {1/16, ..., 16/16} without zero, so no element's
second moment rounds to 0 (the zero-point problem of the paper: a second moment stored as 0 would divide the update
by eps). Two codes per byte, the even element in the high nibble. State: 0.5 + 0.5 bytes plus two float32 absmax
per 128 elements, 1.0625 bytes per parameter; tensors below min_4bit_size (4096, as torchao) keep float32 states.

The step is kestrel's Adam (`kestrel/optim.h`; weight decay decoupled after the update, as the 8-bit Adam8bit /
AdamW8bit and bitsandbytes). Adam4bit's weight decay is decoupled too, as Adam8bit's.
"""

from collections import defaultdict

import torch

from ..ops.quantize import create_dynamic_map
from . import distributed as D
from .adam import _Adam
from .optimizer import check_int

BLOCK_4BIT = 128


def _maps():
    signed = torch.unique(create_dynamic_map(True, 3, 4))  # the 16 values, without bnb's padding zeros
    unsigned = torch.linspace(0, 1, 17, dtype=torch.float32)[1:]  # torchao's: no zero
    assert signed.numel() == 16 and unsigned.numel() == 16
    return signed.contiguous(), unsigned.contiguous()


QMAP4_SIGNED, QMAP4_UNSIGNED = _maps()


def blocks4(n):
    return (n + BLOCK_4BIT - 1) // BLOCK_4BIT


def pack4(codes):
    """Codes 0..15 (a flat integer tensor) two per byte, element 2j in the high nibble (an odd count: low nibble 0)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack4(packed, n):
    """The first n codes of a packed state, as int64."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:n].long()


def dequantize4(packed, absmax, qmap, n):
    """A 4-bit state's float32 values (n of them)."""
    codes = unpack4(packed.reshape(-1), n)
    scale = absmax.reshape(-1).repeat_interleave(BLOCK_4BIT)[:n]
    return qmap[codes] * scale


class _Adam4bit(_Adam):
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

    def fill_qmap(self):
        self.name2qmap["dynamic4"] = QMAP4_SIGNED.clone()
        self.name2qmap["linear4"] = QMAP4_UNSIGNED.clone()

    @staticmethod
    def is_4bit(state):
        return "qmap1" in state and state["qmap1"].numel() == 16

    def state_sizes(self, state, n):
        if state["state1"].dtype == torch.uint8:
            return (n + 1) // 2, (n + 1) // 2
        return super().state_sizes(state, n)

    @torch.no_grad()
    def init_state(self, p, config):
        state = self.state[p]
        state["step"] = self.new_step(p)
        self.init_clipping_state(p, config)
        n = D.local(p).numel()
        if not (config["optim_bits"] == 4 and p.numel() >= config["min_8bit_size"]):
            state["state1"] = self.state_zeros(p, torch.float32)
            state["state2"] = self.state_zeros(p, torch.float32)
            return
        if "dynamic4" not in self.name2qmap:
            self.fill_qmap()
        for key in ("dynamic4", "linear4"):
            if self.name2qmap[key].device != p.device:
                self.name2qmap[key] = self.name2qmap[key].to(p.device)
        # zero codes with absmax 0: every value 0
        state["state1"] = torch.zeros(((n + 1) // 2,), dtype=torch.uint8, device=p.device)
        state["qmap1"] = self.name2qmap["dynamic4"]
        state["state2"] = torch.zeros(((n + 1) // 2,), dtype=torch.uint8, device=p.device)
        state["qmap2"] = self.name2qmap["linear4"]
        state["absmax1"] = torch.zeros(blocks4(n), dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros(blocks4(n), dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def update_params(self, items):
        full = [(p, config) for p, config in items if not self.is_4bit(self.state[p])]
        if full:
            super().update_params(full)
        batches = defaultdict(list)
        for p, config in items:
            state = self.state[p]
            if not self.is_4bit(state):
                continue
            step = state["step"] + 1
            scalars = self.step_scalars(config, step, self.gnorm_scale(p, step), self.round_seed_for(p, config))
            lr_tensor = self.lr_of(config)[1]
            batches[(p.device, p.dtype, id(state["qmap1"]), id(state["qmap2"]), scalars, id(lr_tensor))].append(
                (p, lr_tensor)
            )
        for (_, _, _, _, scalars, _), entries in batches.items():
            batch, lr_tensor = [p for p, _ in entries], entries[0][1]
            states = [self.state[p] for p in batch]
            params, grads, write_back = self.local_batch(batch)
            steps = self.steps_of(states) + 1
            torch.ops.kestrel.two_state4bit_step_(
                "adam",
                params,
                grads,
                [s["state1"] for s in states],
                [s["state2"] for s in states],
                [s["absmax1"] for s in states],
                [s["absmax2"] for s in states],
                states[0]["qmap1"],
                states[0]["qmap2"],
                steps,
                lr=scalars.lr,
                beta1=scalars.beta1,
                beta2=scalars.beta2,
                eps=scalars.eps,
                weight_decay=scalars.weight_decay,
                gnorm_scale=scalars.gnorm_scale,
                round_seed=scalars.round_seed,
                lr_tensor=lr_tensor,
            )
            self.write_back(write_back)
            torch._foreach_add_([s["step"] for s in states], 1)

    def _check_param(self, p, index):
        if D.is_dtensor(p):
            name = type(self).__name__
            raise NotImplementedError(
                f"{name}: parameter {index} (shape {tuple(p.shape)}) is a DTensor; 4-bit states under FSDP2 are not "
                "supported yet (use AdamW8bit)"
            )
        super()._check_param(p, index)

    def _check_loaded_state(self, param, state, index, two_states=None):
        if isinstance(state, dict) and torch.is_tensor(state.get("state1")) and state["state1"].dtype == torch.uint8:
            self._check_4bit_state(param, state, index)
            return
        super()._check_loaded_state(param, state, index, two_states)

    def _check_4bit_state(self, param, state, index):
        name = type(self).__name__
        where = f"{name}.load_state_dict: parameter {index} (shape {tuple(param.shape)})"
        n = param.numel()
        for key in ("step", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"):
            if key not in state:
                raise ValueError(f"{where}: a 4-bit state needs {key}, which the state_dict lacks")
        expected = {
            "state1": (torch.uint8, (n + 1) // 2),
            "state2": (torch.uint8, (n + 1) // 2),
            "absmax1": (torch.float32, blocks4(n)),
            "absmax2": (torch.float32, blocks4(n)),
            "qmap1": (torch.float32, 16),
            "qmap2": (torch.float32, 16),
        }
        for key, (dtype, count) in expected.items():
            t = state[key]
            if not torch.is_tensor(t) or t.dtype != dtype or t.numel() != count:
                raise ValueError(
                    f"{where}: {key} must be {dtype} with {count} values (4-bit states of {n} elements), got "
                    f"{getattr(t, 'dtype', type(t).__name__)} with {getattr(t, 'numel', lambda: '?')()}"
                )
        for key in ("qmap1", "qmap2"):
            q = state[key].detach().cpu()
            if not bool(torch.isfinite(q).all()) or not bool((q[1:] >= q[:-1]).all()):
                raise ValueError(f"{where}: {key} must hold 16 finite values in ascending order (a 4-bit map)")


_DOC = """
    Arguments (torchao.optim.AdamW4bit's): params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay={wd},
    amsgrad=False (True raises); keywords min_4bit_size=4096 (smaller tensors keep float32 states), block_size=128
    (the only one), bf16_stochastic_round=False (bf16 parameters round stochastically, unbiased). Weight decay is
    decoupled (p *= 1 - lr * weight_decay after the update). Not yet: FSDP2 (DTensor) parameters, capturable.
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
