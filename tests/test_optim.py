"""8-bit Adam / AdamW: exactness against the plain-PyTorch model, the 50-step protocol (docs/optim8bit.md) against
torch, bitsandbytes interoperability (arguments, checkpoints, accuracy), errors, and a small training run."""

import io

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_cuda_equals_cpu, devices, heterogeneous_grad, same_state_value

import kestrel
from kestrel import functional as KF
from kestrel.optim import Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit
from kestrel.reference import optim as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


def bnb():
    return pytest.importorskip("bitsandbytes")


def dequantized_states(opt, p):
    state = opt.state[p]
    if state["state1"].dtype != torch.uint8:
        return state["state1"].float(), state["state2"].float()
    s1 = KF.dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256)
    s2 = KF.dequantize_blockwise(state["state2"], absmax=state["absmax2"], code=state["qmap2"], blocksize=256)
    return s1, s2


class ReferenceRun:
    """The step of docs/optim8bit.md in plain PyTorch, stepping flat copies of the parameters."""

    def __init__(self, params, eight_bit, lr, betas, eps, weight_decay):
        self.params = [p.detach().clone().reshape(-1) for p in params]
        self.eight_bit, self.hyper = eight_bit, (lr, betas[0], betas[1], eps, weight_decay)
        self.states = []
        for p, eight in zip(self.params, eight_bit):
            n, dev = p.numel(), p.device
            if eight:
                blocks = (n + 255) // 256
                self.states.append(
                    [
                        torch.zeros(n, dtype=torch.uint8, device=dev),
                        torch.zeros(n, dtype=torch.uint8, device=dev),
                        torch.zeros(blocks, device=dev),
                        torch.zeros(blocks, device=dev),
                    ]
                )
            else:
                self.states.append([torch.zeros(n, device=dev), torch.zeros(n, device=dev)])
        self.step_count = 0

    def step(self, grads):
        self.step_count += 1
        signed = KF.create_dynamic_map(True).to(self.params[0].device)
        unsigned = KF.create_dynamic_map(False).to(self.params[0].device)
        for p, g, state, eight in zip(self.params, grads, self.states, self.eight_bit):
            if eight:
                ref.adam8bit_step(p, g, *state, signed, unsigned, self.step_count, *self.hyper)
            else:
                ref.adam32bit_step(p, g, *state, self.step_count, *self.hyper)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cls,eight_bit", [(AdamW8bit, True), (Adam8bit, True), (AdamW, False), (Adam32bit, False)])
def test_kernel_equals_spec_model_bit_for_bit(device, dtype, cls, eight_bit):
    g = torch.Generator().manual_seed(0)
    shapes = [(4097,), (64, 100), (1000,), (257, 33)]  # (1000,) is below min_8bit_size: 32-bit state
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in shapes]
    weight_decay = 0.05 if cls in (AdamW8bit, AdamW) else 0.0
    opt = cls(params, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    model = ReferenceRun(params, [eight_bit and p.numel() >= 4096 for p in params], 1e-2, BETAS, EPS, weight_decay)
    for step in range(12):
        grads = [heterogeneous_grad(p.shape, dtype, device, g) for p in params]
        if step == 4:
            grads[0].view(-1)[[3, 300, 4000]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        model.step([grad.reshape(-1) for grad in grads])
    for p, expected, state, expected_state in zip(params, model.params, [opt.state[p] for p in params], model.states):
        assert torch.equal(p.detach().reshape(-1), expected)
        assert torch.equal(state["state1"].reshape(-1), expected_state[0])
        assert torch.equal(state["state2"].reshape(-1), expected_state[1])
        if len(expected_state) == 4:
            assert torch.equal(state["absmax1"], expected_state[2]) and torch.equal(state["absmax2"], expected_state[3])


SPEC_SHAPES = [
    (1024, 32),
    (4097,),
    pytest.param((1024, 1024), marks=pytest.mark.slow),
    pytest.param((1024, 4097), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SPEC_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
def test_fifty_steps_against_torch_with_resync(device, shape, dtype, weight_decay, cls):
    """The protocol: each step, re-sync torch's optimizer from our dequantized state and parameters, step
    both with the same gradient, compare. Weight decay is decoupled in both kestrel classes, so the torch
    reference is Adam without and AdamW with weight decay."""
    g = torch.Generator().manual_seed(1)
    # parameters of magnitude 0.1, as in bnb's tests: the mean limits include the rounding to fp16/bf16
    p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype).to(device))
    torch_p = torch.nn.Parameter(p.detach().float().clone())
    opt = cls([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    torch_cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    torch_opt = torch_cls([torch_p], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    mean_error_limit = 1.7e-4 if dtype == torch.bfloat16 else 6e-5
    for step in range(1, 51):
        grad = (torch.randn(shape, generator=g) * 0.1).to(dtype).to(device)
        if step > 1:
            s1, s2 = dequantized_states(opt, p)
            torch_state = torch_opt.state[torch_p]
            torch_state["exp_avg"].copy_(s1.reshape(shape))
            torch_state["exp_avg_sq"].copy_(s2.reshape(shape))
            torch_p.data.copy_(p.detach().float())
        p.grad = grad
        torch_p.grad = grad.float()
        opt.step()
        torch_opt.step()
        s1, s2 = dequantized_states(opt, p)
        torch_state = torch_opt.state[torch_p]
        for ours, theirs in (
            (s1.reshape(shape), torch_state["exp_avg"]),
            (s2.reshape(shape), torch_state["exp_avg_sq"]),
            (p.detach().float(), torch_p.detach()),
        ):
            outside = ~torch.isclose(ours, theirs, atol=3e-3, rtol=1e-3)
            assert int(outside.sum()) < 20, f"step {step}: {int(outside.sum())} elements outside tolerance"
        error = (p.detach().float() - torch_p.detach()).abs().mean().item()
        assert error < mean_error_limit, f"step {step}: parameter mean abs error {error}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_tracks_torch_at_least_as_closely_as_bitsandbytes_cpu(weight_decay):
    """No re-sync: 100 steps of ours, of bnb's CPU AdamW8bit and of torch's AdamW from the same start with the
    same gradients (each element with its own scale, spread over three decades inside every block); our
    parameters must stay at least as close to torch's, in mean absolute error, as bnb's do."""
    bnb_optim = bnb().optim
    g = torch.Generator().manual_seed(2)
    n = 64 * 1024
    start = torch.randn(n, generator=g)
    scale = 10 ** torch.empty(n).uniform_(-3, 0, generator=g)
    ours, theirs, exact = (torch.nn.Parameter(start.clone()) for _ in range(3))
    opts = [
        AdamW8bit([ours], lr=LR, weight_decay=weight_decay),
        bnb_optim.AdamW8bit([theirs], lr=LR, weight_decay=weight_decay),
        torch.optim.AdamW([exact], lr=LR, weight_decay=weight_decay),
    ]
    for _ in range(100):
        grad = torch.randn(n, generator=g) * scale
        for p, opt in zip((ours, theirs, exact), opts):
            p.grad = grad.clone()
            opt.step()
    ours_error = (ours - exact).abs().mean().item()
    bnb_error = (theirs - exact).abs().mean().item()
    assert ours_error <= bnb_error, (ours_error, bnb_error)


@pytest.mark.parametrize("device", devices())
def test_small_model_reaches_torch_adamw_loss(device):
    """A two-layer MLP learns a fixed teacher from a stream of noisy batches (the same stream for both runs);
    the mean loss of the last 50 of 300 steps with AdamW8bit is within 2% of torch AdamW's."""
    torch.manual_seed(3)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)

    def train(make_opt):
        torch.manual_seed(4)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)).to(device)
        opt = make_opt(model.parameters())
        g = torch.Generator().manual_seed(5)
        losses = []
        for _ in range(300):
            x = torch.randn(256, 32, generator=g).to(device)
            y = teacher(x).detach() + 0.1 * torch.randn(256, 1, generator=g).to(device)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert isinstance(opt, torch.optim.AdamW) or opt.state[model[0].weight]["state1"].dtype == torch.uint8
        return sum(losses[-50:]) / 50

    loss_8bit = train(lambda ps: AdamW8bit(ps, lr=3e-3))
    loss_torch = train(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    assert loss_torch < 0.02  # the task is learned (noise floor 0.01)
    assert abs(loss_8bit - loss_torch) <= 0.02 * loss_torch, (loss_8bit, loss_torch)


@pytest.mark.parametrize("device", devices())
def test_nan_and_inf_gradients(device):
    p = torch.nn.Parameter(torch.randn(5000, device=device))
    q = torch.nn.Parameter(torch.randn(1000, device=device))  # 32-bit state
    opt = AdamW8bit([p, q], lr=1e-2)
    for _ in range(3):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    before_p, before_q = p.detach().clone(), q.detach().clone()
    q_state_before = [opt.state[q]["state1"].clone(), opt.state[q]["state2"].clone()]
    bad = torch.tensor([7, 300, 4999], device=device)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    p.grad[bad] = torch.tensor([float("nan"), float("inf"), float("-inf")], device=device)
    q.grad[bad[:2]] = torch.tensor([float("nan"), float("inf")], device=device)
    opt.step()
    s1, s2 = dequantized_states(opt, p)
    assert torch.equal(p.detach()[bad], before_p[bad])
    assert bool((s1[bad] == 0).all()) and bool((s2[bad] == 0).all())
    others = torch.ones(5000, dtype=torch.bool, device=device)
    others[bad] = False
    assert bool((p.detach()[others] != before_p[others]).all())
    # 32-bit state: the element is skipped, its parameter and state kept (bnb's 32-bit kernel)
    assert torch.equal(q.detach()[bad[:2]], before_q[bad[:2]])
    assert torch.equal(opt.state[q]["state1"][bad[:2]], q_state_before[0][bad[:2]])
    assert torch.isfinite(p).all() and torch.isfinite(q).all()


def test_state_layout_and_bytes_per_parameter():
    big = torch.nn.Parameter(torch.randn(1 << 20))
    small = torch.nn.Parameter(torch.randn(4095))
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    state = opt.state[big]
    assert set(state) == {"step", "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
    assert state["step"] == 1 and state["state1"].dtype == torch.uint8 and state["absmax1"].shape == (4096,)
    assert torch.equal(state["qmap1"], KF.create_dynamic_map(True))
    assert torch.equal(state["qmap2"], KF.create_dynamic_map(False))
    per_param = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert per_param / big.numel() == 2 * (1 + 4 / 256)  # 2.03 bytes; the two maps are shared by all parameters
    assert opt.state[small]["state1"].dtype == torch.float32  # below min_8bit_size


def _train(opt, params, steps, generator):
    for _ in range(steps):
        for p in params:
            p.grad = heterogeneous_grad(p.shape, p.dtype, p.device, generator)
        opt.step()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_and_bit_identical_resume(device, dtype):
    def make():
        torch.manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s).to(dtype).to(device)) for s in [(4097,), (100, 70), (300,)]]
        return params, AdamW8bit(params, lr=1e-2, weight_decay=0.1)

    params, opt = make()
    _train(opt, params, 50, torch.Generator().manual_seed(6))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    # an uninterrupted run
    generator = torch.Generator().manual_seed(7)
    _train(opt, params, 20, generator)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_params, resumed = make()
    with torch.no_grad():
        for p, value in zip(resumed_params, saved["params"]):
            p.copy_(value)
    resumed.load_state_dict(saved["opt"])
    loaded = resumed.state_dict()
    for key, state in saved["opt"]["state"].items():
        nested = state["__bnb_optimizer_quant_state__"]
        for name, tensor in nested.items():
            assert torch.equal(loaded["state"][key]["__bnb_optimizer_quant_state__"][name], tensor)
        assert loaded["state"][key]["step"] == state["step"] == 50
    _train(resumed, resumed_params, 20, torch.Generator().manual_seed(7))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed_params):
        for key in opt.state[a]:
            va, vb = opt.state[a][key], resumed.state[b][key]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb


def test_state_dict_layout_is_bitsandbytes():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "__bnb_optimizer_quant_state__"}
    assert set(sd["state"][0]["__bnb_optimizer_quant_state__"]) == {
        "state1",
        "state2",
        "qmap1",
        "qmap2",
        "absmax1",
        "absmax2",
    }
    assert set(sd["param_groups"][0]) == {"lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3", "params"}
    assert "__bnb_optimizer_quant_state__" in opt.state_dict()["state"][0]  # state_dict() does not mutate live state
    assert "state1" in opt.state[p]


@pytest.mark.parametrize("nested", [True, False])
def test_load_bitsandbytes_checkpoint(nested):
    """A state_dict written by bnb's AdamW8bit loads into ours (nested or flat) with identical tensors, and our run
    continues from it exactly as the plain-PyTorch model does from that state."""
    bnb_optim = bnb().optim
    torch.manual_seed(8)
    start = [torch.randn(4097), torch.randn(300)]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    bnb_opt = bnb_optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.1)
    _train(bnb_opt, theirs, 10, torch.Generator().manual_seed(9))
    sd = bnb_opt.state_dict()
    if not nested:
        for state in sd["state"].values():
            state.update(state.pop("__bnb_optimizer_quant_state__"))
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = AdamW8bit(ours, lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(sd)
    for mine, bnb_p in zip(ours, theirs):
        for key, value in bnb_opt.state[bnb_p].items():
            assert same_state_value(opt.state[mine][key], value)
    # continue one step: equals the plain-PyTorch model started from bnb's state
    g = torch.Generator().manual_seed(10)
    grads = [heterogeneous_grad(p.shape, p.dtype, "cpu", g) for p in ours]
    big = ours[0]
    state = {k: v.clone() for k, v in opt.state[big].items() if torch.is_tensor(v)}
    expected = big.detach().clone()
    ref.adam8bit_step(
        expected,
        grads[0],
        state["state1"],
        state["state2"],
        state["absmax1"],
        state["absmax2"],
        state["qmap1"],
        state["qmap2"],
        11,
        1e-2,
        0.9,
        0.999,
        1e-8,
        0.1,
    )
    for p, grad in zip(ours, grads):
        p.grad = grad
    opt.step()
    assert torch.equal(big.detach(), expected)
    assert torch.equal(opt.state[big]["state1"], state["state1"])


def test_our_checkpoint_loads_into_bitsandbytes():
    bnb_optim = bnb().optim
    torch.manual_seed(11)
    ours = [torch.nn.Parameter(torch.randn(4097)), torch.nn.Parameter(torch.randn(300))]
    opt = AdamW8bit(ours, lr=1e-2)
    _train(opt, ours, 10, torch.Generator().manual_seed(12))
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    bnb_opt = bnb_optim.AdamW8bit(theirs, lr=1e-2)
    bnb_opt.load_state_dict(opt.state_dict())
    for mine, bnb_p in zip(ours, theirs):
        for key, value in opt.state[mine].items():
            assert same_state_value(bnb_opt.state[bnb_p][key], value)
    _train(bnb_opt, theirs, 2, torch.Generator().manual_seed(13))  # bnb can continue from it
    assert bnb_opt.state[theirs[0]]["step"] == 12


def test_mismatched_checkpoint_is_rejected_and_state_kept():
    torch.manual_seed(14)
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(6000))]
    opt = AdamW8bit(params)
    _train(opt, params, 2, torch.Generator().manual_seed(15))
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
    sd = opt.state_dict()
    sd["state"][1]["__bnb_optimizer_quant_state__"]["state1"] = torch.zeros(5999, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(6000,\)\): state1 has 5999 elements, expected 6000"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="absmax1 must be float32 with 20 values, got torch.float32 with 3"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    with pytest.raises(ValueError, match="parameter group 0 has 1 parameters in the state_dict, 2 in the optimizer"):
        opt.load_state_dict(sd)
    for key, value in before.items():
        assert torch.equal(opt.state[params[0]][key], value)


def test_constructor_errors():
    params = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(ValueError, match="AdamW8bit does not support amsgrad=True"):
        AdamW8bit(params, amsgrad=True)
    with pytest.raises(ValueError, match="Adam does not support amsgrad=True"):
        Adam(params, amsgrad=True)
    with pytest.raises(ValueError, match="AdamW8bit: optim_bits is fixed to 8 .* got 8"):
        AdamW8bit(params, optim_bits=8)
    with pytest.raises(ValueError, match=r"AdamW8bit: lr must be >= 0, got -1"):
        AdamW8bit(params, lr=-1)
    with pytest.raises(ValueError, match=r"AdamW8bit: betas\[1\] must be in \[0, 1\), got 1.0"):
        AdamW8bit(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="AdamW: optim_bits must be 4, 8 or 32, got 16"):
        AdamW(params, optim_bits=16)
    with pytest.raises(ValueError, match="block_wise=False"):
        AdamW8bit(params, block_wise=False)
    AdamW8bit(params, percentile_clipping=100, block_wise=True)  # bnb 0.49's defaults are accepted
    AdamW8bit(params, 1e-3, (0.9, 0.99), 1e-8, 0.0, False, 32, None, 4096, False)  # bnb 0.50 positional
    assert AdamW8bit(params, betas="(0.9, 0.95)").param_groups[0]["betas"] == (0.9, 0.95)


def test_step_errors_leave_state_untouched():
    good = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([good])
    good.grad = torch.randn_like(good)
    opt.step()
    snapshot = good.detach().clone(), opt.state[good]["state1"].clone()

    sparse = torch.nn.Parameter(torch.randn(10, 4))
    opt.add_param_group({"params": [sparse]})
    good.grad = torch.randn_like(good)
    sparse.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, 4), (10, 4))
    with pytest.raises(RuntimeError, match=r"AdamW8bit: parameter 1 \(shape \(10, 4\)\) has a sparse gradient"):
        opt.step()
    assert torch.equal(good.detach(), snapshot[0]) and torch.equal(opt.state[good]["state1"], snapshot[1])
    assert opt.state[good]["step"] == 1 and len(opt.state[sparse]) == 0

    doubles = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt2 = AdamW8bit([doubles])
    doubles.grad = torch.ones_like(doubles)
    with pytest.raises(TypeError, match=r"AdamW8bit: parameter 0 \(shape \(10,\)\) is torch.float64"):
        opt2.step()
    mixed = torch.nn.Parameter(torch.zeros(10))
    opt3 = AdamW8bit([mixed])
    if hasattr(mixed, "grad_dtype"):
        mixed.grad_dtype = None  # recent torch refuses a gradient of another dtype unless asked
    mixed.grad = torch.ones(10, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="is torch.float32 but its gradient is torch.bfloat16"):
        opt3.step()
    on_meta = torch.nn.Parameter(torch.empty(10, device="meta"))
    opt4 = AdamW8bit([on_meta])
    on_meta.grad = torch.empty(10, device="meta")
    with pytest.raises(
        NotImplementedError, match="AdamW8bit: no kernel for device meta; kestrel has kernels for cpu and cuda"
    ):
        opt4.step()
    assert len(opt4.state[on_meta]) == 0


def test_paged_on_cpu_warns_once_and_runs_unpaged():
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(6000))]
    opt = AdamW8bit(params, is_paged=True)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="paged optimizer state needs CUDA") as record:
        opt.step()
    assert len([w for w in record if "paged" in str(w.message)]) == 1
    assert opt.state[params[0]]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    torch.manual_seed(16)
    params = [torch.randn(5000, device=device), torch.randn(300, 20, device=device).bfloat16()]
    for eight_bit in (True, False):
        for dtype_params in ([params[0]], [params[1]]):
            p = [t.clone() for t in dtype_params]
            g = [torch.randn_like(t) for t in p]
            n = [t.numel() for t in p]
            if eight_bit:
                s1 = [torch.randint(0, 256, (k,), dtype=torch.uint8, device=device).view(t.shape) for k, t in zip(n, p)]
                s2 = [torch.randint(0, 256, (k,), dtype=torch.uint8, device=device).view(t.shape) for k, t in zip(n, p)]
                a1 = [torch.rand((k + 255) // 256, device=device) for k in n]
                a2 = [torch.rand((k + 255) // 256, device=device) for k in n]
                args = (
                    "adam",
                    p,
                    g,
                    s1,
                    s2,
                    a1,
                    a2,
                    KF.create_dynamic_map(True).to(device),
                    KF.create_dynamic_map(False).to(device),
                    torch.tensor([3] * len(p)),
                    1e-3,
                    0.9,
                    0.999,
                    0.0,
                    0.0,
                    1e-8,
                    0.01,
                    1.0,
                )
                torch.library.opcheck(torch.ops.kestrel.two_state8bit_step_.default, args)
            else:
                s1 = [torch.randn(t.shape, device=device) for t in p]
                s2 = [torch.rand(t.shape, device=device) for t in p]
                args = ("adam", p, g, s1, s2, torch.tensor([3] * len(p)), 1e-3, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.01, 1.0)
                torch.library.opcheck(torch.ops.kestrel.two_state32bit_step_.default, args)


def test_op_level_checks():
    p = [torch.randn(5000)]
    g = [torch.randn(4000)]
    s = [torch.zeros(5000, dtype=torch.uint8)]
    a = [torch.zeros(20)]
    code = KF.create_dynamic_map()
    with pytest.raises(RuntimeError, match="the gradient of parameter 0 must have 5000 elements, got 4000"):
        torch.ops.kestrel.two_state8bit_step_(
            "adam", p, g, s, s, a, a, code, code, torch.tensor([1]), 1e-3, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.0, 1.0
        )
    with pytest.raises(RuntimeError, match=r"must be contiguous float32 tensors of 1 x ceil\(5000 / 256\) = 20 values"):
        torch.ops.kestrel.two_state8bit_step_(
            "adam",
            p,
            [torch.randn(5000)],
            s,
            s,
            [torch.zeros(19)],
            a,
            code,
            code,
            torch.tensor([1]),
            1e-3,
            0.9,
            0.999,
            0.0,
            0.0,
            1e-8,
            0.0,
            1.0,
        )
    with pytest.raises(RuntimeError, match="steps must be a 1-D CPU int64 tensor of 1 step counts"):
        torch.ops.kestrel.two_state8bit_step_(
            "adam",
            p,
            [torch.randn(5000)],
            s,
            s,
            a,
            a,
            code,
            code,
            torch.tensor([1.0]),
            1e-3,
            0.9,
            0.999,
            0.0,
            0.0,
            1e-8,
            0.0,
            1.0,
        )
    with pytest.raises(RuntimeError, match="lr_tensor must be a one-element CPU float tensor"):
        torch.ops.kestrel.two_state8bit_step_(
            "adam",
            p,
            [torch.randn(5000)],
            s,
            s,
            a,
            a,
            code,
            code,
            torch.tensor([1]),
            1e-3,
            0.9,
            0.999,
            0.0,
            0.0,
            1e-8,
            0.0,
            1.0,
            -1,
            None,
            0.0,
            torch.tensor([1, 2]),
        )
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be >= 1, got 0"):
        torch.ops.kestrel.two_state8bit_step_(
            "adam",
            p,
            [torch.randn(5000)],
            s,
            s,
            a,
            a,
            code,
            code,
            torch.tensor([0]),
            1e-3,
            0.9,
            0.999,
            0.0,
            0.0,
            1e-8,
            0.0,
            1.0,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_kernel_equals_cpu_kernel(dtype):
    """The same inputs through the CUDA and the CPU kernel give bit-identical parameters and states."""
    torch.manual_seed(17)
    shapes = [(4097,), (300, 70), (1000,), (1 << 16,)]
    cpu = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    assert_cuda_equals_cpu(
        lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1),
        cpu,
        seed=18,
        grad_fn=lambda shape, dtype, gen: heterogeneous_grad(shape, dtype, "cpu", gen),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_parity_with_bitsandbytes_cuda(dtype):
    """100 steps on odd shapes beside bnb's CUDA AdamW8bit: uint8 states equal for >= 99.9% of elements,
    parameters within 1e-5 relative."""
    bnb_optim = bnb().optim
    torch.manual_seed(19)
    shapes = [(4097,), (1023, 77), (5, 4099)]
    ours = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, bnb_opt = AdamW8bit(ours, lr=1e-3), bnb_optim.AdamW8bit(theirs, lr=1e-3)
    for _ in range(100):
        for a, b in zip(ours, theirs):
            grad = torch.randn_like(a) * 0.1
            a.grad, b.grad = grad, grad.clone()
        opt.step()
        bnb_opt.step()
    for a, b in zip(ours, theirs):
        for key in ("state1", "state2"):
            same = (opt.state[a][key] == bnb_opt.state[b][key]).float().mean().item()
            assert same >= 0.999, (key, same)
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=0)


def bnb049_percentile_scale(history, grad, step, percentile):
    """bnb 0.49's percentile clipping, written out: the gradient scale of this step (history updated in place)."""
    history[step % 100] = grad.float().pow(2).sum()
    current = history[step % 100].sqrt()
    clip = torch.sort(history).values[percentile].sqrt()
    return float(clip / current) if current > clip else 1.0


@pytest.mark.parametrize("cls,eight_bit", [(AdamW8bit, True), (AdamW, False)])
def test_percentile_clipping_follows_bitsandbytes_049(cls, eight_bit):
    g = torch.Generator().manual_seed(20)
    p = torch.nn.Parameter(torch.randn(4097, generator=g))
    opt = cls([p], lr=1e-2, weight_decay=0.01, percentile_clipping=5)
    model = ReferenceRun([p], [eight_bit], 1e-2, BETAS, EPS, 0.01)
    history = torch.zeros(100)
    signed, unsigned = KF.create_dynamic_map(True), KF.create_dynamic_map(False)
    scales = []
    for step in range(1, 131):
        grad = torch.randn(4097, generator=g) * (10.0 if step % 7 == 0 else 1.0)  # spikes to clip
        scale = bnb049_percentile_scale(history, grad, step, 5)
        scales.append(scale)
        p.grad = grad
        opt.step()
        state = model.states[0]
        if eight_bit:
            ref.adam8bit_step(
                model.params[0], grad, *state, signed, unsigned, step, 1e-2, 0.9, 0.999, 1e-8, 0.01, scale
            )
        else:
            ref.adam32bit_step(model.params[0], grad, *state, step, 1e-2, 0.9, 0.999, 1e-8, 0.01, scale)
    assert torch.equal(p.detach(), model.params[0])
    assert torch.equal(opt.state[p]["gnorm_vec"], history)
    assert scales[0] == 0.0  # bnb 0.49: the unfilled history (zeros) clips the first steps to nothing
    assert any(0.0 < s < 1.0 for s in scales[100:]) and 1.0 in scales[100:]


def test_percentile_clipping_argument_check():
    with pytest.raises(ValueError, match=r"percentile_clipping must be an integer in \[1, 100\], got 0"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], percentile_clipping=0)
