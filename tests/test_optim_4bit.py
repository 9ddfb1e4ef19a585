"""AdamW4bit / Adam4bit (kestrel.optim.adam4bit): the 4-bit formats (torchao's maps, block 128, two codes per byte),
the kernel against the plain-PyTorch model bit for bit, the 50-step re-sync protocol against torch.optim.AdamW, the
state size, training, checkpoints, torch.compile, argument checks."""

import copy
import io

import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    assert_compiled_step_equals_eager,
    assert_cuda_equals_cpu,
    devices,
    heterogeneous_grad,
    same_state_value,
)

import kestrel
from kestrel import optim as K
from kestrel.optim.adam4bit import QMAP4_SIGNED, QMAP4_UNSIGNED, dequantize4, pack4, unpack4
from kestrel.reference import optim as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")


def dynamic_map4():
    """The 4-bit signed dynamic map of the paper (torchao's create_dynamic_map(True, 3, 4)): for exponents i < 3,
    the midpoints of linspace(0.1, 1, 2**i + 1) times 10**(i - 2), both signs, plus 0 and 1."""
    values = [0.0, 1.0]
    for i in range(3):
        bounds = torch.linspace(0.1, 1, 2**i + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10 ** (i - 2))
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def test_the_4bit_maps():
    assert torch.equal(QMAP4_SIGNED, dynamic_map4())
    assert torch.equal(QMAP4_UNSIGNED, torch.linspace(0, 1, 17)[1:])
    assert QMAP4_SIGNED.numel() == 16 and (QMAP4_SIGNED == 0).sum() == 1 and QMAP4_SIGNED[-1] == 1
    assert (QMAP4_UNSIGNED > 0).all()  # no zero: no second moment rounds to 0


def test_packing_puts_the_even_element_high():
    codes = torch.tensor([1, 2, 15, 0, 7])
    packed = pack4(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert unpack4(packed, 5).tolist() == codes.tolist()


def grads_for(shape, dtype, g, step):
    grad = heterogeneous_grad(shape, dtype, "cpu", g)
    flat = grad.view(-1)
    if flat.numel() > 600:
        flat[256:384] = 0  # an all-zero 4-bit block
        flat[500:510] *= 1e-30
    if step == 3 and flat.numel() > 300:
        flat[[3, 130, 300]] = torch.tensor([float("nan"), float("inf"), 3e19]).to(dtype)
    return grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_kernel_equals_the_reference_model_bit_for_bit(dtype, weight_decay):
    """Ten steps on an odd size with a partial block, a matrix and a tensor below min_4bit_size (float32 states),
    NaN/Inf gradients and one whose square overflows, a zero block, tiny values: parameters, codes and absmax
    equal kestrel.reference.optim.adam4bit_step's bits."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4097,), (64, 100), (1000,)]
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in shapes]
    opt = K.AdamW4bit(params, lr=1e-2, weight_decay=weight_decay)
    model = [p.detach().clone().reshape(-1) for p in params]
    model_states = None
    for step in range(1, 11):
        grads = [grads_for(p.shape, dtype, g, step) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        if model_states is None:
            model_states = []
            for p in params[:2]:
                n = p.numel()
                model_states.append(
                    [
                        torch.zeros((n + 1) // 2, dtype=torch.uint8),
                        torch.zeros((n + 1) // 2, dtype=torch.uint8),
                        torch.zeros((n + 127) // 128),
                        torch.zeros((n + 127) // 128),
                    ]
                )
        for mp, st, grad in zip(model[:2], model_states, grads[:2]):
            ref.adam4bit_step(mp, grad, *st, QMAP4_SIGNED, QMAP4_UNSIGNED, step, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
        for p, mp, st in zip(params[:2], model[:2], model_states):
            assert torch.equal(p.detach().reshape(-1), mp), f"step {step}, shape {tuple(p.shape)}"
            state = opt.state[p]
            for key, value in zip(("state1", "state2", "absmax1", "absmax2"), st):
                assert torch.equal(state[key], value), f"step {step}, shape {tuple(p.shape)}: {key}"
    assert opt.state[params[2]]["state1"].dtype == torch.float32


HALF_GAP1 = float(((QMAP4_SIGNED[1:] - QMAP4_SIGNED[:-1]) / 2).max())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fifty_steps_against_torch_adamw_with_resync(device, dtype):
    """docs/optim8bit.md's protocol with the 4-bit tolerance: before each step torch.optim.AdamW takes our
    dequantized states and parameter; after it, our parameter is torch's up to the parameter dtype's rounding (and
    the order of the decoupled decay), and each state within its map's rounding of its block's absmax (the first
    moment: half the widest gap of the signed map; the second: 1/16, a value below 1/32 of the absmax rounding up
    to 1/16)."""
    g = torch.Generator().manual_seed(1)
    shape = (1024, 33)
    p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype).to(device))
    opt = K.AdamW4bit([p], lr=1e-3, weight_decay=0.01)
    torch_p = torch.nn.Parameter(p.detach().float().clone())
    reference = torch.optim.AdamW([torch_p], lr=1e-3, weight_decay=0.01)
    n = p.numel()
    ulp = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for step in range(1, 51):
        grad = (torch.randn(shape, generator=g) * 0.1).to(dtype).to(device)
        if step > 1:
            state = opt.state[p]
            m = dequantize4(state["state1"], state["absmax1"], state["qmap1"], n).reshape(shape)
            v = dequantize4(state["state2"], state["absmax2"], state["qmap2"], n).reshape(shape)
            reference.state[torch_p]["exp_avg"].copy_(m)
            reference.state[torch_p]["exp_avg_sq"].copy_(v)
            torch_p.data.copy_(p.detach().float())
        before = p.detach().float().clone()
        torch_p.grad = grad.float()
        reference.step()
        p.grad = grad
        opt.step()
        # the parameter dtype's rounding of the new value, and the decay's order (lr * wd * the step: 1e-8)
        bound = 2e-7 + 1e-3 * 1e-2 * 1e-3 + ulp * torch.maximum(before.abs(), torch_p.detach().abs()) * 1.01
        assert ((p.detach().float() - torch_p.detach()).abs() <= bound).all(), f"step {step}"
        state = opt.state[p]
        absmax1 = state["absmax1"].repeat_interleave(128)[:n].reshape(shape).double()
        absmax2 = state["absmax2"].repeat_interleave(128)[:n].reshape(shape).double()
        m = dequantize4(state["state1"], state["absmax1"], state["qmap1"], n).reshape(shape).double()
        v = dequantize4(state["state2"], state["absmax2"], state["qmap2"], n).reshape(shape).double()
        m_ref = reference.state[torch_p]["exp_avg"].double()
        v_ref = reference.state[torch_p]["exp_avg_sq"].double()
        assert ((m - m_ref).abs() <= HALF_GAP1 * absmax1 * (1 + 1e-3) + 1e-7).all(), f"step {step}: first moment"
        assert ((v - v_ref).abs() <= absmax2 / 16 * (1 + 1e-3) + 1e-12).all(), f"step {step}: second moment"
        assert (v > 0).all()  # no element's second moment is 0


@pytest.mark.parametrize("cls,kwargs", [(K.AdamW, {}), (K.Adam, dict(weight_decay=0.0))])
def test_optim_bits_4_on_adam_and_adamw_is_the_4bit_optimizer(cls, kwargs):
    """AdamW(optim_bits=4) / Adam(optim_bits=4) keep AdamW4bit's / Adam4bit's states and take their steps bit for
    bit; GlobalOptimManager can give one parameter 8-bit states in the same optimizer."""
    four = K.AdamW4bit if cls is K.AdamW else K.Adam4bit
    a, b = make_params(), make_params()
    opt_a, opt_b = cls(a, lr=1e-2, optim_bits=4, **kwargs), four(b, lr=1e-2, **kwargs)
    run(opt_a, a, 3, 5)
    run(opt_b, b, 3, 5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for key, value in opt_b.state[y].items():
            assert same_state_value(opt_a.state[x][key], value), key
    mixed = make_params()
    manager = K.GlobalOptimManager.get_instance()
    manager.override_config(mixed[1], "optim_bits", 8)
    opt = cls(mixed, lr=1e-2, optim_bits=4, **kwargs)
    run(opt, mixed, 2, 6)
    assert opt.state[mixed[0]]["qmap1"].numel() == 16 and opt.state[mixed[1]]["qmap1"].numel() == 256
    restored = cls(make_params(), lr=1e-2, optim_bits=4, **kwargs)
    restored.load_state_dict(opt.state_dict())  # both kinds load back


def test_state_is_about_one_byte_per_parameter():
    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = K.AdamW4bit([p])
    p.grad = torch.randn(1 << 16)
    opt.step()
    state = opt.state[p]
    total = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert total / p.numel() == 1.0625  # 0.5 + 0.5 codes + 2 x 4 / 128 absmax


def test_trains_an_mlp_as_well_as_32bit_adamw():
    torch.manual_seed(2)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    data = []
    for _ in range(8):
        x = torch.randn(128, 32)
        data.append((x, teacher(x).argmax(-1).detach()))
    base = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    finals = {}
    for name, make in (("4bit", K.AdamW4bit), ("32bit", K.AdamW32bit)):
        model = copy.deepcopy(base)
        opt = make(model.parameters(), lr=3e-3)
        losses = []
        for step in range(150):
            x, y = data[step % len(data)]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        finals[name] = sum(losses[-8:]) / 8
        assert finals[name] < 0.3 * losses[0]
    assert isinstance(opt, K.AdamW32bit)
    assert finals["4bit"] < 1.2 * finals["32bit"] + 0.02, finals


def run(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.1
        opt.step()


def make_params():
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in [(4097,), (64, 128), (300,)]]


def test_checkpoint_round_trip_resumes_bit_identically():
    params = make_params()
    straight = K.AdamW4bit(params, lr=1e-2)
    run(straight, params, 3, 1)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": straight.state_dict()}, buffer)
    run(straight, params, 3, 2)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_params = make_params()
    for p, value in zip(resumed_params, saved["params"]):
        p.data.copy_(value)
    resumed = K.AdamW4bit(resumed_params, lr=1e-2)
    resumed.load_state_dict(saved["opt"])
    run(resumed, resumed_params, 3, 2)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        for key, value in straight.state[a].items():
            assert same_state_value(value, resumed.state[b][key]), key


def test_load_rejects_an_8bit_checkpoint_and_keeps_the_state():
    params = make_params()
    opt = K.AdamW4bit(params, lr=1e-2)
    run(opt, params, 1, 1)
    kept = {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
    eight = K.AdamW8bit(params, lr=1e-2)
    run(eight, params, 1, 1)
    with pytest.raises(
        ValueError, match=r"parameter 0 \(shape \(4097,\)\): state1 must be torch.uint8 with 2049 values"
    ):
        opt.load_state_dict(eight.state_dict())
    for key, value in kept.items():
        assert torch.equal(opt.state[params[0]][key], value)


def test_compiled_step_equals_eager():
    g = torch.Generator().manual_seed(4)
    start = [p.detach() for p in make_params()]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(4)]
    assert_compiled_step_equals_eager(lambda ps: K.AdamW4bit(ps, lr=1e-2), start, grads)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(amsgrad=True), "does not support amsgrad=True"),
        (dict(block_size=64), "block_size must be 128"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\), got 1.0"),
        (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        K.AdamW4bit([torch.nn.Parameter(torch.zeros(10))], **kwargs)


def test_op_rejects_states_of_the_wrong_size():
    p, g = [torch.zeros(300)], [torch.ones(300)]
    good = dict(
        state1=[torch.zeros(150, dtype=torch.uint8)],
        state2=[torch.zeros(150, dtype=torch.uint8)],
        absmax1=[torch.zeros(3)],
        absmax2=[torch.zeros(3)],
    )
    args = lambda s: (  # noqa: E731
        "adam",
        p,
        g,
        s["state1"],
        s["state2"],
        s["absmax1"],
        s["absmax2"],
        QMAP4_SIGNED,
        QMAP4_UNSIGNED,
        torch.tensor([1]),
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.0,
        1.0,
    )
    with pytest.raises(RuntimeError, match=r"must be contiguous Byte tensors of 1 x 150 bytes \(two 4-bit codes"):
        torch.ops.kestrel.two_state4bit_step_(*args(dict(good, state1=[torch.zeros(300, dtype=torch.uint8)])))
    with pytest.raises(RuntimeError, match=r"ceil\(300 / 128\) = 3 values"):
        torch.ops.kestrel.two_state4bit_step_(*args(dict(good, absmax1=[torch.zeros(2)])))
    bad_map = list(args(good))
    bad_map[7] = torch.zeros(256)
    with pytest.raises(RuntimeError, match="qmap1 and qmap2 must be contiguous float32 tensors of 16 values"):
        torch.ops.kestrel.two_state4bit_step_(*bad_map)
    assert torch.equal(p[0], torch.zeros(300))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    n = 5000
    torch.library.opcheck(
        torch.ops.kestrel.two_state4bit_step_.default,
        (
            "adam",
            [torch.randn(n, device=device)],
            [torch.randn(n, device=device)],
            [torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device=device)],
            [torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device=device)],
            [torch.rand((n + 127) // 128, device=device)],
            [torch.rand((n + 127) // 128, device=device)],
            QMAP4_SIGNED.to(device),
            QMAP4_UNSIGNED.to(device),
            torch.tensor([2]),
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.01,
            1.0,
        ),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_kernel_equals_cpu_kernel(dtype):
    torch.manual_seed(6)
    cpu = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in [(4097,), (300, 70), (1000,)]]
    assert_cuda_equals_cpu(lambda ps: K.AdamW4bit(ps, lr=1e-2, weight_decay=0.01), cpu)
