"""4-bit optimizer states for Adam and AdamW (AdamW4bit, Adam4bit, and Adam / AdamW with optim_bits=4): the formats of
the 4-bit optimizer paper (Li et al., 2023, "Memory Efficient Optimizers with 4-bit States") as torchao's AdamW4bit
implements them, with kestrel's fused step.

Each state is quantized in blocks of 128 elements by the block's absmax: the first moment on the 16-entry signed
dynamic map (3 exponent bits), the second moment on the linear map {1/16, ..., 16/16} without zero, so no element's
second moment rounds to 0 (the zero-point problem of the paper: a second moment stored as 0 would divide the update
by eps). Two codes per byte, the even element in the high nibble. State: 0.5 + 0.5 bytes plus two float32 absmax
per 128 elements, 1.0625 bytes per parameter; tensors below min_4bit_size (min_8bit_size for Adam / AdamW; 4096, as
torchao) keep float32 states.

The step is kestrel's Adam (`kestrel/optim.h`; weight decay decoupled after the update, as the 8-bit Adam8bit /
AdamW8bit and bitsandbytes). Adam4bit's weight decay is decoupled too, as Adam8bit's.
"""

from collections import defaultdict

import torch

from ..ops.quantize import create_dynamic_map
from . import distributed as D

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


def quantize4(values, qmap):
    """(packed codes, absmax) of flat float32 values, as the kernels requantize a state: absmax per 128 elements,
    v = value / absmax (0 for an all-zero block), the count of the map's midpoints below v."""
    values = values.reshape(-1).float()
    n = values.numel()
    padded = torch.zeros(blocks4(n) * BLOCK_4BIT, dtype=torch.float32, device=values.device)
    padded[:n] = values
    absmax = padded.view(-1, BLOCK_4BIT).abs().amax(dim=1)
    scale = absmax.repeat_interleave(BLOCK_4BIT)[:n]
    v = torch.where(scale > 0, values / scale, torch.zeros_like(values))
    midpoints = ((qmap[:-1] + qmap[1:]) * 0.5).contiguous()
    return pack4(torch.searchsorted(midpoints, v.contiguous(), right=False)), absmax


class FourBitAdam:
    """The 4-bit states of Adam / AdamW (optim_bits=4), mixed into kestrel.optim's Adam classes before _Adam: a
    parameter whose config has optim_bits 4 and min_8bit_size elements or more keeps 4-bit states; everything else
    (8-bit, 32-bit) is _Adam's."""

    def fill_qmap(self):
        super().fill_qmap()
        self.name2qmap["dynamic4"] = QMAP4_SIGNED.clone()
        self.name2qmap["linear4"] = QMAP4_UNSIGNED.clone()

    @staticmethod
    def is_4bit(state):
        return "qmap1" in state and state["qmap1"].numel() == 16

    def state_sizes(self, state, n):
        if self.is_4bit(state):
            return (n + 1) // 2, (n + 1) // 2
        return super().state_sizes(state, n)

    @torch.no_grad()
    def init_state(self, p, config):
        if not (config["optim_bits"] == 4 and p.numel() >= config["min_8bit_size"]):
            return super().init_state(p, config)
        state = self.state[p]
        state["step"] = self.new_step(p)
        self.init_clipping_state(p, config)
        n = D.local(p).numel()
        if "dynamic4" not in self.name2qmap:
            self.fill_qmap()
        for key in ("dynamic4", "linear4"):
            if self.name2qmap[key].device != p.device:
                self.name2qmap[key] = self.name2qmap[key].to(p.device)
        # zero codes with absmax 0: every value 0
        state["state1"] = self.state_zeros(p, torch.uint8, ((n + 1) // 2,))  # paged: in CUDA managed memory
        state["qmap1"] = self.name2qmap["dynamic4"]
        state["state2"] = self.state_zeros(p, torch.uint8, ((n + 1) // 2,))
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
            self.prefetch(batch[0], [s["state1"] for s in states] + [s["state2"] for s in states])
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

    # ----------------------------------------------------------------------------------------- sharded parameters
    # FSDP2 (Shard(0) DTensors): the kernel steps each rank's local shard, its own 128-element blocks; where every
    # shard starts at a multiple of 128 elements these are the full tensor's blocks (bit-identical to one process).
    # Checkpoints hold the full tensor's packed codes and absmax, replicated (the same at every world size): aligned
    # shards convert both ways exactly, unaligned ones requantize across the shard boundary.
    def _export_sharded(self, p, state):
        if not self.is_4bit(state):
            return super()._export_sharded(p, state)
        info, n_local = self.shard(p), D.local(p).numel()
        aligned = all(start % BLOCK_4BIT == 0 for start, _ in info.ranges)
        out = dict(state)
        for key in ("1", "2"):
            codes, absmax, qmap = state["state" + key], state["absmax" + key], state["qmap" + key]
            if aligned:
                full_codes = D._gather_flat(codes, info, [(end - start + 1) // 2 for start, end in info.ranges])
                full_absmax = D._gather_flat(absmax, info, [blocks4(end - start) for start, end in info.ranges])
            else:
                values = dequantize4(codes, absmax, qmap, n_local)
                full = D._gather_flat(values, info, [end - start for start, end in info.ranges])
                full_codes, full_absmax = quantize4(full, qmap)
            out["state" + key] = D.as_replicated(full_codes, info)
            out["absmax" + key] = D.as_replicated(full_absmax, info)
        return out

    def _import_sharded(self, p, state):
        first = state.get("state1")
        first = first.to_local() if D.is_dtensor(first) else first
        if not (torch.is_tensor(first) and first.dtype == torch.uint8 and torch.is_tensor(state.get("qmap1"))):
            return super()._import_sharded(p, state)
        if state["qmap1"].numel() != 16:
            return super()._import_sharded(p, state)
        info, n_local = self.shard(p), D.local(p).numel()
        start = info.offset
        out = dict(state)
        for key in ("1", "2"):
            codes, absmax = state["state" + key], state["absmax" + key]
            codes = (codes.to_local() if D.is_dtensor(codes) else codes).reshape(-1)
            absmax = (absmax.to_local() if D.is_dtensor(absmax) else absmax).reshape(-1).float()
            qmap = state["qmap" + key].to(codes.device)
            if codes.numel() != (info.numel + 1) // 2 or absmax.numel() != blocks4(info.numel):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state{key} / absmax{key} of a sharded parameter must hold "
                    f"the full tensor's {(info.numel + 1) // 2} bytes and {blocks4(info.numel)} values, got "
                    f"{codes.numel()} and {absmax.numel()}"
                )
            if start % BLOCK_4BIT == 0:  # this shard's codes and absmax are a slice of the full tensor's
                local_codes = codes[start // 2 : start // 2 + (n_local + 1) // 2].clone()
                if n_local % 2:  # the element after an odd shard belongs to the next one
                    local_codes[-1] &= 0xF0
                b = start // BLOCK_4BIT
                local_absmax = absmax[b : b + blocks4(n_local)].clone()
            else:
                values = dequantize4(codes, absmax, qmap, info.numel)[start : start + n_local]
                local_codes, local_absmax = quantize4(values, qmap)
            out["state" + key], out["absmax" + key] = local_codes.contiguous(), local_absmax.contiguous()
        return out

    def _check_loaded_state(self, param, state, index, two_states=None):
        """A 4-bit state (uint8 state1 with a 16-entry qmap1) by its sizes; an 8-bit one only where this optimizer
        takes 8-bit states (AdamW4bit does not); anything else as _Adam checks it."""
        first = state.get("state1") if isinstance(state, dict) else None
        uint8 = torch.is_tensor(first) and first.dtype == torch.uint8
        qmap = state.get("qmap1") if isinstance(state, dict) else None
        if uint8 and (8 not in self.supported_bits or (torch.is_tensor(qmap) and qmap.numel() == 16)):
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
