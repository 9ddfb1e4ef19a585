"""The CPU vector paths of the 8-bit optimizers (AVX-512 with VBMI and BF16, with VBMI, AVX-512, AVX2;
csrc/cpu/optim_vector.inc): every optimizer bit for bit equal to the scalar loops on each path this CPU has, the
search-free requantization equal to the exact nearest rounding (with bnb's sign fix and the robust round-up) on every
float32 bit pattern in [-1, 1], and each path's bf16 and fp16 parameter rounding equal to c10's on every float32."""

import pytest
import torch
from helpers import FLOAT_DTYPES, heterogeneous_grad

import kestrel
from kestrel import optim as K
from kestrel.functional import create_dynamic_map

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

ISAS = ("scalar", "avx2", "avx512", "avx512vbmi", "avx512bf16")

OPTIMIZERS = {
    "Adam8bit": lambda ps, robust: K.Adam8bit(ps, lr=1e-2, weight_decay=0.05, robust_rounding=robust),
    "AdamW8bit": lambda ps, robust: K.AdamW8bit(ps, lr=1e-2, weight_decay=0.05, robust_rounding=robust),
    "AdEMAMix8bit": lambda ps, robust: K.AdEMAMix8bit(
        ps, lr=1e-2, weight_decay=0.05, t_alpha=4, t_beta3=4, robust_rounding=robust
    ),
    "LAMB8bit": lambda ps, robust: K.LAMB8bit(ps, lr=1e-2, weight_decay=0.05, robust_rounding=robust),
    "SGD8bit": lambda ps, robust: K.SGD8bit(ps, lr=1e-2, momentum=0.9, weight_decay=0.05, robust_rounding=robust),
    "LARS8bit": lambda ps, robust: K.LARS8bit(ps, lr=1e-2, momentum=0.9, weight_decay=0.05, robust_rounding=robust),
    "RMSprop8bit": lambda ps, robust: K.RMSprop8bit(ps, lr=1e-2, weight_decay=0.05, robust_rounding=robust),
    "Adagrad8bit": lambda ps, robust: K.Adagrad8bit(ps, lr=1e-2, weight_decay=0.05, robust_rounding=robust),
    "Lion8bit": lambda ps, robust: K.Lion8bit(ps, lr=1e-3, weight_decay=0.05, robust_rounding=robust),
    "Muon8bit": lambda ps, robust: K.Muon8bit(ps, lr=1e-2, weight_decay=0.05, robust_rounding=robust),
}


# NaN bit patterns (signs, quiet and signalling payloads) as signed integers of each dtype's width
NAN_PAYLOADS = {
    torch.float32: [0x7FC00000, 0x7FC00001, -0x00400000, 0x7F800001, 0x7FFFFFFF, -0x003FFFFF, 0x7FA00000, -1],
    torch.float16: [0x7E00, 0x7E01, -0x0200, 0x7C01, 0x7FFF, -0x01FF, 0x7D00, -1],
    torch.bfloat16: [0x7FC0, 0x7FC1, -0x0040, 0x7F81, 0x7FFF, -0x003F, 0x7FA0, -1],
}


SUBNORMALS = [1e-39, -1e-39, 3e-40, -5e-41, 1.1e-38, -1.1e-38, 2e-45, 1e-40]


def available_isas(monkeypatch):
    found = []
    for isa in ISAS:
        monkeypatch.setenv("KESTREL_CPU_ISA", isa)
        if kestrel._C.cpu_isa() == isa:
            found.append(isa)
    monkeypatch.delenv("KESTREL_CPU_ISA")
    return found


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("robust", [False, True])
def test_every_cpu_vector_path_gives_the_same_bits(monkeypatch, name, dtype, robust):
    """Each vector path this CPU has (KESTREL_CPU_ISA caps the choice): parameters, codes and absmax bit for bit equal
    to the scalar loops', over steps with NaN/Inf gradients and one whose square overflows, blocks of zeros, tiny and
    huge values, a partial last block, weight decay and (robust) rounding; one tensor large enough for the kernels to
    split its blocks over the threads (each thread's range requantizes a block after the next one's pass)."""
    isas = available_isas(monkeypatch)
    assert "scalar" in isas and len(isas) >= 2, f"vector paths on this CPU: {isas}"
    runs = {}
    for isa in isas:
        monkeypatch.setenv("KESTREL_CPU_ISA", isa)
        g = torch.Generator().manual_seed(7)
        shapes = [(4097,), (40, 256), (9000,), (129, 256)]  # the last: 129 blocks, split over the threads
        if name == "Muon8bit":  # Muon's parameters are matrices
            shapes = [(4097, 1), (40, 256), (9000, 1), (129, 256)]
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
        with torch.no_grad():  # NaN parameters with payloads and signs: stepped ones canonicalise, skipped keep bits
            bits = params[2].view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32)
            bits[2000:2008] = torch.tensor(NAN_PAYLOADS[dtype], dtype=bits.dtype)
            # subnormal parameters where the gradients are 0 (below): their new values stay subnormal (the avx512bf16
            # path's vcvtneps2bf16 would flush them to zero)
            params[1].view(-1)[256:264] = torch.tensor(SUBNORMALS).to(dtype)
        opt = OPTIMIZERS[name](params, robust)
        for step in range(6):
            for p in params:
                grad = heterogeneous_grad(p.shape, dtype, "cpu", g)
                flat = grad.view(-1)
                flat[256:512] = 0  # a block of zeros: absmax 0
                flat[600:700] *= 1e-30
                flat[800:810] *= 1e4
                if step == 2:
                    flat[[3, 300, 1000]] = torch.tensor([float("nan"), float("inf"), 3e19]).to(dtype)
                if p is params[2]:
                    flat[2004:2008] = float("nan")  # half the NaN parameters are skipped
                p.grad = grad
            opt.step()
        states = [
            opt.state[p][k].clone()
            for p in params
            for k in ("state1", "state2", "absmax1", "absmax2")
            if k in opt.state[p]
        ]
        assert states and all(s.dtype in (torch.uint8, torch.float32) for s in states)
        assert any(s.dtype == torch.uint8 for s in states), "8-bit states"
        runs[isa] = [p.detach().clone() for p in params] + states
    for isa, tensors in runs.items():
        assert len(tensors) == len(runs["scalar"])
        for i, (a, b) in enumerate(zip(tensors, runs["scalar"])):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), (isa, i)


@pytest.mark.parametrize("signed", [True, False], ids=["signed map", "unsigned map"])
def test_requantization_is_exact_on_every_float_in_the_maps_range(monkeypatch, signed):
    """The vector requantization (one StepTable lookup per value, code_table.h, on every path) against the scalar
    definition -- the count of float32 midpoints below v, then bnb's sign fix or the robust round-up -- on all
    2,130,706,434 float32 bit patterns in [-1, 1], the range of a state divided by its block's absmax, for each path
    this CPU has."""
    code = create_dynamic_map(signed=signed).tolist()
    # avx512bf16 requantizes with avx512vbmi's code (it differs only in its bf16 parameter stores)
    isas = [isa for isa in available_isas(monkeypatch) if isa not in ("scalar", "avx512bf16")]
    assert isas, "no vector path on this CPU"
    for isa in isas:
        values, mismatches, first_bad = kestrel._C._requantize_check(code, isa)
        assert values == 2 * (0x3F800000 + 1)
        bad = torch.tensor([first_bad], dtype=torch.int64).to(torch.int32).view(torch.float32).item()
        assert mismatches == 0, f"{isa}: {mismatches} mismatches, the first at {bad!r} (bits {first_bad:#x})"


def states_at_every_step(code, seed=0):
    """States s and per-64 absmax a with s / a at or next to every step of the map's requantization (its float32
    midpoints, and 0 for the sign fix and the round-up), one such state per group of 64 beside 63 states far from any
    step (a group with a state at a step is divided whole, so one per group is what tests each state's own check),
    for absmax of many binades and significands, inside and outside [2^-125, 2^125] (where the kernels divide)."""
    g = torch.Generator().manual_seed(seed)
    mids = ((code[:-1] + code[1:]) * 0.5).to(torch.float32)
    tiny = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-30, -1e-30])
    near, up, down = [torch.cat([mids, tiny])], None, None
    up = down = near[0]
    for _ in range(2):  # each value and its float32 neighbours, two each way
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near += [up, down]
    at_steps = torch.cat(near).clamp(-1.0, 1.0).to(torch.float64)
    exps = torch.cat([torch.randint(-124, 125, (30,), generator=g), torch.tensor([-125, 125, -126, 126, -130, 127])])
    sig = torch.rand(exps.numel(), generator=g, dtype=torch.float64) + 1.0
    sig[::3] = 1.0
    sig[1::3] = 2.0 - 2.0**-23
    absmax = (sig * torch.pow(2.0, exps.to(torch.float64))).to(torch.float32).to(torch.float64)
    groups = at_steps.numel()
    states, maxes = [], []
    for a in absmax.tolist():
        v = torch.rand(groups, 64, generator=g, dtype=torch.float64) * 2.0 - 1.0
        v[torch.arange(groups), torch.randint(0, 64, (groups,), generator=g)] = at_steps
        s = (v * a).to(torch.float32)
        states.append(torch.maximum(torch.minimum(s, torch.tensor(a)), torch.tensor(-a)).to(torch.float32).view(-1))
        maxes += [a] * groups
    states.append(torch.zeros(64))  # an all-zero block: absmax 0
    maxes.append(0.0)
    return torch.cat(states).tolist(), maxes


@pytest.mark.parametrize("signed", [True, False], ids=["signed map", "unsigned map"])
def test_division_free_requantization_gives_the_quotients_codes(monkeypatch, signed):
    """The kernels requantize a state by looking up s * (1 / absmax) and dividing only the groups with a lane at a
    step (code_table.h: the product is the quotient or its float32 neighbour). States placed at and next to every step
    of the map, absmax of every binade: each path's codes equal the definition's with the division, with each rounding;
    the product alone would give other codes for many of them, so a missing or wrong step test fails here."""
    code = create_dynamic_map(signed=signed)
    states, absmax = states_at_every_step(code)
    isas = [isa for isa in available_isas(monkeypatch) if isa != "scalar"]
    assert isas, "no vector path on this CPU"
    for isa in isas:
        values, mismatches, first_bad, sensitive = kestrel._C._requantize_states_check(
            code.tolist(), isa, states, absmax
        )
        assert values == 3 * len(states)
        where = f"state {states[first_bad]!r}, absmax {absmax[first_bad // 64]!r}" if first_bad >= 0 else ""
        assert mismatches == 0, f"{isa}: {mismatches} mismatches, the first at {where}"
        assert sensitive > 1000, sensitive


def test_requantize_states_check_rejects_states_it_cannot_check():
    code = create_dynamic_map(signed=True).tolist()
    with pytest.raises(RuntimeError, match="states: expected a multiple of 64 values, got 3"):
        kestrel._C._requantize_states_check(code, "avx2", [0.0] * 3, [1.0])
    with pytest.raises(RuntimeError, match=r"absmax: expected one value per 64 states \(1\), got 2"):
        kestrel._C._requantize_states_check(code, "avx2", [0.0] * 64, [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"states\[5\] = 2: expected \|state\| <= its group's absmax \(1\)"):
        kestrel._C._requantize_states_check(code, "avx2", [0.0] * 5 + [2.0] + [0.0] * 58, [1.0])


def test_requantize_check_rejects_a_path_or_map_it_cannot_check():
    with pytest.raises(RuntimeError, match="isa: expected a vector path"):
        kestrel._C._requantize_check(create_dynamic_map(signed=True).tolist(), "sse9")
    with pytest.raises(RuntimeError, match="map: expected 256 values, got 3"):
        kestrel._C._requantize_check([0.0, 0.5, 1.0], "avx2")


# The distinct parameter roundings: avx512vbmi's are avx512's, and avx512bf16's fp16 rounding is avx512's too.
ROUNDING_PATHS = {"bfloat16": ("avx2", "avx512", "avx512bf16"), "float16": ("avx2", "avx512")}


@pytest.mark.parametrize("dtype", sorted(ROUNDING_PATHS))
def test_parameter_rounding_is_c10s_on_every_float32(monkeypatch, dtype):
    """The vector stores of bf16 / fp16 parameters (each path's Lanes<T>::store_rounded: integer rounding, F16C, or
    vcvtneps2bf16 with its subnormal and NaN lanes sent to the integer rounding) against c10's conversion, which the
    scalar loops use, on all 2^32 float32 bit patterns: round to nearest even, subnormals kept, c10's NaN bits."""
    isas = [isa for isa in available_isas(monkeypatch) if isa in ROUNDING_PATHS[dtype]]
    assert isas, "no vector path on this CPU"
    for isa in isas:
        values, mismatches, first_bad = kestrel._C._round_check(isa, dtype)
        assert values == 1 << 32
        assert mismatches == 0, f"{isa}: {mismatches} mismatches, the first at bits {first_bad:#010x}"


def test_round_check_rejects_a_path_or_dtype_it_cannot_check():
    with pytest.raises(RuntimeError, match="isa: expected a vector path"):
        kestrel._C._round_check("sse9", "bfloat16")
    with pytest.raises(RuntimeError, match="dtype: expected 'bfloat16' or 'float16', got 'float32'"):
        kestrel._C._round_check("avx2", "float32")
