"""Block-wise quantization: exactness against nearest rounding (docs/optim8bit.md), float64 and bitsandbytes 0.50.2."""

import numpy as np
import pytest
import torch
from helpers import FLOAT_DTYPES, devices

import kestrel
from kestrel import functional as KF
from kestrel import ops as KO
from kestrel.reference import quantize as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

SIZES = [1, 255, 256, 257, 4097, 70_001]  # 70_001 takes the CPU kernel's bucket-table path
BLOCKSIZES = [64, 256, 4096]


def make_input(n, dtype, device, seed=0):
    """Gaussian values with per-chunk scales from 1e-8 to 1e3, a zero chunk and outliers: every region of the map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    chunks = (n + 63) // 64
    scales = 10.0 ** torch.empty(chunks, dtype=torch.float64).uniform_(-8, 3, generator=g)
    x = x * scales.repeat_interleave(64)[:n]
    if n > 300:
        x[128:192] = 0.0
        x[::97] *= 50.0
    if dtype == torch.float16:
        x = x.clamp(-60000.0, 60000.0)  # finite in float16
    return x.to(dtype).to(device)


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_dynamic_map(F, signed, max_exponent_bits, total_bits):
    """bnb's map, or None where bnb rejects the arguments (an assertion, or a loop variable left unset)."""
    try:
        return F.create_dynamic_map(signed, max_exponent_bits, total_bits)
    except (AssertionError, UnboundLocalError, NameError, RuntimeError, ValueError):
        return None


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("total_bits", range(1, 11))
def test_dynamic_map_equals_bitsandbytes(signed, total_bits):
    # Regression: create_dynamic_map(True, 8, 8) (bnb's test_few_bit_quant: (True, bits, bits) for bits in 2..8)
    # was rejected. Every (signed, max_exponent_bits, total_bits) bnb accepts gives its values bit for bit, and
    # what it rejects raises ValueError naming the arguments.
    F = bnb_functional()
    for max_exponent_bits in range(0, total_bits + 4):
        expected = bnb_dynamic_map(F, signed, max_exponent_bits, total_bits)
        if expected is None:
            with pytest.raises(ValueError, match="create_dynamic_map: .*max_exponent_bits"):
                KF.create_dynamic_map(signed, max_exponent_bits, total_bits)
            continue
        ours = KF.create_dynamic_map(signed, max_exponent_bits, total_bits)
        assert ours.dtype == torch.float32 and ours.shape == expected.shape == (max(256, 2**total_bits),)
        assert torch.equal(ours.view(torch.int32), expected.float().view(torch.int32)), (max_exponent_bits, total_bits)
    # Keywords and defaults as in bnb.
    assert torch.equal(KF.create_dynamic_map(signed=signed), F.create_dynamic_map(signed=signed))
    bits = 5 if signed else 7
    assert torch.equal(
        KF.create_dynamic_map(signed, total_bits=8, max_exponent_bits=bits),
        F.create_dynamic_map(signed, total_bits=8, max_exponent_bits=bits),
    )


def test_dynamic_map_large_max_exponent_bits():
    # A signed map takes any max_exponent_bits >= total_bits - 1 (the extra exponents hold no value); bnb loops over
    # all of them, ours only over those that hold values.
    F = bnb_functional()
    for max_exponent_bits in (9, 20, 60):
        assert torch.equal(
            KF.create_dynamic_map(True, max_exponent_bits, 8), F.create_dynamic_map(True, max_exponent_bits, 8)
        )
    assert torch.equal(KF.create_dynamic_map(True, 10**6, 8), KF.create_dynamic_map(True, 7, 8))


def test_dynamic_map_layout():
    signed, unsigned = KF.create_dynamic_map(True), KF.create_dynamic_map(False)
    assert signed[127].item() == 0.0 and signed[255].item() == 1.0
    assert abs(signed[0].item() - (-0.99297)) < 1e-5
    assert unsigned[0].item() == 0.0 and unsigned[255].item() == 1.0
    for code in (signed, unsigned):
        assert bool((code[1:] > code[:-1]).all())


def test_create_dynamic_map_rejects_bad_arguments():
    with pytest.raises(
        ValueError,
        match=r"signed=False, max_exponent_bits=8, total_bits=8 gives 257 values, not "
        r"2\*\*total_bits = 256 \(an unsigned map needs max_exponent_bits = total_bits - 1 = 7\)",
    ):
        KF.create_dynamic_map(False, 8, 8)
    with pytest.raises(ValueError, match=r"max_exponent_bits must be >= 1 for total_bits=8 .*got 0"):
        KF.create_dynamic_map(True, 0, 8)
    with pytest.raises(ValueError, match=r"max_exponent_bits must be >= 0, got -1"):
        KF.create_dynamic_map(True, -1, 8)
    with pytest.raises(ValueError, match=r"total_bits must be in \[1, 16\], got 0"):
        KF.create_dynamic_map(True, 7, 0)
    with pytest.raises(ValueError, match=r"total_bits must be in \[1, 16\], got 17"):
        KF.create_dynamic_map(True, 7, 17)
    with pytest.raises(TypeError, match=r"max_exponent_bits must be an integer, got 7.0"):
        KF.create_dynamic_map(True, 7.0, 8)
    with pytest.raises(TypeError, match=r"total_bits must be an integer, got '8'"):
        KF.create_dynamic_map(True, 7, "8")
    with pytest.raises(TypeError, match=r"signed must be a bool, got 'no'"):
        KF.create_dynamic_map("no")
    assert KF.create_dynamic_map(True, 7, 9).shape == (512,)  # bnb builds 2**total_bits values past 8 bits
    with pytest.raises(ValueError, match=r"code must have shape \(256,\), got \(512,\)"):
        KO.quantize_blockwise(torch.randn(10), code=KF.create_dynamic_map(True, 7, 9))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_equals_spec_reference(device, dtype, n, blocksize):
    x = make_input(n, dtype, device, seed=n + blocksize)
    code = KF.create_dynamic_map(signed=True).to(device)
    codes, absmax = KO.quantize_blockwise(x, blocksize=blocksize)
    expected_codes, expected_absmax = ref.quantize_blockwise(x, code, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == ((n + blocksize - 1) // blocksize,)
    assert torch.equal(absmax, expected_absmax)
    assert torch.equal(codes, expected_codes)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_nearest_in_float64(device, signed):
    n = 60_000
    x = make_input(n, torch.float32, device, seed=7)
    if not signed:
        x = x.abs()
    code = KF.create_dynamic_map(signed=signed).to(device)
    codes, _ = KO.quantize_blockwise(x, code=code, blocksize=256)
    _, v = ref.absmax_and_normalized(x, 256)
    v64, code64 = v.double().cpu(), code.double().cpu()
    ours = (v64 - code64[codes.long().cpu()]).abs()
    best = (v64[:, None] - code64[None, :]).abs().min(dim=1).values
    # Exact nearest up to the float32 rounding of a midpoint: only a value lying exactly on a float32 midpoint
    # may pick a code that is farther by at most one ulp.
    ulp = torch.from_numpy(np.spacing(np.abs(v.cpu().numpy()))).double()
    assert bool((ours <= best + ulp).all())
    worse = ours > best
    midpoints = ((code[:-1] + code[1:]) * 0.5).cpu()
    assert bool(torch.isin(v.cpu()[worse], midpoints).all())


@pytest.mark.parametrize("device", devices())
def test_midpoints_take_the_lower_index(device):
    code = KF.create_dynamic_map(signed=True).to(device)
    midpoints = (code[:-1] + code[1:]) * 0.5
    above = torch.nextafter(midpoints, torch.full_like(midpoints, 2.0))
    below = torch.nextafter(midpoints, torch.full_like(midpoints, -2.0))
    # Blocks of 256 values whose absmax is exactly 1, so the normalised values are the inputs themselves.
    for values, expected in ((midpoints, torch.arange(255)), (above, torch.arange(1, 256)), (below, torch.arange(255))):
        x = torch.cat([values, torch.ones(1, device=device)])
        codes, absmax = KO.quantize_blockwise(x, code=code, blocksize=256)
        assert absmax.item() == 1.0
        assert torch.equal(codes[:255].long().cpu(), expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_exact_on_map_values(device, signed):
    code = KF.create_dynamic_map(signed=signed).to(device)
    codes, absmax = KO.quantize_blockwise(code, code=code, blocksize=256)
    assert absmax.item() == 1.0
    assert torch.equal(codes.long().cpu(), torch.arange(256))
    assert torch.equal(KO.dequantize_blockwise(codes, absmax, code=code, blocksize=256), code)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_blocks_decode_to_zero(device, dtype):
    x = torch.zeros(1000, dtype=dtype, device=device)
    x[600:700] = 3.0
    codes, absmax = KO.quantize_blockwise(x, blocksize=256)
    assert absmax.tolist() == [0.0, 0.0, 3.0, 0.0]
    assert bool((codes[:512] == 127).all()) and bool((codes[768:] == 127).all())
    out = KO.dequantize_blockwise(codes, absmax, blocksize=256, dtype=dtype)
    assert not bool(out.isnan().any())
    assert bool((out[:512] == 0).all()) and bool((out[600:700] == 3.0).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2)])
def test_empty_tensors(device, shape):
    x = torch.empty(shape, device=device)
    codes, absmax = KO.quantize_blockwise(x)
    assert codes.shape == shape and absmax.shape == (0,)
    out = KO.dequantize_blockwise(codes, absmax, dtype=torch.bfloat16)
    assert out.shape == shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("device", devices())
def test_partial_last_block_and_shape(device):
    x = make_input(3 * 100, torch.float32, device).reshape(3, 100)
    codes, absmax = KO.quantize_blockwise(x, blocksize=256)
    assert codes.shape == (3, 100) and absmax.shape == (2,)
    assert absmax[1].item() == x.reshape(-1)[256:].abs().max().item()


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_input(device):
    x = make_input(64 * 130, torch.float32, device).reshape(64, 130)
    codes, absmax = KO.quantize_blockwise(x.t(), blocksize=64)
    expected_codes, expected_absmax = KO.quantize_blockwise(x.t().contiguous(), blocksize=64)
    assert torch.equal(codes, expected_codes) and torch.equal(absmax, expected_absmax)


def with_specials(dtype, device, blocksize=256, seed=0):
    """Four blocks: +inf, -inf and NaN among finite values, all three together, and one of specials only."""
    x = make_input(4 * blocksize, dtype, device, seed=seed).reshape(4, blocksize)
    x[0, 5], x[1, 7], x[1, 9], x[2, 0] = float("inf"), float("-inf"), float("nan"), float("nan")
    x[2, 1], x[2, 2] = float("inf"), float("-inf")
    x[3] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0] * (blocksize // 4), dtype=dtype)
    return x.reshape(-1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_elements_leave_their_neighbours_intact(device, dtype):
    # Regression: a +inf made its block's absmax inf, so the other elements decoded to NaN and the inf itself to
    # -inf; a NaN made the absmax NaN and the whole block decoded to NaN. Now absmax is over the finite elements.
    x = with_specials(dtype, device)
    code = KF.create_dynamic_map().to(device)
    codes, absmax = KO.quantize_blockwise(x, code=code, blocksize=256)
    expected_codes, expected_absmax = ref.quantize_blockwise(x, code, 256)
    assert torch.equal(absmax, expected_absmax) and torch.equal(codes, expected_codes)
    blocks = x.float().reshape(4, 256)
    finite = torch.isfinite(blocks)
    assert torch.equal(absmax[:3], torch.where(finite, blocks.abs(), torch.zeros_like(blocks)).amax(dim=1)[:3])
    assert absmax[3].item() == 0.0 and bool(torch.isfinite(absmax).all())
    # Each element quantizes as torch.nan_to_num(x, nan=0, posinf=absmax, neginf=-absmax) would.
    clean = torch.nan_to_num(blocks, nan=0.0, posinf=0.0, neginf=0.0)
    clean = torch.where(blocks == float("inf"), absmax[:, None], clean)
    clean = torch.where(blocks == float("-inf"), -absmax[:, None], clean)
    clean_codes, clean_absmax = KO.quantize_blockwise(clean.reshape(-1).to(dtype), code=code, blocksize=256)
    assert torch.equal(codes, clean_codes) and torch.equal(absmax, clean_absmax)
    out = KO.dequantize_blockwise(codes, absmax, blocksize=256).reshape(4, 256)
    assert bool(torch.isfinite(out).all())
    assert bool((out[finite] == ref.dequantize_blockwise(codes, absmax, code, 256).reshape(4, 256)[finite]).all())
    # +inf saturates to +absmax (code 255: 1.0), -inf to the map's most negative value, NaN decodes to 0.
    assert codes[5].item() == 255 and out[0, 5].item() == absmax[0].item()
    assert codes[256 + 7].item() == 0 and out[1, 7].item() == (code[0] * absmax[1]).item()
    assert codes[256 + 9].item() == 127 and out[1, 9].item() == 0.0
    assert bool((out[3] == 0).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subnormal_absmax(device, dtype):
    # Regression: 1/absmax overflowed to inf for an absmax below 2.9e-39, so every nonzero element took code 255
    # and zeros took code 0 (0 * inf = NaN). The kernels now pre-scale such a block by 2^64.
    tiny = torch.finfo(dtype).smallest_normal
    values = torch.tensor([0.01, 0.005, 0.0, -0.01, -0.0025, 0.009, 0.0001, 0.00731], dtype=torch.float64) * tiny
    x = values.to(dtype).repeat(8).to(device)
    code = KF.create_dynamic_map().to(device)
    codes, absmax = KO.quantize_blockwise(x, code=code, blocksize=64)
    expected_codes, expected_absmax = ref.quantize_blockwise(x, code, 64)
    assert torch.equal(absmax, expected_absmax) and torch.equal(codes, expected_codes)
    assert absmax[0].item() == x[0].item() and absmax[0].item() < 2.9e-39
    if dtype == torch.float32:  # the same block scaled by 2^64 (exact) has the same codes
        assert torch.equal(KO.quantize_blockwise(x * 2.0**64, code=code, blocksize=64)[0], codes)
    out = KO.dequantize_blockwise(codes, absmax, blocksize=64).double().cpu()
    err = (out - x.double().cpu()).abs()
    assert bool((err <= 0.02 * absmax[0].item()).all())  # the map's own resolution, not saturation
    assert codes[2].item() == 127 and out[2].item() == 0.0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scale", [1.0, 2.0**126, 1e38, 3e38, float(torch.finfo(torch.float32).max)])
def test_huge_absmax_is_exact_nearest(device, scale):
    # Regression: above 2^126, 1/absmax is subnormal (fewer significant bits), so values near a midpoint took the
    # farther code (at absmax 3e38, 168 of these 511 codes differed from those of the same block scaled by 2^-64).
    # The kernels now pre-scale such a block by 2^-64.
    code = KF.create_dynamic_map().to(device)
    midpoints = (code[:-1] + code[1:]) * 0.5
    near = torch.cat(
        [
            torch.nextafter(midpoints, torch.full_like(midpoints, 2.0)),
            torch.nextafter(midpoints, torch.full_like(midpoints, -2.0)),
        ]
    )
    x = torch.cat([(near.double() * scale).float(), torch.tensor([scale], device=device).float()])
    codes, absmax = KO.quantize_blockwise(x, code=code, blocksize=512)
    expected_codes, expected_absmax = ref.quantize_blockwise(x, code, 512)
    assert torch.equal(absmax, expected_absmax) and torch.equal(codes, expected_codes)
    # Scaling a block by a power of two changes no code (what exact arithmetic gives): the same block scaled into
    # the range where 1/absmax is a normal float32 has the same codes.
    down = x * 2.0**-64
    down_codes, down_absmax = KO.quantize_blockwise(down, code=code, blocksize=512)
    assert torch.equal(down * 2.0**64, x) and torch.equal(down_absmax * 2.0**64, absmax)
    assert torch.equal(codes, down_codes)


def test_non_finite_compared_with_bitsandbytes():
    # bnb 0.50.2's CPU quantizer leaves NaN out of absmax as we do (a NaN takes its code 0), but a +-inf makes its
    # absmax inf, and the block decodes to +inf everywhere (the inf element to -inf): we keep the finite values.
    F = bnb_functional()
    x = with_specials(torch.float32, "cpu")
    nan_only = x.clone().reshape(4, 256)[1:2].clone()
    nan_only[0, 7] = 0.5
    codes, absmax = KO.quantize_blockwise(nan_only.reshape(-1), blocksize=256)
    bnb_codes, bnb_state = F.quantize_blockwise(nan_only.reshape(-1), blocksize=256)
    assert torch.equal(absmax, bnb_state.absmax)
    bnb_out = F.dequantize_blockwise(*F.quantize_blockwise(x[:256], blocksize=256))
    assert bool(torch.isinf(bnb_out).all())
    out = KO.dequantize_blockwise(*KO.quantize_blockwise(x[:256], blocksize=256), blocksize=256)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n", [1000, 100_000])
def test_custom_and_degenerate_codes(device, n):
    # A linear map, and a 4-bit map padded with zeros (many equal midpoints: the CPU kernel's generic search).
    for code in (torch.linspace(-1, 1, 256), KF.create_dynamic_map(True, 3, 4)):
        code = code.to(device)
        x = make_input(n, torch.float32, device, seed=3)
        codes, absmax = KO.quantize_blockwise(x, code=code, blocksize=128)
        expected_codes, expected_absmax = ref.quantize_blockwise(x, code, 128)
        assert torch.equal(absmax, expected_absmax) and torch.equal(codes, expected_codes)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 2048])
def test_dequantize_equals_reference(device, dtype, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    n = 5000
    codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device)
    absmax = (torch.rand((n + blocksize - 1) // blocksize, generator=g) * 100).to(device)
    absmax[0] = 0.0
    code = KF.create_dynamic_map(signed=False).to(device)
    out = KO.dequantize_blockwise(codes, absmax, code=code, blocksize=blocksize, dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, ref.dequantize_blockwise(codes, absmax, code, blocksize, dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_dequantize_equals_bitsandbytes(device, dtype, blocksize):
    bnb_functional()
    g = torch.Generator().manual_seed(1)
    n = 9000
    codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device)
    absmax = (torch.rand((n + blocksize - 1) // blocksize, generator=g) * 10).to(device)
    code = KF.create_dynamic_map().to(device)
    expected = torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, code, blocksize, dtype)
    ours = KO.dequantize_blockwise(codes, absmax, code=code, blocksize=blocksize, dtype=dtype)
    assert torch.equal(ours, expected)


ANY_BLOCKSIZES = [1, 3, 32, 100, 1000, 5000, 8192, 16384, 65536, 2**40]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", ANY_BLOCKSIZES)
def test_any_positive_blocksize(device, dtype, blocksize):
    # Regression: only powers of two in [64, 4096] were accepted; bnb's CPU backend takes any positive blocksize
    # (its tests use 16384), its CUDA backend the powers of two in [64, 4096]. Both our kernels take any.
    for n in (1, 999, 70_001):
        x = make_input(n, dtype, device, seed=blocksize % 1000 + n)
        code = KF.create_dynamic_map().to(device)
        codes, absmax = KO.quantize_blockwise(x, code=code, blocksize=blocksize)
        expected_codes, expected_absmax = ref.quantize_blockwise(x, code, blocksize)
        assert absmax.shape == (-(-n // blocksize),)
        assert torch.equal(absmax, expected_absmax) and torch.equal(codes, expected_codes)
        out = KO.dequantize_blockwise(codes, absmax, code=code, blocksize=blocksize, dtype=dtype)
        assert torch.equal(out, ref.dequantize_blockwise(codes, absmax, code, blocksize, dtype))


@pytest.mark.parametrize("blocksize", [1, 3, 100, 5000, 16384, 65536])
def test_any_blocksize_against_bitsandbytes_cpu(blocksize):
    F = bnb_functional()
    x = make_input(100_003, torch.float32, "cpu", seed=blocksize)
    codes, absmax = KO.quantize_blockwise(x, blocksize=blocksize)
    bnb_codes, bnb_state = F.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(absmax, bnb_state.absmax)
    assert_never_farther(x, blocksize, codes, bnb_codes)
    code = KF.create_dynamic_map()
    expected = torch.ops.bitsandbytes.dequantize_blockwise(bnb_codes, absmax, code, blocksize, torch.float32)
    assert torch.equal(KO.dequantize_blockwise(bnb_codes, absmax, code=code, blocksize=blocksize), expected)


def assert_never_farther(x, blocksize, codes, other_codes):
    """Our code is never farther from the normalised input x * (1/absmax) than `other_codes`, except for a value
    exactly on a float32 midpoint, where the tie rule takes the lower index (at most one ulp farther)."""
    code = KF.create_dynamic_map().to(x.device)
    _, v = ref.absmax_and_normalized(x, blocksize)
    ours = (v.double() - code.double()[codes.long()]).abs()
    theirs = (v.double() - code.double()[other_codes.long()]).abs()
    farther = ours > theirs
    midpoints = (code[:-1] + code[1:]) * 0.5
    assert bool(torch.isin(v[farther], midpoints).all())
    assert bool((codes[farther] < other_codes[farther]).all())
    return farther


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_never_farther_than_bitsandbytes_cpu(dtype, blocksize):
    F = bnb_functional()
    x = make_input(100_000, dtype, "cpu", seed=11)
    codes, absmax = KO.quantize_blockwise(x, blocksize=blocksize)
    bnb_codes, bnb_state = F.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(absmax, bnb_state.absmax)
    assert_never_farther(x, blocksize, codes, bnb_codes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_matches_bitsandbytes_cuda(dtype, blocksize):
    F = bnb_functional()
    x = make_input(1_000_003, dtype, "cuda", seed=5)
    codes, absmax = KO.quantize_blockwise(x, blocksize=blocksize)
    bnb_codes, bnb_state = F.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(absmax, bnb_state.absmax)
    assert_never_farther(x, blocksize, codes, bnb_codes)
    assert (codes == bnb_codes).float().mean().item() > 0.999


@pytest.mark.parametrize("device", devices())
def test_argument_errors(device):
    x = torch.randn(1000, device=device)
    for bad in (0, -64):
        with pytest.raises(ValueError, match=rf"quantize_blockwise: blocksize must be a positive integer.*got {bad}"):
            KO.quantize_blockwise(x, blocksize=bad)
    for bad in (256.0, True, "256", torch.tensor(256)):
        with pytest.raises(TypeError, match=r"quantize_blockwise: blocksize must be a positive integer, got"):
            KO.quantize_blockwise(x, blocksize=bad)
    with pytest.raises(ValueError, match=r"quantize_blockwise: code must have shape \(256,\), got \(255,\)"):
        KO.quantize_blockwise(x, code=torch.zeros(255, device=device))
    with pytest.raises(TypeError, match="quantize_blockwise: code must be float32, got torch.float64"):
        KO.quantize_blockwise(x, code=torch.zeros(256, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="quantize_blockwise: x must be float32, float16 or bfloat16, got torch.int32"):
        KO.quantize_blockwise(torch.ones(10, dtype=torch.int32, device=device))
    codes, absmax = KO.quantize_blockwise(x)
    with pytest.raises(ValueError, match=r"absmax must hold ceil\(1000 / 256\) = 4 values .* got 3"):
        KO.dequantize_blockwise(codes, absmax[:3])
    with pytest.raises(ValueError, match=r"absmax must hold ceil\(1000 / 128\) = 8 values .* got 4"):
        KO.dequantize_blockwise(codes, absmax, blocksize=128)
    with pytest.raises(TypeError, match="dequantize_blockwise: codes must be a uint8 tensor, got torch.int64"):
        KO.dequantize_blockwise(codes.long(), absmax)
    with pytest.raises(TypeError, match="dequantize_blockwise: absmax must be a float32 tensor, got torch.float16"):
        KO.dequantize_blockwise(codes, absmax.half())
    with pytest.raises(
        TypeError, match="dequantize_blockwise: dtype must be float32, float16 or bfloat16, got torch.int8"
    ):
        KO.dequantize_blockwise(codes, absmax, dtype=torch.int8)


def test_meta_tensor_mixed_with_real_ones_is_rejected():
    # Regression: a meta absmax or map beside real CPU tensors dispatched to the fake kernel, which returned
    # uninitialised CPU memory as the result. The fake kernels now check devices (and what the real ones check).
    code = KF.create_dynamic_map()
    x = torch.randn(1000)
    codes, absmax = KO.quantize_blockwise(x)
    with pytest.raises(RuntimeError, match=r"dequantize_blockwise: absmax and code must be on cpu, got meta and cpu"):
        torch.ops.kestrel.dequantize_blockwise(codes, absmax.to("meta"), code, 256, torch.float32)
    with pytest.raises(RuntimeError, match=r"quantize_blockwise: code must be on cpu, got meta"):
        torch.ops.kestrel.quantize_blockwise(x, code.to("meta"), 256)
    with pytest.raises(ValueError, match=r"quantize_blockwise: code must hold values .* got a meta tensor"):
        KO.quantize_blockwise(x, code=code.to("meta"))
    with pytest.raises(NotImplementedError, match=r"kestrel.quantize_blockwise: no kernel for device meta"):
        KO.quantize_blockwise(x.to("meta"))
    # All-meta calls are shape inference.
    meta_codes, meta_absmax = torch.ops.kestrel.quantize_blockwise(x.to("meta").view(10, 100), code.to("meta"), 64)
    assert meta_codes.device.type == "meta" and meta_codes.shape == (10, 100) and meta_absmax.shape == (16,)


@pytest.mark.parametrize("device", devices())
def test_layouts_and_autograd_inputs(device):
    code = KF.create_dynamic_map().to(device)
    base = make_input(4 * 3 * 8 * 8, torch.float32, device).reshape(4, 3, 8, 8)
    expected_codes, expected_absmax = KO.quantize_blockwise(base, blocksize=64)
    for x in (
        base.to(memory_format=torch.channels_last),
        base.clone().requires_grad_(),
        base.reshape(-1)[None].expand(2, -1)[0].reshape(4, 3, 8, 8),
    ):
        codes, absmax = KO.quantize_blockwise(x, blocksize=64)
        assert codes.shape == x.shape and not codes.requires_grad and not absmax.requires_grad
        assert torch.equal(codes.contiguous(), expected_codes) and torch.equal(absmax, expected_absmax)
    # A strided map (quantize and dequantize), a 2-D or strided absmax, strided codes.
    strided_code = torch.stack([code, code], 1)[:, 0]
    assert not strided_code.is_contiguous()
    codes, absmax = KO.quantize_blockwise(base, code=strided_code, blocksize=64)
    assert torch.equal(codes, expected_codes)
    expected = KO.dequantize_blockwise(codes, absmax, blocksize=64)
    for got in (
        KO.dequantize_blockwise(codes, absmax, code=strided_code, blocksize=64),
        torch.ops.kestrel.dequantize_blockwise(codes, absmax, strided_code, 64, torch.float32),
        KO.dequantize_blockwise(codes, absmax.view(4, -1), blocksize=64),
        KO.dequantize_blockwise(codes, torch.stack([absmax, absmax], 1)[:, 0], blocksize=64),
        KO.dequantize_blockwise(codes.transpose(0, 3).contiguous().transpose(0, 3), absmax, blocksize=64),
    ):
        assert torch.equal(got, expected)
    # A 0-d tensor is one block of one element.
    codes, absmax = KO.quantize_blockwise(torch.tensor(-2.5, device=device))
    assert codes.shape == () and absmax.tolist() == [2.5]
    assert KO.dequantize_blockwise(codes, absmax).item() == (code[0] * 2.5).item()


@pytest.mark.parametrize("device", devices())
def test_autograd(device):
    # Regression: outputs of the ops carried a "not implemented" grad_fn, so backward dropped gradients with only a
    # warning. Quantize outputs are now non-differentiable; dequantize has its gradient in absmax and the map.
    x = make_input(1000, torch.float32, device).requires_grad_()
    codes, absmax = KO.quantize_blockwise(x, blocksize=64)
    assert not codes.requires_grad and not absmax.requires_grad
    code = KF.create_dynamic_map(signed=False).to(device).requires_grad_()
    absmax = absmax.clone().requires_grad_()
    grad = torch.randn(1000, device=device)
    KO.dequantize_blockwise(codes, absmax, code=code, blocksize=64).backward(grad)
    ref_absmax, ref_code = absmax.detach().clone().requires_grad_(), code.detach().clone().requires_grad_()
    ref.dequantize_blockwise(codes, ref_absmax, ref_code, 64).backward(grad)
    torch.testing.assert_close(absmax.grad, ref_absmax.grad)
    torch.testing.assert_close(code.grad, ref_code.grad)


def test_wrong_types_are_named():
    x = torch.randn(100)
    codes, absmax = KO.quantize_blockwise(x)
    for bad, match in (
        (x.tolist(), "x must be a torch.Tensor, got list"),
        (x.double(), "x must be float32, float16 or bfloat16, got torch.float64"),
        (x.to(torch.complex64), "x must be float32, float16 or bfloat16, got torch.complex64"),
    ):
        with pytest.raises(TypeError, match="quantize_blockwise: " + match):
            KO.quantize_blockwise(bad)
    with pytest.raises(
        TypeError, match=r"quantize_blockwise: code must be a torch.Tensor of 256 float32 values, got list"
    ):
        KO.quantize_blockwise(x, code=list(range(256)))
    with pytest.raises(TypeError, match="dequantize_blockwise: codes must be a uint8 tensor, got NoneType"):
        KO.dequantize_blockwise(None, absmax)
    with pytest.raises(
        TypeError, match="dequantize_blockwise: dtype must be float32, float16 or bfloat16, got float32"
    ):
        KO.dequantize_blockwise(codes, absmax, dtype="float32")
    with pytest.raises(RuntimeError, match="dequantize_blockwise: dtype must be float32, float16 or bfloat16, got Int"):
        torch.ops.kestrel.dequantize_blockwise(codes, absmax, KF.create_dynamic_map(), 256, torch.int32)


@pytest.mark.parametrize("device", devices())
def test_op_level_checks(device):
    # The registered ops check their arguments too, for callers of torch.ops.kestrel.* directly.
    x = torch.randn(1000, device=device)
    code = KF.create_dynamic_map().to(device)
    with pytest.raises(RuntimeError, match="blocksize must be a positive integer, got 0"):
        torch.ops.kestrel.quantize_blockwise(x, code, 0)
    with pytest.raises(RuntimeError, match="blocksize must be a positive integer, got -4"):
        torch.ops.kestrel.dequantize_blockwise(
            torch.zeros(10, dtype=torch.uint8, device=device), torch.zeros(1, device=device), code, -4, torch.float32
        )
    with pytest.raises(RuntimeError, match=r"code must have shape \(256,\), got \[128\]"):
        torch.ops.kestrel.quantize_blockwise(x, code[:128], 256)
    codes, absmax = torch.ops.kestrel.quantize_blockwise(x, code, 256)
    with pytest.raises(RuntimeError, match="absmax must hold ceil\\(1000 / 256\\) = 4 values, got 2"):
        torch.ops.kestrel.dequantize_blockwise(codes, absmax[:2], code, 256, torch.float32)


@pytest.mark.parametrize("device", devices())
def test_unsorted_or_non_finite_code_is_rejected(device):
    code = KF.create_dynamic_map().flip(0).contiguous().to(device)
    x = torch.randn(100, device=device)
    with pytest.raises(ValueError, match=r"code must be sorted ascending, got code\[0\] = 1.0 > code\[1\]"):
        KO.quantize_blockwise(x, code=code)
    for bad in (float("nan"), float("inf")):
        broken = KF.create_dynamic_map().to(device)
        broken[17] = bad
        with pytest.raises(ValueError, match=rf"code must be finite, got code\[17\] = {bad}"):
            KO.quantize_blockwise(x, code=broken)
    if device == "cpu":  # the raw op checks too (the CUDA kernel cannot raise without a host sync)
        with pytest.raises(RuntimeError, match=r"code must be sorted ascending, got code\[0\] = 1 > code\[1\]"):
            torch.ops.kestrel.quantize_blockwise(x, code, 256)
    # A checked map written in place is checked again (the cache follows the tensor's version counter).
    good = KF.create_dynamic_map().to(device)
    KO.quantize_blockwise(x, code=good)
    good[3] = float("nan")
    with pytest.raises(ValueError, match=r"code must be finite, got code\[3\] = nan"):
        KO.quantize_blockwise(x, code=good)
    # Dequantizing is a lookup: any map of 256 float32 values is taken.
    codes = torch.arange(100, dtype=torch.uint8, device=device)
    out = KO.dequantize_blockwise(codes, torch.ones(1, device=device), code=code)
    assert torch.equal(out, code[:100])


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    code = KF.create_dynamic_map().to(device)
    for dtype in FLOAT_DTYPES:
        for shape, blocksize in (((1000,), 256), ((3, 70), 64), ((0,), 128), ((5000,), 4096)):
            x = make_input(int(np.prod(shape)), dtype, device).reshape(shape)
            torch.library.opcheck(torch.ops.kestrel.quantize_blockwise.default, (x, code, blocksize))
            codes, absmax = torch.ops.kestrel.quantize_blockwise(x, code, blocksize)
            torch.library.opcheck(
                torch.ops.kestrel.dequantize_blockwise.default, (codes, absmax, code, blocksize, dtype)
            )


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def round_trip(x):
        codes, absmax = KO.quantize_blockwise(x, blocksize=128)
        return KO.dequantize_blockwise(codes, absmax, blocksize=128, dtype=x.dtype), codes, absmax

    compiled = torch.compile(round_trip, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = make_input(3000, dtype, device).reshape(30, 100)
        for got, expected in zip(compiled(x), round_trip(x)):
            assert torch.equal(got, expected)
