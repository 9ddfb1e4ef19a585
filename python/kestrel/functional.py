"""bitsandbytes-style functional API: `bitsandbytes.functional` users find the same names, signatures, defaults and
return types here (bitsandbytes 0.50).

- `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`
- `quantize_blockwise(A, code=None, absmax=None, out=None, blocksize=4096, nested=False)` -> `(codes, QuantState)`
- `dequantize_blockwise(A, quant_state=None, absmax=None, code=None, out=None, blocksize=4096, nested=False)`
- `QuantState` (absmax, shape, code, blocksize, quant_type, dtype, offset, state2; nested; as_dict / from_dict / to)

The kernels are kestrel's (`torch.ops.kestrel.*`; `kestrel.ops` has the lower-level `(codes, absmax)` forms).
Unlike bitsandbytes, every argument is checked before anything is written, and a bad one raises an error naming
it, the expected and the given value (bnb's own exception types: ValueError for values, TypeError for a
non-tensor); `out=` / `absmax=` buffers must already have the result's dtype and size (bnb copies into whatever it
is given). See README.md, "Block-wise quantization", for the deliberate differences.
"""

import json

import torch

from . import _ext
from .ops.quantize import (
    FLOAT_DTYPES,
    check_blocksize,
    check_code,
    check_tensor,
    create_dynamic_map,
    default_map,
    resolve_code,
)

__all__ = ["QuantState", "create_dynamic_map", "quantize_blockwise", "dequantize_blockwise"]


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


class QuantState:
    """The state that undoes a block-wise quantization (bitsandbytes' QuantState, the block-wise part).

    absmax: float32 per block (nested: the uint8 codes of absmax - offset, quantized with state2); code: the map;
    blocksize; dtype: the input's dtype (dequantize's output dtype); offset and state2: the nested quantization
    of absmax (state2 is itself a QuantState); nested: state2 is not None. shape and quant_type are carried for
    bitsandbytes' 4-bit layout (quantize_blockwise leaves them None, as bnb does).
    """

    valid_quant_types = ("fp4", "nf4")
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in valid_quant_types]
    valid_qs_keys = [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]

    def __init__(
        self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None, state2=None
    ):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getitem__(self, idx):
        """The older list layout: [absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    def as_dict(self, packed=False):
        """Tensors and plain values for a state_dict (bnb's keys). packed: the non-tensor items go into one uint8
        tensor under "quant_state.bitsandbytes__<quant_type>" (only when quant_type is set, as in bnb)."""
        qs_dict = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs_dict.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset),
                }
            )
        if not packed or self.quant_type is None:
            return qs_dict
        tensors = {k: v for k, v in qs_dict.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in qs_dict.items() if not isinstance(v, torch.Tensor)}
        tensors["quant_state.bitsandbytes__" + self.quant_type] = torch.tensor(
            list(json.dumps(rest).encode("utf-8")), dtype=torch.uint8
        )
        return tensors

    @classmethod
    def from_dict(cls, qs_dict, device):
        """The inverse of as_dict (packed or not; keys may carry a prefix such as "weight.")."""
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in qs_dict:
            if not packed_keys:
                raise ValueError("QuantState.from_dict: expected packed or unpacked quant_state items, found neither")
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"QuantState.from_dict: expected exactly one `quant_state` item ending in one of "
                    f"{cls.valid_qs_type_keys}, got {packed_keys}"
                )
        if len(packed_keys) == 1:
            qs_dict.update(json.loads(bytes(qs_dict.pop(packed_keys[0]).tolist()).decode("utf-8")))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = sorted(set(qs_dict) - set(cls.valid_qs_keys))
        if unknown:
            raise ValueError(f"QuantState.from_dict: unknown keys {unknown} (known: {cls.valid_qs_keys})")
        required = ["absmax", "quant_map", "blocksize", "dtype"]
        if "nested_absmax" in qs_dict:
            required += ["nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset"]
        missing = [k for k in required if k not in qs_dict]
        if missing:
            raise ValueError(f"QuantState.from_dict: missing keys {missing}")
        offset = state2 = None
        if "nested_absmax" in qs_dict:
            offset = torch.tensor(float(qs_dict["nested_offset"])).to(device)
            state2 = cls(
                absmax=qs_dict["nested_absmax"].to(device),
                blocksize=qs_dict["nested_blocksize"],
                code=qs_dict["nested_quant_map"].to(device),
                dtype=getattr(torch, qs_dict["nested_dtype"]),
            )
        shape = qs_dict.get("shape")
        return cls(
            quant_type=qs_dict.get("quant_type"),
            absmax=qs_dict["absmax"].to(device),
            blocksize=qs_dict["blocksize"],
            code=qs_dict["quant_map"].to(device),
            dtype=getattr(torch, qs_dict["dtype"]),
            shape=torch.Size(shape) if shape is not None else None,
            offset=offset,
            state2=state2,
        )

    def to(self, device):
        """Moves the state's tensors to `device` in place (returns None, as bnb's does)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)

    def __eq__(self, other):
        if not isinstance(other, QuantState):
            return False
        return (
            torch.allclose(self.absmax, other.absmax, atol=1e-6)
            and self.shape == other.shape
            and torch.allclose(self.code, other.code, atol=1e-6)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and (
                self.offset == other.offset
                if self.offset is not None and other.offset is not None
                else self.offset is other.offset
            )
            and (
                self.state2 == other.state2
                if self.state2 is not None and other.state2 is not None
                else self.state2 is other.state2
            )
        )

    __hash__ = None

    def __repr__(self):
        absmax = tuple(self.absmax.shape) if isinstance(self.absmax, torch.Tensor) else self.absmax
        return f"QuantState(blocksize={self.blocksize}, dtype={self.dtype}, absmax={absmax}, nested={self.nested})"


def _check_bool(op, name, value):
    if value not in (True, False):
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    return bool(value)


def _check_buffer(op, name, buffer, dtype, device, shape=None, numel=None, numel_desc=None):
    check_tensor(op, name, buffer)
    if buffer.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {buffer.dtype}")
    if buffer.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {buffer.device}")
    if shape is not None and buffer.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(buffer.shape)}")
    if numel is not None and buffer.numel() != numel:
        raise ValueError(
            f"{op}: {name} must hold {numel_desc or numel} values, got {buffer.numel()} (shape {tuple(buffer.shape)})"
        )


def _num_blocks(n, blocksize):
    return (n + blocksize - 1) // blocksize


def _block_mean(absmax):
    """absmax.mean() as bnb takes it (float32); where that overflows (values near the float32 maximum), the mean
    in float64, rounded to float32 (finite, since it is at most the largest absmax)."""
    mean = absmax.mean()
    return torch.where(torch.isfinite(mean), mean, absmax.double().mean().float())


def quantize_blockwise(A, code=None, absmax=None, out=None, blocksize=4096, nested=False):
    """Quantize A in blocks of `blocksize` values to uint8 codes of the map `code` (default: the signed dynamic map).

    Returns (codes, QuantState). `out` (uint8, A's shape) receives the codes and is returned; `absmax` receives the
    state's absmax (float32, one per block; nested: uint8, the quantized absmax) and becomes state.absmax. nested:
    absmax - mean(absmax) is itself quantized with the signed dynamic map in blocks of `blocksize` (state.state2,
    state.offset). Any positive blocksize; inf/NaN elements: see README.md.
    """
    op = "quantize_blockwise"
    check_tensor(op, "A", A)
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: A must be float32, float16 or bfloat16, got {A.dtype}")
    blocksize = check_blocksize(op, blocksize)
    nested = _check_bool(op, "nested", nested)
    code = resolve_code(op, code, A.device, error=ValueError)
    blocks = _num_blocks(A.numel(), blocksize)
    if out is not None:
        _check_buffer(op, "out", out, torch.uint8, A.device, shape=A.shape)
    if absmax is not None:
        _check_buffer(
            op,
            "absmax",
            absmax,
            torch.uint8 if nested else torch.float32,
            A.device,
            numel=blocks,
            numel_desc=f"ceil({A.numel()} / {blocksize}) = {blocks}",
        )
    _ext.require(op, A.device)

    codes, block_absmax = torch.ops.kestrel.quantize_blockwise(A, code, blocksize)
    if nested:
        offset = _block_mean(block_absmax)
        nested_codes, nested_absmax = torch.ops.kestrel.quantize_blockwise(
            block_absmax - offset, default_map(A.device), blocksize
        )
        state2 = QuantState(
            absmax=nested_absmax, code=default_map(A.device).clone(), blocksize=blocksize, dtype=torch.float32
        )
        state = QuantState(
            absmax=nested_codes, code=code.clone(), blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2
        )
    else:
        state = QuantState(absmax=block_absmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        codes = out.copy_(codes)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax.view(absmax.shape))
    return codes, state


def _check_state(op, name, state, A):
    """The parts of a QuantState (kestrel's or bitsandbytes') that dequantizing A reads, checked before any work."""
    if isinstance(state, torch.Tensor):
        raise TypeError(
            f"{op}: {name} must be a QuantState (as quantize_blockwise returns), got a Tensor; "
            f"pass a bare absmax tensor as absmax="
        )
    missing = [k for k in ("absmax", "code", "blocksize", "dtype") if not hasattr(state, k)]
    if missing:
        raise TypeError(f"{op}: {name} must be a QuantState, got {type(state).__name__} (no {', '.join(missing)})")
    blocksize = check_blocksize(f"{op}: {name}", state.blocksize)
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name}.dtype must be float32, float16 or bfloat16, got {state.dtype}")
    check_code(f"{op}: {name}", state.code, error=ValueError)
    blocks = _num_blocks(A.numel(), blocksize)
    desc = f"ceil({A.numel()} / {blocksize}) = {blocks}"
    nested = bool(getattr(state, "nested", False))
    if nested:
        _check_buffer(op, f"{name}.absmax", state.absmax, torch.uint8, A.device, numel=blocks, numel_desc=desc)
        if getattr(state, "offset", None) is None:
            raise ValueError(f"{op}: {name} is nested but its offset is None")
        _check_state(op, f"{name}.state2", state.state2, state.absmax)
    else:
        _check_buffer(op, f"{name}.absmax", state.absmax, torch.float32, A.device, numel=blocks, numel_desc=desc)
    return blocksize, nested


def _dequantize(A, state, blocksize, nested):
    absmax = state.absmax
    if nested:
        state2 = state.state2
        absmax = _dequantize(state.absmax, state2, int(state2.blocksize), bool(getattr(state2, "nested", False)))
        absmax += state.offset
        absmax = absmax.float()
    return torch.ops.kestrel.dequantize_blockwise(
        A, absmax.reshape(-1), state.code.to(A.device), blocksize, state.dtype
    )


def dequantize_blockwise(A, quant_state=None, absmax=None, code=None, out=None, blocksize=4096, nested=False):
    """code[A] * absmax[block], in quant_state.dtype: the inverse of quantize_blockwise up to its rounding.

    With quant_state, its absmax/code/blocksize/dtype are used and the absmax, code and blocksize arguments are
    ignored (as in bnb); without it, absmax (float32, one per block) is required, code defaults to the signed
    dynamic map and the output is float32. `nested` is ignored (the state says), as in bnb. `out` (A's shape, the
    output dtype) receives the result and is returned. A bitsandbytes QuantState is accepted too.
    """
    op = "dequantize_blockwise"
    if quant_state is None and absmax is None:
        raise ValueError(f"{op}: needs quant_state or absmax, got neither")
    check_tensor(op, "A", A)
    if A.dtype != torch.uint8:
        raise ValueError(f"{op}: A must be uint8, got {A.dtype}")
    if quant_state is None:
        check_tensor(op, "absmax", absmax)
        blocksize = check_blocksize(op, blocksize)
        code = resolve_code(op, code, A.device, error=ValueError, sorted_map=False)
        blocks = _num_blocks(A.numel(), blocksize)
        _check_buffer(
            op,
            "absmax",
            absmax,
            torch.float32,
            A.device,
            numel=blocks,
            numel_desc=f"ceil({A.numel()} / {blocksize}) = {blocks}",
        )
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
        nested = False
    else:
        blocksize, nested = _check_state(op, "quant_state", quant_state, A)
    if out is not None:
        _check_buffer(op, "out", out, quant_state.dtype, A.device, shape=A.shape)
    _ext.require(op, A.device)
    result = _dequantize(A, quant_state, blocksize, nested)
    return out.copy_(result) if out is not None else result
