"""One optimizer step: kestrel AdamW8bit beside bitsandbytes AdamW8bit and torch's fused AdamW (32-bit state).

CPU: one tensor of 16.8M parameters, fp32 and bf16 (2 threads on the development machine).
GPU: the 1.30B-parameter LLM tensor mix of shared/bench/device_anchors.py (218 tensors), bf16 and fp32.
GB/s counts the bytes an 8-bit step must move: parameter read + write, gradient read, both 8-bit states read +
write and their absmax (16.06 B/param for fp32, 10.06 for bf16).
"""

import torch

from .harness import compare

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def llm_shapes(layers=24, d=2048, ff=5632, vocab=32000):
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)] + [(d,), (d,)]
    return shapes + [(d,)]


CASES = {
    "cpu": [("16.8M params", [(16_777_216,)], dtype) for dtype in (torch.float32, torch.bfloat16)],
    "cuda": [("1.30B LLM mix", llm_shapes(), dtype) for dtype in (torch.bfloat16, torch.float32)],
}
QUICK_CASES = [("1M params", [(1 << 20,)], torch.float32)]


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(dtype).to(device))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(dtype).to(device)
        params.append(p)
    return params


def optimizers(device):
    from kestrel.optim import AdamW8bit

    makers = {"kestrel": lambda ps: AdamW8bit(ps, lr=1e-4)}
    try:
        import bitsandbytes as bnb

        makers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
    except Exception:  # not installed
        pass
    makers["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
    return makers


def state_bytes_per_param(opt, params):
    total = 0
    seen = set()
    for p in params:
        for value in opt.state[p].values():
            if torch.is_tensor(value) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total / sum(p.numel() for p in params)


def run(device, quick=False):
    device = torch.device(device)
    cases = QUICK_CASES if quick else CASES["cuda" if device.type == "cuda" else "cpu"]
    makers = optimizers(device)
    rows = []
    for label, shapes, dtype in cases:
        # one parameter set per optimizer, so each keeps its own state; the baselines are timed in the same run
        steps = {}
        for name, make in makers.items():
            params = make_params(shapes, dtype, device)
            opt = make(params)
            opt.step()
            if name == "kestrel":
                print(f"kestrel AdamW8bit state: {state_bytes_per_param(opt, params):.3f} bytes/param ({label})")
            steps[name] = opt.step
        n = sum(torch.Size(s).numel() for s in shapes)
        nbytes = n * (3 * torch.tensor([], dtype=dtype).element_size() + 4) + 2 * 2 * 4 * ((n + 255) // 256)
        repeats = 5 if device.type == "cpu" else 10
        baselines = [(name, fn) for name, fn in steps.items() if name != "kestrel"]
        rows += compare("AdamW8bit step", f"{label} {DTYPE_NAMES[dtype]}", device, steps["kestrel"], baselines,
                        nbytes, repeats=repeats)
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


try:  # pytest-benchmark microbenchmarks (CPU)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["kestrel", "bitsandbytes AdamW8bit", "torch AdamW fused"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_adamw_step_cpu(benchmark, impl, dtype):
        makers = optimizers("cpu")
        if impl not in makers:
            pytest.skip(f"{impl} is not installed")
        params = make_params([(16_777_216,)], dtype, "cpu")
        opt = makers[impl](params)
        opt.step()
        benchmark.group = f"AdamW step 16.8M {DTYPE_NAMES[dtype]}"
        benchmark.pedantic(opt.step, rounds=5, warmup_rounds=1)
