"""Plain-PyTorch block-wise quantization with the same float32 arithmetic as the kernels (the test oracle)."""

import torch


def _blocks(x, blocksize):
    flat = x.reshape(-1).float()
    n = flat.numel()
    num_blocks = (n + blocksize - 1) // blocksize
    padded = torch.zeros(num_blocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    return padded.view(num_blocks, blocksize), n


def absmax_and_normalized(x, blocksize):
    """Per-block absmax (NaN-propagating) and x * (1 / absmax), with 1/0 taken as 0 so zero blocks stay zero."""
    blocks, n = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, torch.ones_like(absmax) / absmax, torch.zeros_like(absmax))
    normalized = (blocks * inverse[:, None]).reshape(-1)[:n]
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
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (code.float()[flat] * scale).to(dtype).reshape(codes.shape)
