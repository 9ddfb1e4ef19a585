"""One optimizer step: kestrel's 8-bit optimizers beside bitsandbytes' and the torch optimizer each replaces.

AdamW8bit: CPU, one tensor of 16.8M parameters, fp32 and bf16 (2 threads on the development machine); GPU, the
1.30B-parameter LLM tensor mix of llm_shapes() (218 tensors: 24 layers, d 2048, ff 5632, vocab 32000), bf16 and
fp32, beside bnb and torch's fused AdamW. The rest of the family (SGD8bit, RMSprop8bit, Adagrad8bit, Lion8bit,
AdEMAMix8bit, LAMB8bit, LARS8bit): 16.8M fp32 and bf16 parameters on the CPU, 268M bf16 on a GPU. On the CPU each
kestrel row also times the narrower vector paths the CPU has ("kestrel, avx2 path": KESTREL_CPU_ISA caps it).
GB/s counts the bytes an 8-bit step must move: parameter read + write, gradient read, each 8-bit state read + write
and its absmax. Muon8bit (run_muon): beside torch.optim.Muon and Muon32bit on a transformer's matrices. AdamW4bit
(run_4bit): beside torchao's AdamW4bit where torchao installs, AdamW8bit and torch's fused AdamW.
"""

import os

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

    makers = {
        "kestrel": lambda ps: AdamW8bit(ps, lr=1e-4),
        # the opt-in rounding that bounds a gradient spike's damage: the same kernel, one more select per state
        "kestrel robust_rounding=True": lambda ps: AdamW8bit(ps, lr=1e-4, robust_rounding=True),
    }
    try:
        import bitsandbytes as bnb

        makers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
    except Exception:  # not installed
        pass
    makers["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
    return makers


def family(device):
    """(name, number of 8-bit states, kestrel maker, [(baseline name, maker)])."""
    from kestrel import optim as K

    try:
        import bitsandbytes as bnb

        B = bnb.optim
    except Exception:  # not installed
        B = None
    # the torch optimizer each replaces: fused where torch has a fused kernel (SGD and Adagrad, on the CPU too), else
    # foreach (RMSprop)
    rows = [
        (
            "SGD8bit",
            1,
            lambda ps: K.SGD8bit(ps, lr=1e-3, momentum=0.9),
            [
                ("bitsandbytes SGD8bit", B and (lambda ps: B.SGD8bit(ps, lr=1e-3, momentum=0.9))),
                ("torch SGD fused", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)),
            ],
        ),
        (
            "RMSprop8bit",
            1,
            lambda ps: K.RMSprop8bit(ps, lr=1e-3),
            [
                ("bitsandbytes RMSprop8bit", B and (lambda ps: B.RMSprop8bit(ps, lr=1e-3))),
                ("torch RMSprop foreach", lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True)),
            ],
        ),
        (
            "Adagrad8bit",
            1,
            lambda ps: K.Adagrad8bit(ps, lr=1e-3),
            [
                ("bitsandbytes Adagrad8bit", B and (lambda ps: B.Adagrad8bit(ps, lr=1e-3))),
                ("torch Adagrad fused", lambda ps: torch.optim.Adagrad(ps, lr=1e-3, fused=True)),
            ],
        ),
        (
            "Lion8bit",
            1,
            lambda ps: K.Lion8bit(ps, lr=1e-4),
            [("bitsandbytes Lion8bit", B and (lambda ps: B.Lion8bit(ps, lr=1e-4)))],
        ),
        (
            "AdEMAMix8bit",
            3,
            lambda ps: K.AdEMAMix8bit(ps, lr=1e-4),
            [("bitsandbytes AdEMAMix8bit", B and (lambda ps: B.AdEMAMix8bit(ps, lr=1e-4)))],
        ),
        # LAMB / LARS: kestrel's step includes the trust ratio's norm pass (a second read of everything); bnb's 8-bit
        # LAMB/LARS skip the ratio, its 32-bit ones apply it; torch has neither
        (
            "LAMB8bit",
            2,
            lambda ps: K.LAMB8bit(ps, lr=1e-3),
            [
                ("bitsandbytes LAMB8bit (no trust ratio)", B and (lambda ps: B.LAMB8bit(ps, lr=1e-3))),
                ("bitsandbytes LAMB32bit", B and (lambda ps: B.LAMB32bit(ps, lr=1e-3))),
            ],
        ),
        (
            "LARS8bit",
            1,
            lambda ps: K.LARS8bit(ps, lr=1e-2, momentum=0.9),
            [
                ("bitsandbytes LARS8bit (no trust ratio)", B and (lambda ps: B.LARS8bit(ps, lr=1e-2, momentum=0.9))),
                ("bitsandbytes LARS32bit", B and (lambda ps: B.LARS32bit(ps, lr=1e-2, momentum=0.9))),
            ],
        ),
    ]
    return [(name, states, make, [(b, m) for b, m in baselines if m]) for name, states, make, baselines in rows]


def capped_paths(device, dtype):
    """On the CPU, the narrower vector paths this CPU has beside the one kestrel picks (KESTREL_CPU_ISA caps it), less
    those that run the same kernels for `dtype` (avx512bf16 differs from avx512vbmi in bf16 parameters alone)."""
    if device.type != "cpu":
        return []
    import kestrel

    if not kestrel._ext.available():
        return []
    best = kestrel._C.cpu_isa()
    order = ["avx512bf16", "avx512vbmi", "avx512", "avx2", "scalar"]
    if best not in order:
        return []
    paths = [isa for isa in order[order.index(best) + 1 :] if isa != "scalar"]
    if best == "avx512bf16" and dtype != torch.bfloat16:
        paths.remove("avx512vbmi")
    return paths


def with_isa(step, isa):
    """step() with the CPU vector path capped at `isa`."""

    def run():
        old = os.environ.get("KESTREL_CPU_ISA")
        os.environ["KESTREL_CPU_ISA"] = isa
        try:
            step()
        finally:
            if old is None:
                del os.environ["KESTREL_CPU_ISA"]
            else:
                os.environ["KESTREL_CPU_ISA"] = old

    return run


def run_family(device, quick=False):
    shapes = [(1 << 20,)] if quick else ([(268_435_456,)] if device.type == "cuda" else [(16_777_216,)])
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    rows = []
    for (name, states, make, baselines), dtype in [(row, dtype) for dtype in dtypes for row in family(device)]:
        steps = {}
        for label, maker in [("kestrel", make)] + baselines:
            params = make_params(shapes, dtype, device)
            opt = maker(params)
            opt.step()
            steps[label] = opt.step
        for isa in capped_paths(device, dtype):  # the same kestrel optimizer on the narrower paths
            steps[f"kestrel, {isa} path"] = with_isa(steps["kestrel"], isa)
        n = sum(torch.Size(s).numel() for s in shapes)
        nbytes = n * (3 * torch.tensor([], dtype=dtype).element_size() + 2 * states) + states * 2 * 4 * (
            (n + 255) // 256
        )
        rows += compare(
            f"{name} step",
            f"{n / 1e6:.1f}M params {DTYPE_NAMES[dtype]}",
            device,
            steps["kestrel"],
            [(label, fn) for label, fn in steps.items() if label != "kestrel"],
            nbytes,
            repeats=15 if device.type == "cpu" else 10,
        )
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def muon_shapes(layers, d, ff):
    """The matrices Muon takes in a transformer (attention q, k, v, o and the gated MLP's three)."""
    return [(d, d)] * 4 * layers + [(ff, d), (ff, d), (d, ff)] * layers


def run_muon(device, quick=False):
    """Muon8bit beside torch.optim.Muon (float32 momentum, bfloat16 Newton-Schulz) and Muon32bit, on the matrices of
    a small transformer: 2 layers of d 512 on the CPU (5.3M parameters, float32), the 1.30B mix's 168 matrices on a GPU
    (bf16). A step is the momentum kernel plus five Newton-Schulz iterations per matrix (matmuls: compute-bound), so
    GB/s is not the measure here; the state size is printed beside."""
    from kestrel import optim as K

    if quick:
        shapes, dtype = muon_shapes(1, 128, 352), torch.float32
    elif device.type == "cuda":
        shapes, dtype = muon_shapes(24, 2048, 5632), torch.bfloat16
    else:
        shapes, dtype = muon_shapes(2, 512, 1408), torch.float32
    makers = {
        "kestrel Muon8bit": lambda ps: K.Muon8bit(ps, lr=0.02),
        "torch Muon": lambda ps: torch.optim.Muon(ps, lr=0.02) if hasattr(torch.optim, "Muon") else None,
        "kestrel Muon32bit": lambda ps: K.Muon32bit(ps, lr=0.02),
    }
    if device.type == "cpu":  # torch's Muon runs Newton-Schulz in bfloat16 on the CPU too: the same precision
        makers["kestrel Muon8bit, ns_dtype=bfloat16"] = lambda ps: K.Muon8bit(ps, lr=0.02, ns_dtype=torch.bfloat16)
    steps = {}
    for label, make in makers.items():
        params = make_params(shapes, dtype, device)
        opt = make(params)
        if opt is None:
            continue
        opt.step()
        state = state_bytes_per_param(opt, params)
        print(f"{label} state: {state:.3f} bytes/param ({len(shapes)} matrices, {DTYPE_NAMES[dtype]})")
        steps[label] = opt.step
    n = sum(torch.Size(s).numel() for s in shapes)
    nbytes = n * (3 * torch.tensor([], dtype=dtype).element_size() + 2) + 2 * 4 * ((n + 255) // 256)
    rows = compare(
        "Muon8bit step",
        f"{n / 1e6:.1f}M params in {len(shapes)} matrices {DTYPE_NAMES[dtype]}",
        device,
        steps.pop("kestrel Muon8bit"),
        list(steps.items()),
        nbytes,
        repeats=3 if device.type == "cpu" else 10,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_4bit(device, quick=False):
    """AdamW4bit beside torchao's AdamW4bit (where torchao installs), kestrel's AdamW8bit and torch's fused AdamW:
    16.8M fp32 parameters on the CPU, the 1.30B LLM mix in bf16 on a GPU. GB/s counts the 4-bit step's bytes:
    parameter read + write, gradient read, two 4-bit states read + written and their absmax."""
    from kestrel import optim as K

    if quick:
        shapes, dtype = [(1 << 20,)], torch.float32
    elif device.type == "cuda":
        shapes, dtype = llm_shapes(), torch.bfloat16
    else:
        shapes, dtype = [(16_777_216,)], torch.float32
    makers = {
        "kestrel AdamW4bit": lambda ps: K.AdamW4bit(ps, lr=1e-4),
        "kestrel AdamW8bit": lambda ps: K.AdamW8bit(ps, lr=1e-4),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    try:
        from torchao.optim import AdamW4bit as TorchaoAdamW4bit

        makers["torchao AdamW4bit"] = lambda ps: TorchaoAdamW4bit(ps, lr=1e-4)
    except Exception:  # not installed
        pass
    steps = {}
    for label, make in makers.items():
        params = make_params(shapes, dtype, device)
        opt = make(params)
        opt.step()
        if label.startswith("kestrel"):
            print(f"{label} state: {state_bytes_per_param(opt, params):.4f} bytes/param")
        steps[label] = opt.step
    n = sum(torch.Size(s).numel() for s in shapes)
    nbytes = n * (3 * torch.tensor([], dtype=dtype).element_size() + 2) + 2 * 2 * 4 * ((n + 127) // 128)
    rows = compare(
        "AdamW4bit step",
        f"{n / 1e6:.1f}M params {DTYPE_NAMES[dtype]}",
        device,
        steps.pop("kestrel AdamW4bit"),
        list(steps.items()),
        nbytes,
        repeats=5 if device.type == "cpu" else 10,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


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
            if name == "kestrel":
                for isa in capped_paths(device, dtype):  # the same optimizer on the narrower paths
                    steps[f"kestrel, {isa} path"] = with_isa(opt.step, isa)
        n = sum(torch.Size(s).numel() for s in shapes)
        nbytes = n * (3 * torch.tensor([], dtype=dtype).element_size() + 4) + 2 * 2 * 4 * ((n + 255) // 256)
        repeats = 15 if device.type == "cpu" else 10
        baselines = [(name, fn) for name, fn in steps.items() if name != "kestrel"]
        rows += compare(
            "AdamW8bit step",
            f"{label} {DTYPE_NAMES[dtype]}",
            device,
            steps["kestrel"],
            baselines,
            nbytes,
            repeats=repeats,
        )
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows + run_family(device, quick) + run_muon(device, quick) + run_4bit(device, quick)


try:  # pytest-benchmark microbenchmarks (CPU)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize(
        "impl", ["kestrel", "kestrel robust_rounding=True", "bitsandbytes AdamW8bit", "torch AdamW fused"]
    )
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
