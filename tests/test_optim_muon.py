"""Muon8bit / Muon32bit (kestrel.optim.muon): Newton-Schulz against a float64 SVD, the whole step against the
plain-PyTorch model with the 8-bit momentum modelled exactly, torch.optim.Muon, training, the AdamW groups,
checkpoints, argument checks, bad input changing nothing."""

import copy
import io

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_compiled_step_equals_eager, assert_cuda_equals_cpu, devices, same_state_value

import kestrel
from kestrel import optim as K
from kestrel.ops.quantize import DYNAMIC_MAP_SIGNED
from kestrel.optim.muon import DEFAULT_NS_COEFFICIENTS, lr_ratio, matrix_shape
from kestrel.reference import optim as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")


def quintic_image(s, steps=5, coefficients=DEFAULT_NS_COEFFICIENTS):
    a, b, c = coefficients
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


# ------------------------------------------------------------------------------------------------- Newton-Schulz
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (48, 48), (7, 300)])
def test_newton_schulz_in_float64_is_the_quintic_of_the_singular_values(shape):
    """NS5(G) = U p5(S / ||G||_F) V^T: the iteration acts on the singular values alone (float64, to 1e-12)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    expected = U @ torch.diag(quintic_image(S / S.square().sum().sqrt())) @ Vh
    ours = K.newton_schulz(G, dtype=torch.float64)
    assert ours.dtype == torch.float64 and ours.shape == G.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (256, 1024)])
def test_newton_schulz_float32_against_the_svd_polar_factor(shape):
    """float32 (the CPU's) within the known error band of the reference coefficients: every singular value of the
    result in [0.68, 1.14] for a well-conditioned matrix (the polar factor's are 1), the singular vectors the polar
    factor's, and within 2e-6 of the float64 iteration."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    ours = K.newton_schulz(G.float()).double()
    assert ours.shape == G.shape
    values = torch.linalg.svdvals(ours)
    assert values.min() > 0.68 and values.max() < 1.14, (values.min(), values.max())
    assert torch.linalg.matrix_norm(ours - polar, ord=2) < 0.33
    core = U.T @ ours @ Vh.T  # diagonal when the singular vectors are G's
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-5
    torch.testing.assert_close(ours, K.newton_schulz(G, dtype=torch.float64), rtol=0, atol=2e-6)


def test_newton_schulz_bfloat16_stays_in_its_band():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(96, 256, generator=g)
    ours = K.newton_schulz(G, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    values = torch.linalg.svdvals(ours.double())
    assert values.min() > 0.6 and values.max() < 1.25
    assert (ours.double() - K.newton_schulz(G.double(), dtype=torch.float64)).abs().max() < 0.02


def test_newton_schulz_of_extreme_but_legal_updates():
    """Scale invariance (an update whose squares overflow float32, one below eps), a zero update stays zero, a
    rank-deficient update keeps its null space, and the input is never changed."""
    g = torch.Generator().manual_seed(3)
    G = torch.randn(32, 64, generator=g)
    base = K.newton_schulz(G)
    for scale in (1e30, 1e-30, 3e38 / G.abs().max().item()):
        scaled = G * scale
        kept = scaled.clone()
        out = K.newton_schulz(scaled)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, base, rtol=0, atol=2e-6)
        assert torch.equal(scaled, kept)
    assert torch.equal(K.newton_schulz(torch.zeros(16, 8)), torch.zeros(16, 8))
    low_rank = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    values = torch.linalg.svdvals(K.newton_schulz(low_rank).double())
    assert (values[:2] > 0.6).all() and (values[2:] < 1e-4).all()  # float32 noise, amplified by a^5 ~ 490


def test_newton_schulz_batched_equals_one_at_a_time():
    g = torch.Generator().manual_seed(4)
    G = torch.randn(3, 20, 50, generator=g, dtype=torch.float64)
    batched = K.newton_schulz(G, dtype=torch.float64)
    for i in range(3):
        torch.testing.assert_close(batched[i], K.newton_schulz(G[i], dtype=torch.float64), rtol=0, atol=1e-13)


def test_newton_schulz_argument_errors():
    with pytest.raises(ValueError, match=r"newton_schulz: update must be a matrix .* got shape \(5,\)"):
        K.newton_schulz(torch.randn(5))
    with pytest.raises(ValueError, match="steps must be an integer >= 0, got -1"):
        K.newton_schulz(torch.randn(4, 4), steps=-1)


def test_lr_ratio_rules():
    assert lr_ratio((1024, 256), "original") == 2.0 and lr_ratio((256, 1024), None) == 1.0
    assert lr_ratio((256, 1024), "match_rms_adamw") == pytest.approx(0.2 * 32)
    assert matrix_shape((8, 3, 5, 5)) == (8, 75)


# ------------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("optim_bits", [8, 32])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_step_equals_the_reference_model_bit_for_bit(dtype, optim_bits, nesterov, adjust_lr_fn):
    """Ten steps of Muon8bit / Muon32bit against kestrel.reference.optim.muon_step (the momentum's float32
    operations and 8-bit requantization modelled exactly, float32 Newton-Schulz, torch.optim.Muon's decay and lr
    rule): the same bits, parameters and states; a tall, a wide and a 4-D parameter, one below min_8bit_size."""
    g = torch.Generator().manual_seed(5)
    shapes = [(300, 70), (64, 200), (16, 4, 3, 3), (20, 30)]
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in shapes]
    cls = K.Muon8bit if optim_bits == 8 else K.Muon32bit
    settings = dict(lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt = cls(params, **settings)
    model = [p.detach().clone() for p in params]
    states = None
    for step in range(1, 11):
        grads = [K_grad(p.shape, dtype, g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        if states is None:
            states = [model_state_zero(opt, p) for p in params]
        for mp, st, grad in zip(model, states, grads):
            ref.muon_step(mp, grad, *st, step, 0.02, 0.9, nesterov, 0.05, adjust_lr_fn)
        for p, mp, st in zip(params, model, states):
            assert torch.equal(p.detach(), mp), f"step {step}: parameter of shape {tuple(p.shape)}"
            assert torch.equal(opt.state[p]["state1"], st[0])
            if st[1] is not None:
                assert torch.equal(opt.state[p]["absmax1"], st[1])
    assert [opt.state[p]["state1"].dtype for p in params][-1] == torch.float32  # below min_8bit_size


def K_grad(shape, dtype, g):
    scale = 10 ** torch.empty(shape).uniform_(-3, 0, generator=g)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def model_state_zero(opt, p):
    """The reference's state before the first step: zeros of the optimizer's layout."""
    state = opt.state[p]
    if state["state1"].dtype == torch.uint8:
        blocks = state["absmax1"].numel()
        return (
            torch.full_like(state["state1"], int((state["qmap1"] == 0).nonzero()[0])),
            torch.zeros(blocks),
            state["qmap1"].clone(),
        )
    return torch.zeros_like(state["state1"]), None, None


def test_non_finite_gradient_elements_are_skipped():
    """A NaN/Inf gradient element contributes nothing to the update (its 8-bit momentum becomes 0), the rest steps."""
    g = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(128, 64, generator=g))
    opt = K.Muon8bit([p], lr=0.02, weight_decay=0.0)
    grad = torch.randn(128, 64, generator=g)
    p.grad = grad.clone()
    opt.step()
    bad = grad.clone()
    bad[3, 5], bad[100, 0], bad[7, 7] = float("nan"), float("inf"), -float("inf")
    p.grad = bad
    opt.step()
    assert torch.isfinite(p).all()
    momentum = K_dequant(opt, p)
    for r, c in ((3, 5), (100, 0), (7, 7)):
        assert momentum[r, c] == 0


def K_dequant(opt, p):
    from kestrel import functional as KF

    s = opt.state[p]
    return KF.dequantize_blockwise(s["state1"], absmax=s["absmax1"], code=s["qmap1"], blocksize=256).reshape(p.shape)


def test_muon32bit_follows_torch_muon():
    """Muon32bit with bfloat16 Newton-Schulz (torch's) against torch.optim.Muon over 20 steps: the same algorithm
    up to the rounding of the momentum (torch's lerp) and of the normalisation."""
    g = torch.Generator().manual_seed(7)
    a = torch.nn.Parameter(torch.randn(64, 128, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    theirs = torch.optim.Muon([a], lr=0.02, weight_decay=0.1)
    ours = K.Muon32bit([b], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    for _ in range(20):
        grad = torch.randn(64, 128, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
    torch.testing.assert_close(b, a, rtol=0, atol=2e-3)
    torch.testing.assert_close(ours.state[b]["state1"], theirs.state[a]["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_eight_bit_momentum_tracks_float32_momentum():
    """Muon8bit against Muon32bit on the same gradients: the 8-bit momentum is within the map's resolution of the
    float32 one, and the parameters stay close after 30 steps."""
    g = torch.Generator().manual_seed(8)
    a = torch.nn.Parameter(torch.randn(256, 128, generator=g) * 0.05)
    b = torch.nn.Parameter(a.detach().clone())
    eight, full = K.Muon8bit([a], lr=0.01), K.Muon32bit([b], lr=0.01)
    for _ in range(30):
        grad = torch.randn(256, 128, generator=g) * 0.1
        a.grad, b.grad = grad.clone(), grad.clone()
        eight.step()
        full.step()
    m8, m32 = K_dequant(eight, a), full.state[b]["state1"]
    # each step's requantization error (~1-2% of a block's values) decays with the momentum: a few percent in all
    assert ((m8 - m32).norm() / m32.norm()) < 0.05
    assert ((a - b).norm() / b.norm()) < 0.01


# ------------------------------------------------------------------------------------------------- training
def train(make_opt, model, data, steps):
    opt = make_opt(model)
    losses = []
    for step in range(steps):
        x, y = data[step % len(data)]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_trains_an_mlp_as_well_as_32bit_muon():
    torch.manual_seed(9)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    data = []
    for _ in range(8):
        x = torch.randn(128, 32)
        data.append((x, teacher(x).argmax(-1).detach()))
    base = torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    results = {}
    for name, cls in (("8bit", K.Muon8bit), ("32bit", K.Muon32bit)):
        model = copy.deepcopy(base)
        make = lambda m: cls(K.muon_param_groups(m, exclude=("4",)), lr=0.02, weight_decay=0.0)  # noqa: E731
        results[name] = train(make, model, data, 120)
    first = sum(results["32bit"][:8]) / 8
    last8, last32 = (sum(results[k][-8:]) / 8 for k in ("8bit", "32bit"))
    assert last32 < 0.3 * first and last8 < 0.3 * first
    assert last8 < 1.15 * last32 + 0.02, (last8, last32)


@pytest.mark.slow
def test_trains_the_demo_lm_as_well_as_32bit_muon():
    from kestrel.models import KestrelConfig, KestrelLM
    from kestrel.models.training import lm_loss, train_steps

    torch.manual_seed(10)
    config = KestrelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base = KestrelLM(config)
    period = torch.randint(0, 64, (12,))
    batches = [
        torch.stack([period.roll(-int(o)).repeat(4)[:33] for o in torch.randint(0, 12, (8,))]) for _ in range(60)
    ]
    finals = {}
    for name, cls in (("8bit", K.Muon8bit), ("32bit", K.Muon32bit)):
        model = copy.deepcopy(base)
        opt = cls(K.muon_param_groups(model, adamw_lr=3e-3), lr=0.02, weight_decay=0.0, adjust_lr_fn=None)
        losses = train_steps(model, opt, batches, lm_loss)
        finals[name] = sum(losses[-5:]) / 5
        assert finals[name] < 0.5 * losses[0]
    assert finals["8bit"] < 1.2 * finals["32bit"] + 0.05, finals


# ------------------------------------------------------------------------------------------------- groups
def test_param_groups_split_a_model_the_usual_way():
    from kestrel.models import KestrelConfig, KestrelLM

    model = KestrelLM(KestrelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32))
    groups = K.muon_param_groups(model, lr=1e-3)
    muon, adamw = groups
    assert muon["use_muon"] and not adamw["use_muon"] and adamw["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in muon["params"])
    assert not any(names[id(p)].startswith(("embed", "lm_head")) for p in muon["params"])
    assert any(names[id(p)].startswith("embed") for p in adamw["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    (only,) = K.muon_param_groups(tied)
    assert not only["use_muon"] and len(only["params"]) == 1


def test_adamw_groups_step_as_adamw8bit():
    """A use_muon=False group is kestrel's AdamW8bit, bit for bit, with the adamw_* settings."""
    g = torch.Generator().manual_seed(11)
    emb = torch.nn.Parameter(torch.randn(100, 64, generator=g))
    bias = torch.nn.Parameter(torch.randn(64, generator=g))
    mat = torch.nn.Parameter(torch.randn(64, 64, generator=g))
    twins = [torch.nn.Parameter(t.detach().clone()) for t in (emb, bias)]
    opt = K.Muon8bit(
        [{"params": [mat]}, {"params": [emb, bias], "use_muon": False}],
        lr=0.02,
        adamw_lr=1e-3,
        adamw_betas=(0.9, 0.95),
        adamw_weight_decay=0.01,
    )
    adamw = K.AdamW8bit(twins, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    for _ in range(5):
        for a, b in zip((emb, bias), twins):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad, grad.clone()
        mat.grad = torch.randn(64, 64, generator=g)
        opt.step()
        adamw.step()
    for a, b in zip((emb, bias), twins):
        assert torch.equal(a, b)
        for key, value in adamw.state[b].items():
            assert same_state_value(opt.state[a][key], value), key
    assert set(opt.state[mat]) == {"step", "state1", "absmax1", "qmap1"}
    assert opt.param_groups[1]["eps"] == 1e-8 and opt.param_groups[0]["eps"] == 1e-7


# ------------------------------------------------------------------------------------------------- checkpoints
def make_run(seed=12):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in [(128, 96), (40, 30), (300,), (50, 64)]]
    groups = [{"params": params[:2]}, {"params": params[2:], "use_muon": False}]
    return params, groups


def run_steps(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.1
        opt.step()


@pytest.mark.parametrize("cls", [K.Muon8bit, K.Muon32bit])
def test_checkpoint_round_trip_resumes_bit_identically(cls):
    params, groups = make_run()
    straight = cls(groups, lr=0.02)
    run_steps(straight, params, 3, 1)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": straight.state_dict()}, buffer)
    run_steps(straight, params, 3, 2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_params, resumed_groups = make_run()
    for p, value in zip(resumed_params, saved["params"]):
        p.data.copy_(value)
    resumed = cls(resumed_groups, lr=0.02)
    resumed.load_state_dict(saved["opt"])
    run_steps(resumed, resumed_params, 3, 2)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        for key, value in straight.state[a].items():
            assert same_state_value(value, resumed.state[b][key]), key
    layout = straight.state_dict()["state"]
    if cls is K.Muon8bit:  # the Muon matrix as SGD8bit's state, the AdamW vector as AdamW8bit's
        assert set(layout[0]) == {"step", "__bnb_optimizer_quant_state__"}
        assert set(layout[0]["__bnb_optimizer_quant_state__"]) == {"state1", "absmax1", "qmap1"}
        assert "state2" in layout[2] or "state2" in layout[2].get("__bnb_optimizer_quant_state__", {})


def test_load_rejects_another_optimizers_state_and_changes_nothing():
    params, groups = make_run()
    opt = K.Muon8bit(groups, lr=0.02)
    run_steps(opt, params, 1, 1)
    before = copy.deepcopy(opt.state_dict())
    adamw = K.AdamW8bit([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3)
    run_steps(adamw, params, 1, 1)
    with pytest.raises(ValueError, match=r"parameter 0 .* keeps one state but the state_dict has state2"):
        opt.load_state_dict(adamw.state_dict())
    after = opt.state_dict()
    for index, state in before["state"].items():
        for key, value in state.items():
            if key == "__bnb_optimizer_quant_state__":
                for k, v in value.items():
                    assert torch.equal(v, after["state"][index][key][k])
            else:
                assert same_state_value(value, after["state"][index][key])


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(momentum=1.0), ValueError, r"Muon8bit: momentum must be in \[0, 1\), got 1.0"),
        (dict(momentum="0.9"), TypeError, "momentum must be a number, got '0.9'"),
        (dict(nesterov=1), TypeError, "nesterov must be True or False, got 1"),
        (dict(ns_steps=0), ValueError, r"ns_steps must be an integer in \[1, 100\), got 0"),
        (dict(ns_coefficients=(1.0, 2.0)), ValueError, r"ns_coefficients must be three finite numbers"),
        (dict(adjust_lr_fn="rms"), ValueError, "adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got 'rms'"),
        (dict(ns_dtype=torch.int32), ValueError, "ns_dtype must be None"),
        (dict(lr=-1.0), ValueError, "lr must be >= 0, got -1.0"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0, got -1.0"),
        (dict(adamw_betas=(0.9, 1.5)), ValueError, r"adamw_betas\[1\] must be in \[0, 1\), got 1.5"),
        (dict(adamw_lr=float("nan")), ValueError, "adamw_lr must be >= 0, got nan"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        K.Muon8bit([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_vectors_in_a_muon_group_are_rejected():
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 has shape \(7,\); Muon orthogonalises matrices"):
        K.Muon8bit([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(7))])
    with pytest.raises(TypeError, match="use_muon must be True or False, got 'yes'"):
        K.Muon8bit([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "use_muon": "yes"}])


def test_a_bad_step_changes_nothing():
    """A bad setting edited into a group, or a gradient of the wrong shape, is rejected before any parameter or
    state changes."""
    params, groups = make_run()
    opt = K.Muon8bit(groups, lr=0.02)
    run_steps(opt, params, 2, 1)
    snapshot = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["ns_steps"] = 0
    for p in params:
        p.grad = torch.randn(p.shape)
    with pytest.raises(ValueError, match=r"parameter group 0: ns_steps must be an integer in \[1, 100\), got 0"):
        opt.step()
    opt.param_groups[0]["ns_steps"] = 5
    opt.param_groups[1]["betas"] = (0.9, 2.0)  # the AdamW group's: checked before the Muon group steps
    with pytest.raises(ValueError, match=r"parameter group 1: betas\[1\] must be in \[0, 1\), got 2.0"):
        opt.step()
    for p, kept in zip(params, snapshot[0]):
        assert torch.equal(p, kept)
    assert int(opt.state[params[0]]["step"]) == 2
    assert torch.equal(
        opt.state[params[0]]["state1"], snapshot[1]["state"][0]["__bnb_optimizer_quant_state__"]["state1"]
    )


# ------------------------------------------------------------------------------------------------- the GPU
@pytest.mark.gpu
def test_cuda_momentum_equals_cpu_momentum():
    """The CUDA momentum kernel equals the CPU one bit for bit (state and update); the whole step, whose
    Newton-Schulz runs in bfloat16 with cuBLAS on the GPU, stays within the bfloat16 band."""
    torch.manual_seed(13)
    cpu = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 70), (64, 200)]]
    assert_cuda_equals_cpu(lambda ps: K.Muon8bit(ps, lr=0.0, weight_decay=0.0), cpu)
    a = torch.nn.Parameter(torch.randn(256, 512))
    b = torch.nn.Parameter(a.detach().cuda())
    oa, ob = K.Muon8bit([a], lr=0.02), K.Muon8bit([b], lr=0.02)
    for _ in range(5):
        grad = torch.randn(256, 512)
        a.grad, b.grad = grad, grad.cuda()
        oa.step()
        ob.step()
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=5e-3)


@pytest.mark.parametrize("device", devices())
def test_opcheck_of_the_muon_kind(device):
    code = DYNAMIC_MAP_SIGNED.to(device)
    p, g = [torch.zeros(5000, device=device)], [torch.randn(5000, device=device)]
    s = [torch.randint(0, 256, (5000,), dtype=torch.uint8, device=device)]
    a = [torch.rand(20, device=device)]
    torch.library.opcheck(
        torch.ops.kestrel.one_state8bit_step_.default,
        ("muon", p, g, s, a, code, torch.tensor([2]), 0.0, 0.95, 0.95, 0.0, 0.0, 1.0),
    )


# ------------------------------------------------------------------------------------------------- torch.compile
def test_compiled_step_equals_eager_without_recompiling():
    """A Muon8bit step (Muon matrices, one below min_8bit_size, and an AdamW8bit group) compiles with fullgraph=True,
    gives the eager bits and compiles once more at most after the first step builds the state."""
    g = torch.Generator().manual_seed(14)
    shapes = [(64, 128), (300, 70), (20, 30), (4097,)]
    start = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=g) * 0.1 for s in shapes] for _ in range(5)]
    assert_compiled_step_equals_eager(
        lambda ps: K.Muon8bit([{"params": ps[:3]}, {"params": ps[3:], "use_muon": False}], lr=0.02), start, grads
    )
