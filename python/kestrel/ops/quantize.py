"""Block-wise dynamic quantization (spec: optim8bit.md, "The numeric format").

`quantize_blockwise` splits the flattened input into blocks of `blocksize` elements, stores each block's absmax as
float32 and each element as the uint8 index of the nearest value of a 256-entry map to x/absmax (exact nearest
rounding: a value on a float32 midpoint takes the lower index). `dequantize_blockwise` returns map[code] * absmax.
The map values and dequantized values equal bitsandbytes 0.50.2's bit for bit.
"""

import torch

from .. import _ext

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 64, 4096


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """The dynamic quantization map of Dettmers et al.: 2**total_bits sorted float32 values in [-1, 1].

    For each exponent i < max_exponent_bits the fraction boundaries linspace(0.1, 1, n_i) (float32) give midpoints
    scaled by 10**(i - max_exponent_bits + 1) (and their negatives for a signed map); 0 and 1 complete the map.
    """
    if not 1 <= max_exponent_bits <= total_bits - 1:
        raise ValueError(
            f"create_dynamic_map: max_exponent_bits must be in [1, total_bits - 1] = [1, {total_bits - 1}], "
            f"got {max_exponent_bits}"
        )
    if not 2 <= total_bits <= 8:
        raise ValueError(f"create_dynamic_map: total_bits must be in [2, 8], got {total_bits}")
    magnitude_bits = total_bits - 1
    values = []
    for i in range(max_exponent_bits):
        exponent_offset = i + magnitude_bits - max_exponent_bits
        count = 2 ** exponent_offset + 1 if signed else 2 ** (exponent_offset + 1) + 1
        scale = 10 ** (i - max_exponent_bits + 1)
        values += _scaled_midpoints(count, scale, signed)
    linear_items = 2 ** (magnitude_bits - max_exponent_bits) - 1
    if linear_items > 0:
        # Codes whose exponent bits are all zero and carry no indicator bit: they extend the largest decade.
        values += _scaled_midpoints(linear_items + 1, 1, signed)
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise ValueError(
            f"create_dynamic_map: signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits} "
            f"gives {len(values)} values, not 2**total_bits = {2 ** total_bits}"
        )
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _scaled_midpoints(count, scale, signed):
    # float32 arithmetic throughout, so the values equal bitsandbytes' bit for bit.
    boundaries = torch.linspace(0.1, 1, count, dtype=torch.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    out = (scale * means).tolist()
    if signed:
        out += (-scale * means).tolist()
    return out


# The default maps, built once (bnb's optimizers use the signed one for first moments, the unsigned for second).
DYNAMIC_MAP_SIGNED = create_dynamic_map(signed=True)
DYNAMIC_MAP_UNSIGNED = create_dynamic_map(signed=False)


def _check_blocksize(op, blocksize):
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or not MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
            or blocksize & (blocksize - 1)):
        raise ValueError(f"{op}: blocksize must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize!r}")


def _check_float_dtype(op, name, dtype):
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {dtype}")


def _resolve_code(op, code, device):
    if code is None:
        return DYNAMIC_MAP_SIGNED.to(device)
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"{op}: code must be a torch.Tensor of 256 float32 values, got {type(code).__name__}")
    if code.dtype != torch.float32:
        raise TypeError(f"{op}: code must be float32, got {code.dtype}")
    if code.dim() != 1 or code.numel() != 256:
        raise ValueError(f"{op}: code must have shape (256,), got {tuple(code.shape)}")
    return code.to(device)


def _num_blocks(n, blocksize):
    return (n + blocksize - 1) // blocksize


def quantize_blockwise(x, code=None, blocksize=256):
    """Quantize `x` block-wise to uint8 codes of the (sorted) map `code` (default: the signed dynamic map).

    Returns (codes, absmax): codes has x's shape, absmax is float32 of shape (ceil(x.numel() / blocksize),).
    """
    op = "quantize_blockwise"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    _check_float_dtype(op, "x", x.dtype)
    _check_blocksize(op, blocksize)
    code = _resolve_code(op, code, x.device)
    _ext.require(op, x.device)
    return torch.ops.kestrel.quantize_blockwise(x, code, blocksize)


def dequantize_blockwise(codes, absmax, code=None, blocksize=256, dtype=torch.float32):
    """code[codes] * absmax[block], rounded to `dtype`; the inverse of quantize_blockwise up to its rounding."""
    op = "dequantize_blockwise"
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{op}: codes must be a uint8 tensor, got {got}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        got = absmax.dtype if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise TypeError(f"{op}: absmax must be a float32 tensor, got {got}")
    _check_blocksize(op, blocksize)
    _check_float_dtype(op, "dtype", dtype)
    expected = _num_blocks(codes.numel(), blocksize)
    if absmax.numel() != expected:
        raise ValueError(
            f"{op}: absmax must hold ceil({codes.numel()} / {blocksize}) = {expected} values for codes of shape "
            f"{tuple(codes.shape)}, got {absmax.numel()}"
        )
    if absmax.device != codes.device:
        raise ValueError(f"{op}: absmax must be on the device of codes ({codes.device}), got {absmax.device}")
    code = _resolve_code(op, code, codes.device)
    _ext.require(op, codes.device)
    return torch.ops.kestrel.dequantize_blockwise(codes, absmax, code, blocksize, dtype)


if _ext.available():

    @torch.library.register_fake("kestrel::quantize_blockwise")
    def _quantize_blockwise_fake(x, code, blocksize):
        torch._check(code.numel() == 256, lambda: f"quantize_blockwise: code must have 256 values, got {code.numel()}")
        absmax = x.new_empty((_num_blocks(x.numel(), blocksize),), dtype=torch.float32)
        return x.new_empty(x.shape, dtype=torch.uint8), absmax

    @torch.library.register_fake("kestrel::dequantize_blockwise")
    def _dequantize_blockwise_fake(codes, absmax, code, blocksize, dtype):
        torch._check(absmax.numel() == _num_blocks(codes.numel(), blocksize),
                     lambda: "dequantize_blockwise: absmax does not match codes")
        return codes.new_empty(codes.shape, dtype=dtype)
