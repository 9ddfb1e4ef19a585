"""LAMB and LARS (the trust ratio, max_unorm): the kernels against the plain-PyTorch model bit for bit (norm pass
included), the 50-step protocol (docs/optim8bit.md) against float64 LAMB / LARS, bitsandbytes parity and checkpoints,
argument checks, the op's checks, and CUDA against CPU."""

import numpy as np
import pytest
import torch
from helpers import FLOAT_DTYPES, assert_cuda_equals_cpu, devices, same_state_value

import kestrel
from kestrel import functional as KF
from kestrel.optim import LAMB, LARS, LAMB8bit, LAMB32bit, LARS8bit, LARS32bit
from kestrel.reference import optim as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

LAMB_KW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, max_unorm=1.0)
LARS_KW = dict(lr=0.1, momentum=0.9, max_unorm=0.02)
FAMILY = [(LAMB8bit, 8, LAMB_KW), (LAMB32bit, 32, LAMB_KW), (LARS8bit, 8, LARS_KW), (LARS32bit, 32, LARS_KW)]
IDS = [entry[0].__name__ for entry in FAMILY]
SIGNED = KF.create_dynamic_map(True)
UNSIGNED = KF.create_dynamic_map(False)


def is_lamb(cls):
    return issubclass(cls, LAMB) or cls in (LAMB8bit, LAMB32bit)


def model_step(cls, kw, mp, grad, st, step, weight_decay, max_unorm):
    """The plain-PyTorch model's step on the flat copy `mp` with model state `st`."""
    if is_lamb(cls):
        if st["eight"]:
            ref.adam8bit_step(
                mp,
                grad,
                st["s1"],
                st["s2"],
                st["a1"],
                st["a2"],
                st["q1"],
                st["q2"],
                step,
                kw["lr"],
                *kw["betas"],
                kw["eps"],
                weight_decay,
                max_unorm=max_unorm,
            )
        else:
            ref.adam32bit_step(
                mp, grad, st["s1"], st["s2"], step, kw["lr"], *kw["betas"], kw["eps"], weight_decay, max_unorm=max_unorm
            )
    else:
        ref.one_state_step(
            "momentum",
            mp,
            grad,
            st["s1"],
            st["a1"],
            st["q1"],
            step,
            kw["lr"],
            kw["momentum"],
            0.0,
            0.0,
            weight_decay,
            max_unorm=max_unorm,
        )


def model_state(n, eight, device):
    blocks = (n + 255) // 256
    if eight:
        return dict(
            eight=True,
            s1=torch.zeros(n, dtype=torch.uint8, device=device),
            s2=torch.zeros(n, dtype=torch.uint8, device=device),
            a1=torch.zeros(blocks, device=device),
            a2=torch.zeros(blocks, device=device),
            q1=SIGNED.to(device),
            q2=UNSIGNED.to(device),
        )
    return dict(eight=False, s1=torch.zeros(n, device=device), s2=torch.zeros(n, device=device), a1=None, q1=None)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cls,bits,kw", FAMILY, ids=IDS)
def test_kernel_equals_spec_model_bit_for_bit(device, dtype, cls, bits, kw):
    g = torch.Generator().manual_seed(0)
    # (1000,) is below min_8bit_size (32-bit state); the zero tensor has ||p|| = 0 (its ratio is 1)
    starts = [torch.randn(s, generator=g) * 0.1 for s in [(4097,), (64, 100), (1000,)]] + [torch.zeros(300)]
    params = [torch.nn.Parameter(t.to(dtype).to(device)) for t in starts]
    opt = cls(params, weight_decay=0.05, **kw)
    model = [
        (p.detach().clone().reshape(-1), model_state(p.numel(), bits == 8 and p.numel() >= 4096, device))
        for p in params
    ]
    unclipped = [p.detach().clone().reshape(-1) for p in params]
    unclipped_states = [model_state(p.numel(), bits == 8 and p.numel() >= 4096, device) for p in params]
    for step in range(1, 9):
        grads = [
            (torch.randn(p.shape, generator=g) * 10 ** torch.empty(p.shape).uniform_(-3, 0, generator=g))
            .to(dtype)
            .to(device)
            for p in params
        ]
        if step == 4:
            grads[0].view(-1)[[3, 300]] = torch.tensor([float("nan"), float("inf")], dtype=dtype)
        for p, grad, (mp, st), up, ust in zip(params, grads, model, unclipped, unclipped_states):
            p.grad = grad
            model_step(cls, kw, mp, grad.reshape(-1), st, step, 0.05, kw["max_unorm"])
            model_step(cls, kw, up, grad.reshape(-1), ust, step, 0.05, 0.0)
        opt.step()
    for p, (mp, st) in zip(params, model):
        assert torch.equal(p.detach().reshape(-1), mp)
        assert torch.equal(opt.state[p]["state1"].reshape(-1), st["s1"])
        if st["eight"]:
            assert torch.equal(opt.state[p]["absmax1"], st["a1"])
    # the trust ratio was active: the clipped trajectory differs from plain Adam / SGD-momentum ...
    assert not torch.equal(params[0].detach().reshape(-1), unclipped[0])
    # ... except for the all-zero parameter, whose ratio is 1 at its first step
    assert not torch.equal(params[3].detach(), torch.zeros_like(params[3]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("eight_bit", [True, False])
@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_update_norms_op_matches_reference_order(device, eight_bit, optimizer):
    """update_norms returns, bit for bit, the fixed-order sums (docs/optim8bit.md) of the update direction and the
    parameter."""
    g = torch.Generator().manual_seed(7)
    n = 70000  # 274 blocks: more than the 256 strided reduction threads
    p = (torch.randn(n, generator=g)).to(device)
    grad = (torch.randn(n, generator=g) * 0.1).to(device)
    blocks = (n + 255) // 256
    if eight_bit:
        s1 = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device)
        s2 = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device)
        a1, a2 = torch.rand(blocks, generator=g).to(device), torch.rand(blocks, generator=g).to(device)
        q1, q2 = SIGNED.to(device), UNSIGNED.to(device)
        old1 = SIGNED.to(device)[s1.long()] * a1.repeat_interleave(256)[:n]
        old2 = UNSIGNED.to(device)[s2.long()] * a2.repeat_interleave(256)[:n]
    else:
        s1, s2 = torch.randn(n, generator=g).to(device), torch.rand(n, generator=g).to(device)
        a1 = a2 = q1 = q2 = None
        old1, old2 = s1, s2
    if optimizer == "momentum":
        s2, a2, q2, old2 = s1, a1, None, None
    step, beta1, beta2, eps, wd = 3, 0.9, 0.999, 1e-8, 0.01
    norms = torch.ops.kestrel.update_norms(
        optimizer,
        [p],
        [grad],
        [s1],
        [s2],
        [a1] if eight_bit else [],
        [a2] if eight_bit else [],
        q1,
        q2,
        torch.tensor([step]),
        beta1,
        beta2,
        eps,
        wd,
        1.0,
    )
    a = ref.adam_scalars(step, 0.0, beta1, beta2, eps, wd)
    f = lambda v: float(np.float32(v))  # noqa: E731
    if optimizer == "adam":
        m = old1 * a["beta1"] + grad * a["one_minus_beta1"]
        v = old2 * a["beta2"] + (grad * grad) * a["one_minus_beta2"]
        u = m / (v.double().sqrt().float() + a["eps_c2"])
    else:
        u = old1 * f(beta1) + (grad + p * f(wd))
    expected = ref.norm_sums(u.cpu(), p.cpu())
    assert norms.shape == (1, 2) and norms.dtype == torch.float32 and norms.device == p.device
    assert norms[0, 0].item() == float(expected[0]) and norms[0, 1].item() == float(expected[1])


class Float64Trust:
    """LAMB (Adam + decoupled decay after the update) or LARS (SGD-momentum with L2 decay) in float64, with the
    trust ratio min(1, max_unorm * ||p|| / ||u||) (1 when ||p|| = 0)."""

    def __init__(self, lamb, kw, weight_decay):
        self.lamb, self.kw, self.wd = lamb, kw, weight_decay

    def ratio(self, p, u):
        pnorm, unorm = p.norm().item(), u.norm().item()
        limit = self.kw["max_unorm"] * pnorm
        return limit / unorm if (limit > 0 and unorm > limit) else 1.0

    def step(self, p, states, grad, step):
        p, grad = p.double(), grad.double()
        kw = self.kw
        if self.lamb:
            b1, b2 = kw["betas"]
            m = b1 * states[0].double() + (1 - b1) * grad
            v = b2 * states[1].double() + (1 - b2) * grad * grad
            u = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + kw["eps"])
            new_p = (p - kw["lr"] * self.ratio(p, u) * u) * (1 - kw["lr"] * self.wd)
            return new_p, (m, v)
        grad = grad + self.wd * p
        m = grad if step == 1 else kw["momentum"] * states[0].double() + grad
        return p - kw["lr"] * self.ratio(p, m) * m, (m,)


def dequantized(opt, p):
    state = opt.state[p]
    out = []
    for key, qkey, akey in (("state1", "qmap1", "absmax1"), ("state2", "qmap2", "absmax2")):
        if key not in state:
            continue
        if state[key].dtype == torch.uint8:
            out.append(
                KF.dequantize_blockwise(state[key], absmax=state[akey], code=state[qkey], blocksize=256).reshape(-1)
            )
        else:
            out.append(state[key].float().reshape(-1))
    return out


def _half_gap(code):
    code = code.double()
    return max(((code[1:] - code[:-1]).max() / 2).item(), 1 + code[0].item(), 1 - code[-1].item())


HALF_GAPS = (_half_gap(SIGNED), _half_gap(UNSIGNED))
# The protocol's shapes: the small ones in every dtype and with/without decay; the large ones (slow: a float64
# reference of 4M elements for 50 steps) in float32 with decay.
CASES = [(shape, dtype, wd) for shape in [(1024, 32), (4097,)] for dtype in FLOAT_DTYPES for wd in (0.0, 0.01)] + [
    pytest.param(shape, torch.float32, 0.01, marks=pytest.mark.slow) for shape in [(1024, 1024), (1024, 4097)]
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,dtype,weight_decay", CASES)
@pytest.mark.parametrize("cls,bits,kw", FAMILY[::2], ids=IDS[::2])
def test_fifty_steps_against_float64_with_resync(device, shape, dtype, weight_decay, cls, bits, kw):
    """The protocol: each step, re-sync the float64 reference from our dequantized state and parameters,
    step both with the same gradient, compare states (within one requantization) and parameters."""
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype).to(device))
    opt = cls([p], weight_decay=weight_decay, **kw)
    reference = Float64Trust(is_lamb(cls), kw, weight_decay)
    mean_error_limit = 1.7e-4 if dtype == torch.bfloat16 else 6e-5
    states = None
    clipped = 0
    for step in range(1, 51):
        grad = (torch.randn(shape, generator=g) * 0.1).to(dtype).to(device)
        before = p.detach().reshape(-1).clone()
        if states is None:
            states = [torch.zeros(p.numel(), dtype=torch.float64, device=device) for _ in range(2)]
        expected_p, expected_states = reference.step(before, states, grad.reshape(-1), step)
        u = expected_states[0] if not reference.lamb else None
        if reference.lamb:
            b1, b2 = kw["betas"]
            m, v = expected_states
            u = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + kw["eps"])
        clipped += reference.ratio(before.double(), u) < 1.0
        p.grad = grad
        opt.step()
        ours = dequantized(opt, p)
        for index, (mine, theirs) in enumerate(zip(ours, expected_states)):
            operands = grad.reshape(-1).double().abs() + states[index].abs()
            if opt.state[p]["state1"].dtype == torch.uint8:
                absmax = opt.state[p]["absmax" + str(index + 1)].repeat_interleave(256)[: p.numel()].double()
                bound = HALF_GAPS[index] * absmax * (1 + 1e-3) + 1e-6 * operands
            else:
                bound = 1e-6 * operands + 1e-12
            excess = ((mine.double() - theirs).abs() / bound).max().item()
            assert excess <= 1.0, f"step {step}: state{index + 1} element at {excess:.4f}x the rounding bound"
        outside = ~torch.isclose(p.detach().reshape(-1).double(), expected_p, atol=3e-3, rtol=1e-3)
        assert int(outside.sum()) < 20, f"step {step}: {int(outside.sum())} parameters outside tolerance"
        error = (p.detach().reshape(-1).double() - expected_p).abs().mean().item()
        assert error < mean_error_limit, f"step {step}: parameter mean abs error {error}"
        states = [s.double() for s in ours]  # re-sync
    assert clipped >= 25, f"the trust ratio was active in only {clipped} of 50 steps"


@pytest.mark.parametrize("cls,bits,kw", FAMILY, ids=IDS)
def test_bitsandbytes_parity_and_checkpoints(cls, bits, kw):
    """bnb's CPU backend applies the trust ratio in its 32-bit LAMB/LARS only (its 8-bit LAMB/LARS skip it, and its
    32-bit LAMB leaves the bias correction out of ||u||). Where the rules agree the trajectories agree: LARS32bit with
    the ratio on; LAMB32bit with it off in both; the 8-bit classes (on a tensor that gets 8-bit state) with ours off.
    Checkpoints load both ways for every class, with the ratio on."""
    bnb_optim = pytest.importorskip("bitsandbytes").optim
    bnb_cls = getattr(bnb_optim, cls.__name__)
    bnb_kw = dict(kw) if cls is not LAMB8bit else dict(kw, max_unorm=1.0)  # bnb's LAMB8bit takes 1.0 only
    ours_kw = dict(kw, max_unorm=0.0)
    if cls is LARS32bit:
        ours_kw = dict(kw)
    elif cls is LAMB32bit:
        bnb_kw = dict(kw, max_unorm=0.0)
    torch.manual_seed(2)
    start = [torch.randn(4097) * 0.1] + ([torch.randn(300) * 0.1] if bits == 32 else [])
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt, bnb_opt = cls(ours, weight_decay=0.01, **ours_kw), bnb_cls(theirs, weight_decay=0.01, **bnb_kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=gen) * 0.1
            a.grad, b.grad = grad, grad.clone()
        opt.step()
        bnb_opt.step()
    for a, b, s in zip(ours, theirs, start):
        moved = (a.detach() - s).abs().mean()
        assert (a.detach() - b.detach()).abs().mean() < 0.05 * moved
    start.append(torch.randn(300) * 0.1)
    # checkpoints, with the trust ratio on in both (bnb's state then holds unorm_vec)
    bnb_kw = dict(kw) if cls is not LAMB8bit else dict(kw, max_unorm=1.0)
    opt = cls([torch.nn.Parameter(t.clone()) for t in start], weight_decay=0.01, **kw)
    bnb_opt = bnb_cls([torch.nn.Parameter(t.clone()) for t in start], weight_decay=0.01, **bnb_kw)
    for o in (opt, bnb_opt):
        for _ in range(3):
            for p in o.param_groups[0]["params"]:
                p.grad = torch.randn(p.shape, generator=gen) * 0.1
            o.step()
    mine = cls([torch.nn.Parameter(p.detach().clone()) for p in bnb_opt.param_groups[0]["params"]], **kw)
    mine.load_state_dict(bnb_opt.state_dict())
    back = bnb_cls([torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]], **bnb_kw)
    back.load_state_dict(opt.state_dict())
    for loaded, source in ((mine, bnb_opt), (back, opt)):
        for p_loaded, p_source in zip(loaded.param_groups[0]["params"], source.param_groups[0]["params"]):
            for key, value in source.state[p_source].items():
                got = loaded.state[p_loaded][key]
                assert same_state_value(got, value)
    for o in (mine, back):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        o.step()
        assert o.state[o.param_groups[0]["params"][0]]["step"] == 4


@pytest.mark.parametrize("cls,bits,kw", FAMILY, ids=IDS)
def test_checkpoint_resume_is_bit_identical(cls, bits, kw):
    torch.manual_seed(5)
    start = [torch.randn(5000) * 0.1, torch.randn(100) * 0.1]
    gen = torch.Generator().manual_seed(6)
    grads = [[torch.randn(t.shape, generator=gen) * 0.1 for t in start] for _ in range(6)]
    straight = [torch.nn.Parameter(t.clone()) for t in start]
    opt = cls(straight, weight_decay=0.01, **kw)
    for gs in grads:
        for p, gr in zip(straight, gs):
            p.grad = gr.clone()
        opt.step()
    first = [torch.nn.Parameter(t.clone()) for t in start]
    opt1 = cls(first, weight_decay=0.01, **kw)
    for gs in grads[:3]:
        for p, gr in zip(first, gs):
            p.grad = gr.clone()
        opt1.step()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = cls(resumed, weight_decay=0.01, **kw)
    opt2.load_state_dict(opt1.state_dict())
    for gs in grads[3:]:
        for p, gr in zip(resumed, gs):
            p.grad = gr.clone()
        opt2.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_argument_checks():
    params = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(NotImplementedError, match="LARS8bit: LARS without momentum is not supported"):
        LARS8bit(params, lr=0.1)
    with pytest.raises(NotImplementedError, match="LARS: nesterov=True is not supported"):
        LARS(params, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(NotImplementedError, match="LARS32bit: dampening is not supported"):
        LARS32bit(params, lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="LAMB8bit does not support amsgrad=True"):
        LAMB8bit(params, amsgrad=True)
    with pytest.raises(ValueError, match="LAMB: bias_correction=False is not supported"):
        LAMB(params, bias_correction=False)
    with pytest.raises(ValueError, match="LAMB32bit: adam_w_mode=False"):
        LAMB32bit(params, adam_w_mode=False)
    with pytest.raises(ValueError, match="LAMB: max_unorm must be >= 0, got -1"):
        LAMB(params, max_unorm=-1)
    with pytest.raises(ValueError, match="LAMB: optim_bits must be 8 or 32, got 4"):
        LAMB(params, optim_bits=4)
    from kestrel.optim import RMSprop8bit
    from kestrel.optim.optimizer import MockArgs

    with pytest.raises(ValueError, match="RMSprop8bit: max_unorm .* applies to Adam and SGD-momentum updates only"):
        RMSprop8bit(params, args=MockArgs(dict(optim_bits=8, min_8bit_size=4096, max_unorm=1.0, skip_zeros=False)))


def test_op_checks():
    p, g, s = [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)]
    with pytest.raises(
        RuntimeError, match="update_norms: optimizer must be adam \\(LAMB\\) or momentum \\(LARS\\), got lion"
    ):
        torch.ops.kestrel.update_norms(
            "lion", p, g, s, s, [], [], None, None, torch.tensor([1]), 0.9, 0.99, 1e-8, 0.0, 1.0
        )
    with pytest.raises(RuntimeError, match="max_unorm = 1 needs the norms from update_norms"):
        torch.ops.kestrel.one_state32bit_step_(
            "momentum", p, g, s, torch.tensor([1]), 1e-3, 0.9, 0.0, 1e-8, 0.0, 1.0, -1, None, 1.0
        )
    with pytest.raises(
        RuntimeError, match="the trust ratio .* applies to adam \\(LAMB\\) and momentum \\(LARS\\), got lion"
    ):
        torch.ops.kestrel.one_state32bit_step_(
            "lion", p, g, s, torch.tensor([1]), 1e-3, 0.9, 0.99, 1e-8, 0.0, 1.0, -1, torch.zeros(1, 2), 1.0
        )
    with pytest.raises(
        RuntimeError,
        match=r"norms must be a contiguous float32 tensor of shape \(1, 2\), got Float "
        r"of shape \[2, 2\]",
    ):
        torch.ops.kestrel.two_state32bit_step_(
            "adam",
            p,
            g,
            s,
            [torch.zeros(4)],
            torch.tensor([1]),
            1e-3,
            0.9,
            0.99,
            0.0,
            0.0,
            1e-8,
            0.0,
            1.0,
            -1,
            torch.zeros(2, 2),
            1.0,
        )
    before = p[0].clone()
    with pytest.raises(RuntimeError, match="max_unorm must be >= 0, got -1"):
        torch.ops.kestrel.one_state32bit_step_(
            "momentum",
            p,
            [torch.ones(4)],
            s,
            torch.tensor([1]),
            1e-3,
            0.9,
            0.0,
            1e-8,
            0.0,
            1.0,
            -1,
            torch.zeros(1, 2),
            -1.0,
        )
    assert torch.equal(p[0], before)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    code, ucode = SIGNED.to(device), UNSIGNED.to(device)
    p, g = [torch.randn(5000, device=device)], [torch.randn(5000, device=device)]
    c1 = [torch.randint(0, 256, (5000,), dtype=torch.uint8, device=device)]
    c2 = [torch.randint(0, 256, (5000,), dtype=torch.uint8, device=device)]
    a1, a2 = [torch.rand(20, device=device)], [torch.rand(20, device=device)]
    torch.library.opcheck(
        torch.ops.kestrel.update_norms.default,
        ("adam", p, g, c1, c2, a1, a2, code, ucode, torch.tensor([2]), 0.9, 0.99, 1e-8, 0.01, 1.0),
    )
    torch.library.opcheck(
        torch.ops.kestrel.update_norms.default,
        ("momentum", p, g, c1, c1, a1, a1, code, None, torch.tensor([2]), 0.9, 0.0, 1e-8, 0.01, 1.0),
    )
    norms = torch.rand(1, 2, device=device)
    torch.library.opcheck(
        torch.ops.kestrel.two_state8bit_step_.default,
        (
            "adam",
            p,
            g,
            c1,
            c2,
            a1,
            a2,
            code,
            ucode,
            torch.tensor([2]),
            1e-3,
            0.9,
            0.99,
            0.0,
            0.0,
            1e-8,
            0.01,
            1.0,
            -1,
            norms,
            1.0,
        ),
    )
    torch.library.opcheck(
        torch.ops.kestrel.one_state32bit_step_.default,
        (
            "momentum",
            p,
            g,
            [torch.rand(5000, device=device)],
            torch.tensor([2]),
            1e-3,
            0.9,
            0.0,
            1e-8,
            0.01,
            1.0,
            -1,
            norms,
            0.02,
        ),
    )


def test_compiled_step_equals_eager():
    torch.manual_seed(8)
    start = torch.randn(5000) * 0.1
    eager_p, compiled_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    eager, compiled = LAMB8bit([eager_p], weight_decay=0.01), LAMB8bit([compiled_p], weight_decay=0.01)

    @torch.compile(fullgraph=False)
    def step():
        compiled.step()

    for _ in range(3):
        grad = torch.randn(5000) * 0.1
        eager_p.grad, compiled_p.grad = grad, grad.clone()
        eager.step()
        step()
    assert torch.equal(eager_p, compiled_p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cls,bits,kw", FAMILY, ids=IDS)
def test_cuda_kernel_equals_cpu_kernel(dtype, cls, bits, kw):
    torch.manual_seed(4)
    cpu = [torch.nn.Parameter((torch.randn(s) * 0.1).to(dtype)) for s in [(4097,), (300, 70), (1000,), (70000,)]]
    assert_cuda_equals_cpu(lambda ps: cls(ps, weight_decay=0.01, **kw), cpu)
