"""Block-wise dynamic quantization (docs/optim8bit.md, "The numeric format").

`quantize_blockwise` splits the flattened input into blocks of `blocksize` elements, stores each block's absmax as
float32 and each element as the uint8 index of the nearest value of a 256-entry map to x/absmax (exact nearest
rounding: a value on a float32 midpoint takes the lower index). `dequantize_blockwise` returns map[code] * absmax.
The map values and dequantized values equal bitsandbytes 0.50.2's bit for bit. Any positive blocksize.

Non-finite input: a block's absmax is over its finite elements; +inf / -inf take the map's last / first code
(decoded: +absmax and code[0] * absmax), NaN the code of 0 (decoded: 0); the finite elements are unaffected.
These are kestrel's own (lower-level) ops, returning (codes, absmax); kestrel.functional has bnb's signatures.
"""

import numbers
import weakref

import torch

from .. import _ext

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_MAP_BITS = 16  # create_dynamic_map builds at most 2**16 values (bitsandbytes has no limit)
_INT64_MAX = 2**63 - 1


def _int_arg(op, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an integer, got {value!r}")
    return int(value)


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """The dynamic quantization map of Dettmers et al.: 2**total_bits sorted float32 values in [-1, 1], padded with
    zeros to 256 when fewer (bitsandbytes 0.50's values bit for bit, for every argument it accepts).

    For each exponent i < max_exponent_bits with e = i + total_bits - 1 - max_exponent_bits (+1 unsigned) >= 0, the
    2**e midpoints of the fraction boundaries linspace(0.1, 1, 2**e + 1) (float32) scaled by
    10**(i - max_exponent_bits + 1) (and their negatives for a signed map); when max_exponent_bits < total_bits - 1,
    2**(total_bits - 1 - max_exponent_bits) - 1 further linear midpoints in the top decade; then 0 and 1. The count
    must come to 2**total_bits (a signed map takes any max_exponent_bits >= 1, an unsigned one only
    total_bits - 1; total_bits 1 also takes max_exponent_bits 0), else ValueError.
    """
    op = "create_dynamic_map"
    if signed not in (True, False):
        raise TypeError(f"{op}: signed must be a bool, got {signed!r}")
    signed = bool(signed)
    max_exponent_bits = _int_arg(op, "max_exponent_bits", max_exponent_bits)
    total_bits = _int_arg(op, "total_bits", total_bits)
    if not 1 <= total_bits <= MAX_MAP_BITS:
        raise ValueError(f"{op}: total_bits must be in [1, {MAX_MAP_BITS}], got {total_bits}")
    if max_exponent_bits < 0:
        raise ValueError(f"{op}: max_exponent_bits must be >= 0, got {max_exponent_bits}")
    magnitude_bits = total_bits - 1
    sign_offset = 0 if signed else 1  # an unsigned map spends the sign bit on the fraction
    linear_bits = magnitude_bits - max_exponent_bits
    if linear_bits > 0 and max_exponent_bits == 0:
        raise ValueError(
            f"{op}: max_exponent_bits must be >= 1 for total_bits={total_bits} (the linear codes extend the largest "
            f"exponent's decade, and there is none), got 0"
        )
    values = []
    # Exponents with e < 0 hold no fraction value (linspace of one point), so the loop starts where e = 0.
    for i in range(max(0, max_exponent_bits - magnitude_bits - sign_offset), max_exponent_bits):
        e = i + magnitude_bits - max_exponent_bits + sign_offset
        values += _scaled_midpoints(2**e + 1, 10 ** (i - max_exponent_bits + 1), signed)
    if linear_bits > 0:
        # Codes whose exponent bits are all zero and carry no indicator bit: they extend the largest decade.
        values += _scaled_midpoints(2**linear_bits, 1, signed)
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"{op}: signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits} gives "
            f"{len(values)} values, not 2**total_bits = {2**total_bits}"
            + ("" if signed else f" (an unsigned map needs max_exponent_bits = total_bits - 1 = {magnitude_bits})")
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
_DEFAULT_MAPS = {}  # device -> the signed map there


def default_map(device):
    """The signed dynamic map on `device` (one copy per device; callers must not write to it)."""
    device = torch.device(device)
    if device.type == "cpu":
        return DYNAMIC_MAP_SIGNED
    if device not in _DEFAULT_MAPS:
        _DEFAULT_MAPS[device] = DYNAMIC_MAP_SIGNED.to(device)
    return _DEFAULT_MAPS[device]


def check_blocksize(op, blocksize):
    """blocksize as an int: any positive integer (TypeError for a non-integer, ValueError for one <= 0)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise TypeError(f"{op}: blocksize must be a positive integer, got {blocksize!r}")
    if not 0 < blocksize <= _INT64_MAX:
        raise ValueError(f"{op}: blocksize must be a positive integer (at most 2**63 - 1), got {blocksize!r}")
    return int(blocksize)


def _check_float_dtype(op, name, dtype, error=TypeError):
    if dtype not in FLOAT_DTYPES:
        raise error(f"{op}: {name} must be float32, float16 or bfloat16, got {dtype}")


def check_tensor(op, name, value, what="a torch.Tensor"):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be {what}, got {type(value).__name__}")


def check_code(op, code, error=TypeError):
    """The map's type and shape (a float32 tensor of shape (256,)); its values are checked by check_code_values."""
    check_tensor(op, "code", code, "a torch.Tensor of 256 float32 values")
    if code.dtype != torch.float32:
        raise error(f"{op}: code must be float32, got {code.dtype}")
    if code.dim() != 1 or code.numel() != 256:
        raise ValueError(f"{op}: code must have shape (256,), got {tuple(code.shape)}")


# id(map tensor) -> (a weak reference to it, its version counter when it was found finite and sorted). Keyed by
# identity (a tensor's == is elementwise); an entry goes when its tensor does.
_CHECKED_MAPS = {}


def _checked(code):
    entry = _CHECKED_MAPS.get(id(code))
    return entry is not None and entry[0]() is code and entry[1] == code._version


def _remember_checked(code):
    key = id(code)
    _CHECKED_MAPS[key] = (weakref.ref(code, lambda _, key=key: _CHECKED_MAPS.pop(key, None)), code._version)


def check_code_values(op, code):
    """ValueError unless the map's values are finite and sorted ascending (what the nearest-code search needs).

    Reads the 256 values on the host once per tensor and version (a CUDA map: one small copy); skipped while
    torch.compile traces or a CUDA graph is captured (the CPU kernel checks again; the CUDA kernel cannot raise,
    and an unsorted map there gives the definition's midpoint counts, in range but meaningless).
    """
    if code.device.type == "meta" or torch.compiler.is_compiling():
        return
    if code.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if _checked(code):
        return
    values = code.detach().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(f"{op}: code must be finite, got code[{j}] = {values[j].item()}")
    descending = (values[1:] < values[:-1]).nonzero()
    if descending.numel():
        j = int(descending[0])
        raise ValueError(
            f"{op}: code must be sorted ascending, got code[{j}] = {values[j].item()} > "
            f"code[{j + 1}] = {values[j + 1].item()}"
        )
    _remember_checked(code)


def resolve_code(op, code, device, error=TypeError, sorted_map=True):
    """The map to use on `device`: the signed dynamic map for None, else `code` checked and moved to `device`.
    sorted_map: also check its values (quantizing needs a sorted finite map; dequantizing is a lookup)."""
    if code is None:
        return default_map(device)
    check_code(op, code, error)
    if code.device.type == "meta" and torch.device(device).type != "meta":
        raise ValueError(f"{op}: code must hold values (a tensor on the CPU or {device}), got a meta tensor")
    if sorted_map:
        check_code_values(op, code)
    return code.to(device).contiguous()


def _num_blocks(n, blocksize):
    return (n + blocksize - 1) // blocksize  # Python ints: no overflow (and no guard on a symbolic n)


def quantize_blockwise(x, code=None, blocksize=256):
    """Quantize `x` block-wise to uint8 codes of the (sorted) map `code` (default: the signed dynamic map).

    Returns (codes, absmax): codes has x's shape, absmax is float32 of shape (ceil(x.numel() / blocksize),).
    """
    op = "quantize_blockwise"
    check_tensor(op, "x", x)
    _check_float_dtype(op, "x", x.dtype)
    blocksize = check_blocksize(op, blocksize)
    code = resolve_code(op, code, x.device)
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
    blocksize = check_blocksize(op, blocksize)
    _check_float_dtype(op, "dtype", dtype)
    expected = _num_blocks(codes.numel(), blocksize)
    if absmax.numel() != expected:
        raise ValueError(
            f"{op}: absmax must hold ceil({codes.numel()} / {blocksize}) = {expected} values for codes of shape "
            f"{tuple(codes.shape)}, got {absmax.numel()}"
        )
    if absmax.device != codes.device:
        raise ValueError(f"{op}: absmax must be on the device of codes ({codes.device}), got {absmax.device}")
    code = resolve_code(op, code, codes.device, sorted_map=False)
    _ext.require(op, codes.device)
    return torch.ops.kestrel.dequantize_blockwise(codes, absmax, code, blocksize, dtype)


if _ext.available():
    # The fake kernels check what the real ones check, so a traced call fails as an eager one does; the device
    # checks also stop a meta tensor mixed with real ones from picking this kernel and returning empty memory.

    @torch.library.register_fake("kestrel::quantize_blockwise")
    def _quantize_blockwise_fake(x, code, blocksize):
        op = "quantize_blockwise"
        torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
        torch._check(blocksize > 0, lambda: f"{op}: blocksize must be a positive integer, got {blocksize}")
        torch._check(code.dtype == torch.float32, lambda: f"{op}: code must be float32, got {code.dtype}")
        torch._check(
            code.dim() == 1 and code.numel() == 256,
            lambda: f"{op}: code must have shape (256,), got {tuple(code.shape)}",
        )
        torch._check(code.device == x.device, lambda: f"{op}: code must be on {x.device}, got {code.device}")
        absmax = x.new_empty((_num_blocks(x.numel(), blocksize),), dtype=torch.float32)
        return x.new_empty(x.shape, dtype=torch.uint8), absmax

    @torch.library.register_fake("kestrel::dequantize_blockwise")
    def _dequantize_blockwise_fake(codes, absmax, code, blocksize, dtype):
        op = "dequantize_blockwise"
        torch._check(codes.dtype == torch.uint8, lambda: f"{op}: codes must be uint8, got {codes.dtype}")
        torch._check(absmax.dtype == torch.float32, lambda: f"{op}: absmax must be float32, got {absmax.dtype}")
        torch._check(blocksize > 0, lambda: f"{op}: blocksize must be a positive integer, got {blocksize}")
        torch._check(
            absmax.numel() == _num_blocks(codes.numel(), blocksize),
            lambda: f"{op}: absmax must hold ceil({codes.numel()} / {blocksize}) values, got {absmax.numel()}",
        )
        torch._check(
            code.dtype == torch.float32 and code.numel() == 256,
            lambda: f"{op}: code must be 256 float32 values, got {code.dtype} {tuple(code.shape)}",
        )
        torch._check(
            absmax.device == codes.device and code.device == codes.device,
            lambda: f"{op}: absmax and code must be on {codes.device}, got {absmax.device} and {code.device}",
        )
        torch._check(dtype in FLOAT_DTYPES, lambda: f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
        return codes.new_empty(codes.shape, dtype=dtype)

    # Autograd. Quantizing is piecewise constant: its outputs are marked non-differentiable (no silent dropped
    # gradient). Dequantizing, code[codes] * absmax[block], is differentiable in absmax and in the map.

    def _quantize_setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def _quantize_backward(ctx, grad_codes, grad_absmax):
        return None, None, None

    torch.library.register_autograd(
        "kestrel::quantize_blockwise", _quantize_backward, setup_context=_quantize_setup_context
    )

    def _dequantize_setup_context(ctx, inputs, output):
        codes, absmax, code, blocksize, _ = inputs
        ctx.save_for_backward(codes, absmax, code)
        ctx.blocksize = blocksize

    def _dequantize_backward(ctx, grad):
        codes, absmax, code = ctx.saved_tensors
        flat = codes.reshape(-1).long()
        block = torch.arange(flat.numel(), device=codes.device) // ctx.blocksize
        g = grad.reshape(-1).float()
        grad_absmax = grad_code = None
        if ctx.needs_input_grad[1]:
            grad_absmax = absmax.new_zeros(absmax.numel()).index_add_(0, block, g * code[flat]).view(absmax.shape)
        if ctx.needs_input_grad[2]:
            grad_code = torch.zeros_like(code).index_add_(0, flat, g * absmax.reshape(-1)[block])
        return None, grad_absmax, grad_code, None, None

    torch.library.register_autograd(
        "kestrel::dequantize_blockwise", _dequantize_backward, setup_context=_dequantize_setup_context
    )
