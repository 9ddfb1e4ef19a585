"""kestrel.functional against bitsandbytes.functional 0.50 (installed, CPU backend): the same calls on both.

Dequantizing is compared bit for bit; quantized codes are compared as tests/test_quantize.py does (bnb's CPU
quantizer is approximate: ours is never farther from the input, except on an exact float32 midpoint). The last
tests are kestrel's argument checks (a bad call raises, naming the argument, and writes nothing).
"""

import inspect

import pytest
import torch
from helpers import FLOAT_DTYPES

import kestrel
from kestrel import functional as KF
from kestrel.reference import quantize as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

BLOCKSIZES = [64, 256, 4096, 16384, 100]


@pytest.fixture(scope="module")
def F():
    return pytest.importorskip("bitsandbytes.functional")


def make_input(n, dtype, seed=0):
    """Gaussian values with per-chunk scales from 1e-6 to 1e2 and a zero chunk."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    scales = 10.0 ** torch.empty((n + 63) // 64, dtype=torch.float64).uniform_(-6, 2, generator=g)
    x = x * scales.repeat_interleave(64)[:n]
    x[128:192] = 0.0
    return x.to(dtype)


def assert_never_farther(x, blocksize, codes, other_codes, code):
    """codes are never farther from x * (1/absmax) than other_codes, except on an exact float32 midpoint."""
    _, v = ref.absmax_and_normalized(x, blocksize)
    ours = (v.double() - code.double()[codes.reshape(-1).long()]).abs()
    theirs = (v.double() - code.double()[other_codes.reshape(-1).long()]).abs()
    farther = ours > theirs
    assert bool(torch.isin(v[farther], (code[:-1] + code[1:]) * 0.5).all())


@pytest.mark.parametrize("name", ["create_dynamic_map", "quantize_blockwise", "dequantize_blockwise"])
def test_signatures_match(F, name):
    ours, theirs = inspect.signature(getattr(KF, name)), inspect.signature(getattr(F, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]


def test_quant_state_constructor_matches(F):
    ours, theirs = inspect.signature(KF.QuantState.__init__), inspect.signature(F.QuantState.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_and_state_match(F, dtype, blocksize, nested):
    x = make_input(50_003, dtype, seed=blocksize)
    codes, state = KF.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    bnb_codes, bnb_state = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert isinstance(state, KF.QuantState)
    for attr in ("blocksize", "dtype", "shape", "nested", "quant_type"):
        assert getattr(state, attr) == getattr(bnb_state, attr), attr
    assert torch.equal(state.code, bnb_state.code)
    code = state.code
    assert_never_farther(x, blocksize, codes, bnb_codes, code)
    if not nested:
        assert state.absmax.dtype == torch.float32 and torch.equal(state.absmax, bnb_state.absmax)
        assert state.offset is None and state.state2 is None
    else:
        # absmax - mean(absmax) is quantized again with the signed map, in blocks of the same size.
        assert state.absmax.dtype == torch.uint8 and state.offset.dtype == torch.float32
        assert torch.equal(state.offset, bnb_state.offset)
        for attr in ("blocksize", "dtype", "nested"):
            assert getattr(state.state2, attr) == getattr(bnb_state.state2, attr), attr
        assert torch.equal(state.state2.absmax, bnb_state.state2.absmax)
        assert torch.equal(state.state2.code, bnb_state.state2.code)
        _, plain = KF.quantize_blockwise(x, blocksize=blocksize)
        assert_never_farther(plain.absmax - state.offset, blocksize, state.absmax, bnb_state.absmax, code)
    # The state's map is a copy: writing to it changes no later call.
    state.code.zero_()
    assert torch.equal(KF.quantize_blockwise(x, blocksize=blocksize, nested=nested)[0], codes)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_bit_for_bit(F, dtype, blocksize, nested):
    x = make_input(30_001, dtype, seed=7 + blocksize)
    for codes, state in (
        F.quantize_blockwise(x, blocksize=blocksize, nested=nested),
        KF.quantize_blockwise(x, blocksize=blocksize, nested=nested),
    ):
        # Each library's state in both libraries' dequantize (bnb reads kestrel's QuantState as its own).
        expected = F.dequantize_blockwise(codes, state)
        for got in (KF.dequantize_blockwise(codes, state), KF.dequantize_blockwise(A=codes, quant_state=state)):
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, expected)
        out = torch.empty(x.shape, dtype=dtype)
        assert KF.dequantize_blockwise(codes, state, out=out) is out and torch.equal(out, expected)


@pytest.mark.parametrize("blocksize", [64, 4096, 16384])
def test_keyword_forms(F, blocksize):
    x = make_input(20_000, torch.float32, seed=3)
    code = KF.create_dynamic_map(signed=False)
    xa = x.abs()
    codes, state = KF.quantize_blockwise(A=xa, code=code, blocksize=blocksize)
    bnb_codes, bnb_state = F.quantize_blockwise(A=xa, code=code, blocksize=blocksize)
    assert torch.equal(state.absmax, bnb_state.absmax) and torch.equal(state.code, code)
    # absmax=/code=/blocksize= without a state: float32 output, as in bnb.
    expected = F.dequantize_blockwise(A=bnb_codes, absmax=bnb_state.absmax, code=code, blocksize=blocksize)
    got = KF.dequantize_blockwise(A=bnb_codes, absmax=bnb_state.absmax, code=code, blocksize=blocksize)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(KF.dequantize_blockwise(bnb_codes, None, bnb_state.absmax, code, None, blocksize), expected)
    # With a state, absmax/code/blocksize are ignored (bnb's rule).
    assert torch.equal(
        KF.dequantize_blockwise(
            bnb_codes, quant_state=bnb_state, absmax=torch.zeros(3), code=torch.zeros(256), blocksize=7
        ),
        expected,
    )
    # out= and absmax= buffers for quantize (bnb copies into them; here they must already fit).
    out, absmax = torch.empty(x.shape, dtype=torch.uint8), torch.empty(state.absmax.shape)
    bnb_out, bnb_absmax = torch.empty_like(out), torch.empty_like(absmax)
    got_codes, got_state = KF.quantize_blockwise(xa, code, absmax, out, blocksize)
    F.quantize_blockwise(xa, code, bnb_absmax, bnb_out, blocksize)
    assert got_codes is out and got_state.absmax is absmax
    assert torch.equal(absmax, bnb_absmax) and torch.equal(out, codes)
    # dequantize out=: bnb's CPU backend has no out= kernel; kestrel's result equals bnb's plain one.
    result = torch.empty(x.shape)
    assert KF.dequantize_blockwise(codes, state, out=result) is result
    assert torch.equal(result, F.dequantize_blockwise(codes, bnb_state))
    with pytest.raises(NotImplementedError):
        F.dequantize_blockwise(codes, bnb_state, out=torch.empty(x.shape))


def test_defaults(F):
    x = make_input(10_000, torch.bfloat16)
    codes, state = KF.quantize_blockwise(x)
    bnb_codes, bnb_state = F.quantize_blockwise(x)
    assert state.blocksize == bnb_state.blocksize == 4096 and state.absmax.shape == (3,)
    assert torch.equal(state.code, KF.create_dynamic_map()) and torch.equal(state.absmax, bnb_state.absmax)
    assert torch.equal(
        KF.dequantize_blockwise(codes, absmax=state.absmax), F.dequantize_blockwise(codes, absmax=state.absmax)
    )
    assert KF.dequantize_blockwise(codes, state).dtype == torch.bfloat16


def test_nested_absmax_buffer(F):
    x = make_input(40_000, torch.float16)
    codes, state = KF.quantize_blockwise(x, blocksize=256, nested=True)
    buffer = torch.empty(157, dtype=torch.uint8)
    got_codes, got_state = KF.quantize_blockwise(x, absmax=buffer, blocksize=256, nested=True)
    assert got_state.absmax is buffer and torch.equal(buffer, state.absmax)
    assert torch.equal(KF.dequantize_blockwise(got_codes, got_state), KF.dequantize_blockwise(codes, state))
    # bnb copies the uint8 codes into a float32 buffer, and its own dequantize then rejects the state.
    with pytest.raises(ValueError, match=r"quantize_blockwise: absmax must be torch.uint8, got torch.float32"):
        KF.quantize_blockwise(x, absmax=torch.empty(157), blocksize=256, nested=True)
    _, bnb_state = F.quantize_blockwise(x, absmax=torch.empty(157), blocksize=256, nested=True)
    with pytest.raises(ValueError):
        F.dequantize_blockwise(codes, bnb_state)


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_round_trip(F, nested):
    x = make_input(9_000, torch.bfloat16)
    codes, state = KF.quantize_blockwise(x, blocksize=512, nested=nested)
    expected = KF.dequantize_blockwise(codes, state)
    as_dict = state.as_dict()
    assert as_dict["dtype"] == "bfloat16" and as_dict["blocksize"] == 512 and as_dict["quant_type"] is None
    assert as_dict.keys() == F.quantize_blockwise(x, blocksize=512, nested=nested)[1].as_dict().keys()
    for cls in (KF.QuantState, F.QuantState):  # each library reads the other's dict
        restored = cls.from_dict(dict(as_dict), device=torch.device("cpu"))
        assert torch.equal(KF.dequantize_blockwise(codes, restored), expected)
    restored = KF.QuantState.from_dict(F.quantize_blockwise(x, blocksize=512, nested=nested)[1].as_dict(), "cpu")
    assert restored.nested == nested and restored.blocksize == 512 and restored.dtype == torch.bfloat16
    assert state == KF.QuantState.from_dict(as_dict, "cpu")
    assert state[3] == 512 and state[2] == torch.bfloat16 and (state[4] is None) == (not nested)
    # The packed form (bnb's 4-bit layout, with quant_type set) round-trips too.
    state.quant_type = "nf4"
    packed = state.as_dict(packed=True)
    assert "quant_state.bitsandbytes__nf4" in packed
    assert KF.QuantState.from_dict({"w." + k: v for k, v in packed.items()}, "cpu") == state
    assert F.QuantState.from_dict(dict(packed), torch.device("cpu")).blocksize == 512


def test_from_dict_names_missing_and_unknown_keys():
    _, state = KF.quantize_blockwise(make_input(5000, torch.float32), blocksize=256, nested=True)
    as_dict = state.as_dict()
    with pytest.raises(ValueError, match=r"QuantState.from_dict: missing keys \['nested_offset'\]"):
        KF.QuantState.from_dict({k: v for k, v in as_dict.items() if k != "nested_offset"}, "cpu")
    with pytest.raises(ValueError, match=r"QuantState.from_dict: unknown keys \['extra'\]"):
        KF.QuantState.from_dict({**as_dict, "extra": 1}, "cpu")
    with pytest.raises(ValueError, match=r"expected packed or unpacked quant_state items, found neither"):
        KF.QuantState.from_dict({k: v for k, v in as_dict.items() if k != "quant_type"}, "cpu")


def test_to_moves_in_place():
    _, state = KF.quantize_blockwise(make_input(5000, torch.float32), blocksize=256, nested=True)
    assert state.to("cpu") is None and state.absmax.device.type == "cpu"


# bnb's own tests (tests/test_functional.py of bitsandbytes 0.50), the CPU cases, run on kestrel.functional.


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_bnb_suite_dynamic_blockwise_quantization(signed, nested):
    for i in range(2):
        x = torch.randn(1024, 1024)
        codes, state = KF.quantize_blockwise(x, blocksize=256, nested=nested)
        if i == 0:
            state = KF.QuantState.from_dict(state.as_dict(), device=torch.device("cpu"))
        y = KF.dequantize_blockwise(codes, state)
        diff = (x - y).abs()
        assert diff.mean().item() < 0.011 and (diff / (x + 1e-8).abs()).mean().item() < 0.018
        assert y.dtype == x.dtype
    x = torch.rand(1024, 1024)
    codes, state = KF.quantize_blockwise(x, blocksize=256, nested=nested, code=KF.create_dynamic_map(signed=signed))
    diff = (x - KF.dequantize_blockwise(codes, state)).abs()
    assert diff.mean().item() < (0.0036 if signed else 0.0023)


@pytest.mark.parametrize("blocksize", [4096, 16384])
def test_bnb_suite_blockwise_cpu_large(blocksize):
    x = torch.randn(128, 128, 128)
    codes, state = KF.quantize_blockwise(x, blocksize=blocksize)
    y = KF.dequantize_blockwise(codes, state, blocksize=blocksize)
    assert (x - y).abs().mean().item() < 0.011


@pytest.mark.parametrize("bits", range(2, 9))
def test_bnb_suite_few_bit_dynamic_map(bits):
    code = KF.create_dynamic_map(True, bits - 0, bits)
    assert torch.unique(code).numel() in [2**bits, 2**bits - 1] and code.numel() == 256
    values = torch.randn(1, 32)
    values /= values.abs().max()
    codes, state = KF.quantize_blockwise(values, code=code)
    nearest = (values.reshape(-1, 1) - code).abs().argmin(dim=1)
    # bnb's test compares with argmin |v - code|; on a tie argmin takes the first index, as our midpoint rule does.
    assert torch.equal(code[codes.reshape(-1).long()], code[nearest])
    assert torch.equal(KF.dequantize_blockwise(codes, state), (code[codes.long()] * state.absmax))


# kestrel's checks: clear errors, nothing written by a rejected call.


def test_quantize_rejects_bad_arguments_and_writes_nothing():
    x = make_input(1000, torch.float32)
    out = torch.full((1000,), 7, dtype=torch.uint8)
    absmax = torch.full((4,), 7.0)
    cases = [
        (dict(A=x.double()), ValueError, r"A must be float32, float16 or bfloat16, got torch.float64"),
        (dict(A=x.numpy()), TypeError, r"A must be a torch.Tensor, got ndarray"),
        (dict(A=x, blocksize=0), ValueError, r"blocksize must be a positive integer.*got 0"),
        (dict(A=x, blocksize=256.0), TypeError, r"blocksize must be a positive integer, got 256.0"),
        (dict(A=x, nested="yes"), TypeError, r"nested must be a bool, got 'yes'"),
        (dict(A=x, code=torch.zeros(256, dtype=torch.float64)), ValueError, r"code must be float32, got torch.float64"),
        (dict(A=x, code=torch.zeros(128)), ValueError, r"code must have shape \(256,\), got \(128,\)"),
        (dict(A=x, code=KF.create_dynamic_map().flip(0)), ValueError, r"code must be sorted ascending"),
        (dict(A=x, out=torch.empty(1000)), ValueError, r"out must be torch.uint8, got torch.float32"),
        (
            dict(A=x, out=torch.empty(999, dtype=torch.uint8)),
            ValueError,
            r"out must have shape \(1000,\), got \(999,\)",
        ),
        (
            dict(A=x, out=out, absmax=torch.empty(3)),
            ValueError,
            r"absmax must hold ceil\(1000 / 256\) = 4 values, got 3",
        ),
        (
            dict(A=x, out=out, absmax=torch.empty(4, dtype=torch.float16)),
            ValueError,
            r"absmax must be torch.float32, got torch.float16",
        ),
        (dict(A=x, out=out, absmax=torch.empty(4, device="meta")), ValueError, r"absmax must be on cpu, got meta"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"blocksize": 256, **kwargs}
        with pytest.raises(error, match="quantize_blockwise: " + match):
            KF.quantize_blockwise(**kwargs)
        assert bool((out == 7).all()) and bool((absmax == 7.0).all())


def test_dequantize_rejects_bad_arguments_and_writes_nothing(F):
    x = make_input(1000, torch.float32)
    codes, state = KF.quantize_blockwise(x, blocksize=256)
    _, nested = KF.quantize_blockwise(x, blocksize=256, nested=True)
    out = torch.full((1000,), 7.0)
    cases = [
        (dict(A=codes), ValueError, r"needs quant_state or absmax, got neither"),
        (dict(A=codes.long(), quant_state=state), ValueError, r"A must be uint8, got torch.int64"),
        (dict(A=codes, quant_state=state.absmax), TypeError, r"quant_state must be a QuantState .* got a Tensor"),
        (dict(A=codes, quant_state=object()), TypeError, r"quant_state must be a QuantState, got object"),
        (
            dict(A=codes, absmax=state.absmax[:3], blocksize=256),
            ValueError,
            r"absmax must hold ceil\(1000 / 256\) = 4 values, got 3",
        ),
        (dict(A=codes, absmax=state.absmax), ValueError, r"absmax must hold ceil\(1000 / 4096\) = 1 values, got 4"),
        (dict(A=codes, absmax=state.absmax.half(), blocksize=256), ValueError, r"absmax must be torch.float32"),
        (dict(A=codes, absmax=state.absmax, blocksize=-1), ValueError, r"blocksize must be a positive integer"),
        (
            dict(A=codes, absmax=state.absmax, blocksize=256, code=torch.zeros(3)),
            ValueError,
            r"code must have shape \(256,\), got \(3,\)",
        ),
        (dict(A=codes[:500], quant_state=state), ValueError, r"quant_state.absmax must hold ceil\(500 / 256\) = 2"),
        (
            dict(A=codes, quant_state=state, out=torch.empty(1000, dtype=torch.float16)),
            ValueError,
            r"out must be torch.float32, got torch.float16",
        ),
        (
            dict(A=codes, quant_state=state, out=torch.empty(10, 100)),
            ValueError,
            r"out must have shape \(1000,\), got \(10, 100\)",
        ),
        (
            dict(
                A=codes,
                quant_state=KF.QuantState(
                    nested.absmax, code=nested.code, blocksize=256, dtype=torch.float32, state2=nested.state2
                ),
            ),
            ValueError,
            r"quant_state is nested but its offset is None",
        ),
        (
            dict(A=codes, quant_state=KF.QuantState(state.absmax, code=state.code, blocksize=256, dtype=torch.int8)),
            ValueError,
            r"quant_state.dtype must be float32, float16 or bfloat16, got torch.int8",
        ),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match="dequantize_blockwise: " + match):
            KF.dequantize_blockwise(**kwargs, **({} if "out" in kwargs else {"out": out}))
        assert bool((out == 7.0).all())
    # A bitsandbytes state is read like ours (and checked the same way).
    _, bnb_state = F.quantize_blockwise(x, blocksize=256)
    with pytest.raises(ValueError, match=r"quant_state.absmax must hold ceil\(500 / 256\) = 2 values, got 4"):
        KF.dequantize_blockwise(codes[:500], bnb_state)


def test_non_finite_input_keeps_finite_neighbours(F):
    # Deliberate difference: bnb's CPU quantizer makes a block holding +-inf decode to +-inf everywhere.
    x = make_input(512, torch.float32)
    x[3], x[300], x[301] = float("inf"), float("-inf"), float("nan")
    codes, state = KF.quantize_blockwise(x, blocksize=256)
    y = KF.dequantize_blockwise(codes, state)
    finite = torch.isfinite(x)
    assert bool(torch.isfinite(y).all())
    assert y[3].item() == state.absmax[0].item() and y[301].item() == 0.0
    assert (y - x)[finite].abs().max().item() <= 0.02 * state.absmax.max().item()
    assert bool(torch.isinf(F.dequantize_blockwise(*F.quantize_blockwise(x, blocksize=256))).all())


def test_nested_mean_does_not_overflow(F):
    # Deliberate difference: with absmax values near the float32 maximum, bnb's float32 mean overflows to inf and the
    # nested state decodes to NaN; ours takes the mean in float64 there.
    x = torch.full((64 * 100,), 3e38)
    x[::7] = -1e38
    codes, state = KF.quantize_blockwise(x, blocksize=64, nested=True)
    assert bool(torch.isfinite(state.offset)) and state.offset.item() == torch.tensor(3e38).item()
    y = KF.dequantize_blockwise(codes, state)
    assert bool(torch.isfinite(y).all()) and ((y - x).abs() <= 0.02 * 3e38).all()
    bnb_codes, bnb_state = F.quantize_blockwise(x, blocksize=64, nested=True)
    assert bnb_state.offset.item() == float("inf") and bool(F.dequantize_blockwise(bnb_codes, bnb_state).isnan().all())


def test_empty_and_scalar_inputs(F):
    for shape in ((0,), (3, 0), ()):
        x = torch.ones(shape)
        codes, state = KF.quantize_blockwise(x, blocksize=64, nested=True)
        assert codes.shape == x.shape
        y = KF.dequantize_blockwise(codes, state)
        assert y.shape == x.shape and torch.equal(y, x)


def test_compile_fullgraph():
    torch._dynamo.reset()

    def round_trip(x):
        codes, state = KF.quantize_blockwise(x, blocksize=128, nested=True)
        return KF.dequantize_blockwise(codes, state), codes

    compiled = torch.compile(round_trip, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = make_input(3000, dtype).reshape(30, 100)
        for got, expected in zip(compiled(x), round_trip(x)):
            assert torch.equal(got, expected)
