"""Fuzzing block-wise quantization: the C++ kernels against the plain-PyTorch reference bit for bit (shapes, every
float dtype, any blocksize, strided inputs, extreme and non-finite values, custom maps), the bnb-form functional
API's round trip, and malformed arguments that must raise before anything is written."""

import pytest
import torch
from cases import note, raises_clearly, tensors
from hypothesis import given
from hypothesis import strategies as st

import kestrel
from kestrel import functional as KF
from kestrel.ops import quantize as ops
from kestrel.reference import quantize as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")


@st.composite
def quantize_cases(draw):
    shape = draw(st.sampled_from([(0,), (1,), (7,), (255,), (256,), (257,), (3, 100), (2, 3, 64), (1000,)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    blocksize = draw(st.sampled_from([1, 3, 64, 100, 256, 4096, 16384]))
    layout = draw(st.sampled_from(["contiguous", "strided"]))
    signed = draw(st.booleans())
    x = tensors(shape, draw, special_fraction=0.05, scale_range=(-40, 38))
    return x.to(dtype), blocksize, layout, signed


@given(quantize_cases())
def test_quantize_and_dequantize_equal_the_reference_bit_for_bit(case):
    x, blocksize, layout, signed = case
    note(f"quantize shape={tuple(x.shape)} dtype={x.dtype} blocksize={blocksize} layout={layout} signed={signed}")
    if layout == "strided" and x.numel():
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    code = ops.create_dynamic_map(signed)
    codes, absmax = ops.quantize_blockwise(x, code=code, blocksize=blocksize)
    ref_codes, ref_absmax = ref.quantize_blockwise(x.contiguous(), code, blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    assert bool(torch.isfinite(absmax).all())
    for out_dtype in (torch.float32, x.dtype):
        y = ops.dequantize_blockwise(codes, absmax, code=code, blocksize=blocksize, dtype=out_dtype)
        expected = ref.dequantize_blockwise(ref_codes, ref_absmax, code, blocksize, dtype=out_dtype)
        assert torch.equal(y, expected)
    finite = torch.isfinite(x.float())
    y = ops.dequantize_blockwise(codes, absmax, code=code, blocksize=blocksize)
    assert bool(torch.isfinite(y[finite]).all())  # a non-finite element never spoils a finite neighbour


@given(
    st.sampled_from([(5000,), (64, 70), (9000,)]),
    st.sampled_from([torch.float32, torch.float16]),
    st.sampled_from([64, 256, 4096]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_functional_round_trip_in_bnbs_form(shape, dtype, blocksize, nested, seed):
    note(f"functional shape={shape} dtype={dtype} blocksize={blocksize} nested={nested}")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    codes, state = KF.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    y = KF.dequantize_blockwise(codes, state)
    assert y.dtype == dtype and y.shape == x.shape
    again = KF.dequantize_blockwise(A=codes, quant_state=KF.QuantState.from_dict(state.as_dict(), device="cpu"))
    assert torch.equal(y, again)
    # block-wise error bound of an 8-bit dynamic map: within the block's absmax times the map's widest gap
    assert float((y.float() - x.float()).abs().max()) <= float(x.float().abs().max()) * 0.1 + 1e-6


BAD_QUANTIZE = [
    ("blocksize 0", lambda: ops.quantize_blockwise(torch.randn(10), blocksize=0), "blocksize"),
    ("blocksize bool", lambda: ops.quantize_blockwise(torch.randn(10), blocksize=True), "blocksize"),
    ("int input", lambda: ops.quantize_blockwise(torch.ones(10, dtype=torch.int32)), "quantize_blockwise"),
    (
        "float64 code",
        lambda: ops.quantize_blockwise(torch.randn(10), code=torch.zeros(256, dtype=torch.float64)),
        "code",
    ),
    ("short code", lambda: ops.quantize_blockwise(torch.randn(10), code=torch.zeros(255)), "code"),
    ("unsorted code", lambda: ops.quantize_blockwise(torch.randn(10), code=torch.randn(256)), "code"),
    ("nan code", lambda: ops.quantize_blockwise(torch.randn(10), code=torch.full((256,), float("nan"))), "code"),
    (
        "absmax size",
        lambda: ops.dequantize_blockwise(torch.zeros(600, dtype=torch.uint8), torch.ones(2), blocksize=256),
        "absmax",
    ),
    ("codes dtype", lambda: ops.dequantize_blockwise(torch.zeros(10), torch.ones(1), blocksize=256), "codes"),
    ("functional out", lambda: KF.quantize_blockwise(torch.randn(100), out=torch.zeros(99, dtype=torch.uint8)), "out"),
    ("functional state", lambda: KF.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8)), "quant_state"),
    ("dynamic map bits", lambda: KF.create_dynamic_map(True, 4, 40), "total_bits"),
]


@given(st.sampled_from(range(len(BAD_QUANTIZE))))
def test_malformed_quantize_calls_raise_naming_the_argument(index):
    label, call, name = BAD_QUANTIZE[index]
    note(f"malformed quantize: {label}")
    error = raises_clearly(call, name)
    assert error is not None, f"{label} was accepted"


@given(st.sampled_from([100, 5000]), st.sampled_from(["out_dtype", "out_shape", "absmax_dtype"]))
def test_a_rejected_functional_call_writes_nothing(n, defect):
    note(f"functional rejected n={n} defect={defect}")
    x = torch.randn(n)
    out = torch.full((n,), 7, dtype=torch.uint8)
    absmax = torch.full((-(-n // 4096),), 3.0)
    if defect == "out_dtype":
        out = out.to(torch.int16)
    elif defect == "out_shape":
        out = torch.full((n + 1,), 7, dtype=torch.uint8)
    else:
        absmax = absmax.double()
    before = (out.clone(), absmax.clone())
    assert raises_clearly(lambda: KF.quantize_blockwise(x, out=out, absmax=absmax), "quantize_blockwise") is not None
    assert torch.equal(out, before[0]) and torch.equal(absmax, before[1])
