"""Block-wise quantize / dequantize: kestrel beside bitsandbytes 0.50.2 and the plain-PyTorch reference.

`python -m kestrel bench --only quantize` prints the table; `pytest benchmarks/bench_quantize.py --benchmark-only`
runs the CPU microbenchmarks.
"""

import torch

from .harness import compare

# (elements, dtype) per device; one table for every run.
SHAPES = {
    "cpu": [
        (16 * 2**20, torch.float32),
        (16 * 2**20, torch.bfloat16),
        (16 * 2**20, torch.float16),
        (2**20, torch.float32),
    ],
    "cuda": [(256 * 2**20, torch.float32), (256 * 2**20, torch.bfloat16), (16 * 2**20, torch.float32)],
}
QUICK_SHAPES = [(2**18, torch.float32), (2**18, torch.bfloat16)]
BLOCKSIZE = 256
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def bnb_functional():
    try:
        import bitsandbytes.functional as F
    except Exception:  # not installed, or no backend for this device
        return None
    return F


def implementations(device):
    """name -> (quantize(x), dequantize(codes, absmax, dtype)) for every implementation available on device."""
    from kestrel import ops as KO  # kestrel's (codes, absmax) ops; kestrel.functional wraps them in bnb's form
    from kestrel.reference import quantize as ref

    code = KO.create_dynamic_map().to(device)
    impls = {
        "kestrel": (
            lambda x: KO.quantize_blockwise(x, code=code, blocksize=BLOCKSIZE),
            lambda c, a, dt: KO.dequantize_blockwise(c, a, code=code, blocksize=BLOCKSIZE, dtype=dt),
        ),
        "torch-reference": (
            lambda x: ref.quantize_blockwise(x, code, BLOCKSIZE),
            lambda c, a, dt: ref.dequantize_blockwise(c, a, code, BLOCKSIZE, dt),
        ),
    }
    F = bnb_functional()
    if F is not None:
        impls["bitsandbytes"] = (
            lambda x: F.quantize_blockwise(x, code=code, blocksize=BLOCKSIZE),
            lambda c, a, dt: torch.ops.bitsandbytes.dequantize_blockwise(c, a, code, BLOCKSIZE, dt),
        )
    return impls


def run(device, quick=False):
    device = torch.device(device)
    shapes = QUICK_SHAPES if quick else SHAPES["cuda" if device.type == "cuda" else "cpu"]
    impls = implementations(device)
    baselines = [name for name in ("bitsandbytes", "torch-reference") if name in impls]
    rows = []
    for n, dtype in shapes:
        x = torch.randn(n, device=device).to(dtype)
        codes, absmax = impls["kestrel"][0](x)
        elem = x.element_size()
        case = f"n={n} {DTYPE_NAMES[dtype]} bs={BLOCKSIZE}"
        quantize_bytes = n * elem + n + absmax.numel() * 4
        rows += compare(
            "quantize_blockwise",
            case,
            device,
            lambda: impls["kestrel"][0](x),
            [(name, (lambda q: lambda: q(x))(impls[name][0])) for name in baselines],
            quantize_bytes,
        )
        rows += compare(
            "dequantize_blockwise",
            case,
            device,
            lambda: impls["kestrel"][1](codes, absmax, dtype),
            [(name, (lambda d: lambda: d(codes, absmax, dtype))(impls[name][1])) for name in baselines],
            quantize_bytes,
        )
    return rows


try:  # pytest-benchmark microbenchmarks (CPU); only when pytest is around
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["kestrel", "bitsandbytes", "torch-reference"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_quantize_blockwise_cpu(benchmark, impl, dtype):
        impls = implementations("cpu")
        if impl not in impls:
            pytest.skip(f"{impl} is not installed")
        x = torch.randn(16 * 2**20).to(dtype)
        benchmark.group = f"quantize_blockwise 16M {DTYPE_NAMES[dtype]}"
        benchmark.pedantic(impls[impl][0], args=(x,), rounds=5, warmup_rounds=1)

    @pytest.mark.parametrize("impl", ["kestrel", "bitsandbytes", "torch-reference"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_dequantize_blockwise_cpu(benchmark, impl, dtype):
        impls = implementations("cpu")
        if impl not in impls:
            pytest.skip(f"{impl} is not installed")
        codes, absmax = impls["kestrel"][0](torch.randn(16 * 2**20))
        benchmark.group = f"dequantize_blockwise 16M {DTYPE_NAMES[dtype]}"
        benchmark.pedantic(impls[impl][1], args=(codes, absmax, dtype), rounds=5, warmup_rounds=1)
