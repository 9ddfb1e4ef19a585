"""Plain-PyTorch block-wise quantization with the same float32 arithmetic as the kernels (the test oracle).

The rules (kestrel/quantize.h): a block's absmax is the largest |x| over its finite elements; each element is
normalised to v = (x * pre) * inv with inv = 1 / (absmax * pre) (pre = 2^64 for a subnormal absmax, 2^-64 for one
above 2^126, else 1; inv = 0 for absmax 0), a NaN v is taken as 0, and the code is the number of float32
midpoints of the map strictly below v.
So +-inf saturate to the map's last/first code and NaN takes the code of 0.
"""

import torch

_MIN_NORMAL = torch.finfo(torch.float32).tiny
_TWO_64 = 2.0**64
_TWO_126 = 2.0**126


def _blocks(x, blocksize):
    flat = x.reshape(-1).float()
    n = flat.numel()
    num_blocks = (n + blocksize - 1) // blocksize
    width = n if num_blocks == 1 else blocksize  # one block: no padding (blocksize may be far above n)
    padded = torch.zeros(num_blocks * width, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    return padded.view(num_blocks, width), n


def finite_absmax(blocks):
    """Per-row max of |x| over the finite elements (0 for a row without one)."""
    magnitudes = blocks.abs()
    return torch.where(torch.isfinite(magnitudes), magnitudes, torch.zeros_like(magnitudes)).amax(dim=1)


def block_scale(absmax):
    """(pre, inv) per block, as quant::block_scale."""
    pre = torch.where((absmax > 0) & (absmax < _MIN_NORMAL), torch.full_like(absmax, _TWO_64), torch.ones_like(absmax))
    pre = torch.where(absmax > _TWO_126, torch.full_like(absmax, 2.0**-64), pre)
    inv = torch.where(absmax > 0, torch.ones_like(absmax) / (absmax * pre), torch.zeros_like(absmax))
    return pre, inv


def absmax_and_normalized(x, blocksize):
    """Per-block finite absmax and the normalised values (x * pre) * inv, NaN taken as 0 (see the module doc)."""
    blocks, n = _blocks(x, blocksize)
    absmax = finite_absmax(blocks)
    pre, inv = block_scale(absmax)
    normalized = ((blocks * pre[:, None]) * inv[:, None]).reshape(-1)[:n]
    normalized = torch.where(torch.isnan(normalized), torch.zeros_like(normalized), normalized)
    return absmax, normalized


def nearest_code(v, code):
    """Index of the nearest map value: the number of float32 midpoints strictly below v (NaN -> 0)."""
    midpoints = (code[:-1] + code[1:]) * 0.5
    v = torch.where(torch.isnan(v), torch.full_like(v, float("-inf")), v)
    return torch.searchsorted(midpoints.contiguous(), v.contiguous(), right=False)


def quantize_blockwise(x, code, blocksize):
    absmax, normalized = absmax_and_normalized(x, blocksize)
    codes = nearest_code(normalized, code.float()).to(torch.uint8).reshape(x.shape)
    return codes, absmax


def dequantize_blockwise(codes, absmax, code, blocksize, dtype=torch.float32):
    flat = codes.reshape(-1).long()
    scale = absmax[torch.arange(flat.numel(), device=codes.device) // blocksize]
    return (code.float()[flat] * scale).to(dtype).reshape(codes.shape)
