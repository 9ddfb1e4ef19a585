"""Fuzzing the 8-bit optimizers: constructor arguments, extreme gradients and layouts against the plain-PyTorch
model, rejected steps and checkpoints that must change nothing."""

import copy
import inspect

import pytest
import torch
from cases import note, raises_clearly, tensors
from hypothesis import given
from hypothesis import strategies as st

import kestrel
from kestrel import functional as KF
from kestrel import optim as O
from kestrel.reference import optim as ref

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

CLASSES = [
    getattr(O, name)
    for name in O.__all__
    if isinstance(getattr(O, name), type) and name not in ("GlobalOptimManager", "Optimizer8bit")
]
NAN, INF = float("nan"), float("inf")
ARGUMENT_VALUES = {
    "lr": [
        1e-3,
        0.0,
        -1.0,
        NAN,
        INF,
        "1e-3",
        None,
        True,
        torch.tensor(1e-3),
        torch.tensor(1),
        torch.tensor([1e-3, 2e-3]),
    ],
    "betas": [
        (0.9, 0.999),
        (0.9, 0.999, 0.9999),
        (0.9,),
        (2, 5),
        (-0.1, 0.9),
        (0.9, 1.0),
        "(0.9, 0.99)",
        0.9,
        None,
        (NAN, 0.9),
        ("a", 0.9),
    ],
    "eps": [1e-8, 0, -1.0, NAN, INF, "x", None],
    "weight_decay": [0, 0.01, -0.1, NAN, True],
    "momentum": [0.9, 0, -0.9, 1.5, NAN, "x"],
    "alpha": [0.99, 0, 1.5, -1.0, 5.0, NAN],
    "min_8bit_size": [4096, 0, -1, "x", 1.5, True],
    "optim_bits": [8, 32, 16, True, "8"],
    "percentile_clipping": [100, 5, 0, 101, 5.5, True],
    "max_unorm": [0.0, 1.0, -1.0, NAN],
    "t_alpha": [None, 10, 0, -5, NAN],
    "t_beta3": [None, 10, 0, -5, NAN],
    "dampening": [0, 0.1],
    "nesterov": [False, True],
    "centered": [False, True],
    "lr_decay": [0, 0.5],
    "initial_accumulator_value": [0, 0.1],
    "amsgrad": [False, True],
    "block_wise": [True, False],
    "bias_correction": [True, False],
    "adam_w_mode": [True, False],
    "robust_rounding": [False, True, 1, "yes"],
    "bf16_stochastic_round": [False, True, 1],
    "capturable": [False, True, "no"],
    "is_paged": [False, True, 0],
}


@st.composite
def constructor_calls(draw):
    cls = draw(st.sampled_from(CLASSES))
    kwargs = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "params", "args") or name not in ARGUMENT_VALUES:
            continue
        required = parameter.default is inspect.Parameter.empty
        if required or draw(st.integers(0, 9)) < 3:
            kwargs[name] = draw(st.sampled_from(ARGUMENT_VALUES[name]))
    return cls, kwargs


def small_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5000, generator=g)), torch.nn.Parameter(torch.randn(10, generator=g))]


@given(constructor_calls())
def test_constructors_accept_or_reject_clearly_and_what_they_accept_steps(call):
    cls, kwargs = call
    note(f"{cls.__name__}({kwargs})")
    params = small_params()
    built = []
    error = raises_clearly(lambda: built.append(cls(params, **kwargs)), cls.__name__)
    if error is not None:
        assert isinstance(error, (TypeError, ValueError, NotImplementedError)), repr(error)
        return
    opt = built[0]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # nothing the constructor accepted may fail inside step()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)


# ------------------------------------------------------------------------------------------------- steps
KINDS = {  # kind -> (maker, normalized update, reference call or None)
    "adam": (lambda ps, robust: O.AdamW8bit(ps, lr=1e-3, robust_rounding=robust), True),
    "adam32": (lambda ps, robust: O.AdamW32bit(ps, lr=1e-3, robust_rounding=robust), True),
    "ademamix": (lambda ps, robust: O.AdEMAMix8bit(ps, lr=1e-3, robust_rounding=robust), True),
    "lamb": (lambda ps, robust: O.LAMB8bit(ps, lr=1e-3, robust_rounding=robust), True),
    "momentum": (lambda ps, robust: O.SGD8bit(ps, lr=1e-3, momentum=0.9, robust_rounding=robust), False),
    "lars": (lambda ps, robust: O.LARS8bit(ps, lr=1e-3, momentum=0.9, robust_rounding=robust), False),
    "rmsprop": (lambda ps, robust: O.RMSprop8bit(ps, lr=1e-3, robust_rounding=robust), True),
    "adagrad": (lambda ps, robust: O.Adagrad8bit(ps, lr=1e-3, robust_rounding=robust), True),
    "lion": (lambda ps, robust: O.Lion8bit(ps, lr=1e-3, robust_rounding=robust), True),
}


class Reference:
    """The plain-PyTorch model of one flat float32 parameter's steps (kestrel.reference.optim)."""

    def __init__(self, kind, opt, p, robust):
        self.kind, self.robust = kind, robust
        self.group = opt.param_groups[0]
        self.args = opt.args
        self.p = p.detach().clone().reshape(-1)
        n = self.p.numel()
        self.eight = kind != "adam32" and n >= 4096
        blocks = (n + 255) // 256
        moments = 2 if kind == "ademamix" else 1
        if self.eight:
            self.s1, self.a1 = torch.zeros(moments * n, dtype=torch.uint8), torch.zeros(moments, blocks).squeeze(0)
            self.s2, self.a2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)
        else:
            self.s1, self.s2, self.a1, self.a2 = torch.zeros(moments * n), torch.zeros(n), None, None
        self.step_count = 0

    def step(self, grad):
        self.step_count += 1
        g, t = self.group, self.step_count
        signed, unsigned = KF.create_dynamic_map(True), KF.create_dynamic_map(False)
        wd, eps = g["weight_decay"], g["eps"]
        max_unorm = getattr(self.args, "max_unorm", 0.0) or 0.0
        if self.kind in ("adam", "adam32", "lamb"):
            if self.eight:
                ref.adam8bit_step(
                    self.p,
                    grad,
                    self.s1,
                    self.s2,
                    self.a1,
                    self.a2,
                    signed,
                    unsigned,
                    t,
                    g["lr"],
                    *g["betas"],
                    eps,
                    wd,
                    max_unorm=max_unorm,
                    robust_rounding=self.robust,
                )
            else:
                ref.adam32bit_step(
                    self.p, grad, self.s1, self.s2, t, g["lr"], *g["betas"], eps, wd, max_unorm=max_unorm
                )
        elif self.kind == "ademamix":
            ref.ademamix_step(
                self.p,
                grad,
                self.s1,
                self.s2,
                self.a1,
                self.a2,
                signed if self.eight else None,
                unsigned if self.eight else None,
                t,
                g["lr"],
                *g["betas"],
                g["alpha"],
                eps,
                wd,
                robust_rounding=self.robust,
            )
        else:
            kind = "momentum" if self.kind == "lars" else self.kind
            ref.one_state_step(
                kind,
                self.p,
                grad,
                self.s1,
                self.a1,
                signed if self.eight else None,
                t,
                g["lr"],
                *g["betas"],
                eps,
                wd,
                max_unorm=max_unorm,
                robust_rounding=self.robust,
            )


@st.composite
def step_cases(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    n = draw(st.sampled_from([1, 255, 256, 257, 4096, 4097, 5000]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    robust = draw(st.booleans())
    grads = [tensors((n,), draw, special_fraction=0.02, scale_range=(-30, 18)) for _ in range(3)]
    return kind, n, dtype, layout, robust, grads


def make_param(n, dtype, layout):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    if layout == "transposed" and n % 2 == 0:
        return torch.nn.Parameter(x.reshape(2, n // 2).t().contiguous().t().reshape(2, n // 2))
    if layout == "strided":
        base = torch.zeros(2 * n, dtype=dtype)
        base[::2] = x
        return torch.nn.Parameter(base[::2])
    return torch.nn.Parameter(x)


@given(step_cases())
def test_steps_on_extreme_gradients_keep_the_invariants_and_the_reference(case):
    kind, n, dtype, layout, robust, grads = case
    note(f"step kind={kind} n={n} dtype={dtype} layout={layout} robust={robust}")
    maker, normalized = KINDS[kind]
    p = make_param(n, dtype, layout)
    opt = maker([p], robust)
    model = Reference(kind, opt, p, robust) if dtype == torch.float32 else None
    for grad in grads:
        grad = grad.to(dtype).reshape(p.shape)
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        if model is not None:
            model.step(grad.reshape(-1).float())
        skipped = ~torch.isfinite(grad)
        if kind not in ("momentum", "lars", "lion"):  # these square the gradient: an overflowing square skips too
            skipped |= grad.float().abs() > 1.85e19
        assert torch.equal(p.detach()[skipped], before[skipped])
        if normalized and robust:  # bnb's rounding can divide by eps under such spikes (the README's hazard)
            assert bool(torch.isfinite(p).all()), "a finite parameter became non-finite"
        state = opt.state[p]
        for key in ("absmax1", "absmax2"):
            if key in state:
                assert bool(torch.isfinite(state[key]).all()), key
    if model is not None:
        assert torch.equal(p.detach().reshape(-1), model.p), "differs from kestrel.reference.optim"


# ------------------------------------------------------------------------------------------------- rejected steps
def everything(opt, params):
    out = [p.detach().clone() for p in params]
    for p in params:
        for _key, value in sorted(opt.state[p].items()):
            out.append(value.clone() if torch.is_tensor(value) else copy.deepcopy(value))
    return out


def unchanged(a, b):
    return len(a) == len(b) and all(
        (torch.equal(x, y) if x.dtype != torch.float32 else torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)))
        if torch.is_tensor(x)
        else x == y
        for x, y in zip(a, b)
    )


# (torch itself refuses a gradient of another shape, dtype or device than its tensor's, and integer data)
DEFECTS = ["param_dtype", "resized", "lr_negative", "lr_string", "betas_range", "eps_nan", "sparse_grad", "expanded"]


@given(st.sampled_from(sorted(KINDS)), st.sampled_from(DEFECTS), st.integers(0, 1))
def test_a_rejected_step_changes_nothing(kind, defect, which):
    note(f"rejected kind={kind} defect={defect} which={which}")
    maker, _ = KINDS[kind]
    params = [torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(300))]
    opt = maker(params, False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    target = params[which]
    if defect == "param_dtype":  # torch refuses a gradient of another dtype; a parameter's data can change
        target.data = target.data.double()
    elif defect == "resized":
        target.data = torch.randn(target.numel() + 256)
        target.grad = torch.randn_like(target)
    elif defect in ("lr_negative", "lr_string", "betas_range", "eps_nan"):
        key, value = {
            "lr_negative": ("lr", -1.0),
            "lr_string": ("lr", "0.1"),
            "betas_range": ("betas", (0.5, 1.5)),
            "eps_nan": ("eps", NAN),
        }[defect]
        opt.param_groups[0][key] = value
    elif defect == "sparse_grad":
        target.grad = target.grad.to_sparse()
    elif defect == "expanded":
        target.data = torch.randn(1).expand(target.numel())
        target.grad = torch.randn(target.numel())
    before = everything(opt, params)
    error = raises_clearly(opt.step, type(opt).__name__)
    assert error is not None, f"{defect} was accepted"
    assert unchanged(before, everything(opt, params)), "a rejected step changed the state"


# ------------------------------------------------------------------------------------------------- checkpoints
SOURCES = {
    "adam": lambda ps: O.AdamW8bit(ps),
    "ademamix": lambda ps: O.AdEMAMix8bit(ps),
    "lion": lambda ps: O.Lion8bit(ps),
    "momentum": lambda ps: O.SGD8bit(ps, lr=0.1, momentum=0.9),
    "adam32": lambda ps: O.AdamW32bit(ps),
    "torch": lambda ps: torch.optim.AdamW(ps),
}
DAMAGES = [
    "none",
    "drop_state2",
    "drop_step",
    "step_negative",
    "step_float",
    "qmap_nan",
    "qmap_unsorted",
    "absmax_short",
    "state1_dtype",
    "state1_short",
    "group_betas",
    "group_lr",
    "extra_group",
    "not_a_dict",
]


def damaged(sd, damage):
    """(the damaged state_dict, whether the damage applied: a 32-bit state has no qmap to spoil)."""
    sd = copy.deepcopy(sd)
    if damage == "not_a_dict":
        return [sd], True
    state = sd["state"][0]
    state.update(state.pop("__bnb_optimizer_quant_state__", {}))
    edits = {
        "drop_state2": ("state2", lambda st: st.pop("state2")),
        "drop_step": ("step", lambda st: st.pop("step")),
        "step_negative": ("step", lambda st: st.__setitem__("step", -1)),
        "step_float": ("step", lambda st: st.__setitem__("step", 2.5)),
        "qmap_nan": ("qmap1", lambda st: st["qmap1"].__setitem__(3, NAN)),
        "qmap_unsorted": ("qmap1", lambda st: st.__setitem__("qmap1", st["qmap1"].flip(0))),
        "absmax_short": ("absmax1", lambda st: st.__setitem__("absmax1", st["absmax1"].reshape(-1)[:2])),
        "state1_dtype": ("state1", lambda st: st.__setitem__("state1", st["state1"].double())),
        "state1_short": ("state1", lambda st: st.__setitem__("state1", st["state1"].reshape(-1)[:-1])),
    }
    if damage in edits:
        key, edit = edits[damage]
        if key not in state:
            return sd, False
        edit(state)
    elif damage == "group_betas":
        sd["param_groups"][0]["betas"] = (0.9, 7.0)
    elif damage == "group_lr":
        sd["param_groups"][0]["lr"] = "fast"
    elif damage == "extra_group":
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[99]))
    return sd, damage != "none"


def compatible(source, target):
    """Checkpoints that load legitimately: the same kind, Adam's 32-bit state into 8-bit Adam (kept 32-bit, as bnb
    does) and back, and SGD's into Lion (one state each; the groups' settings are valid for both)."""
    return source == target or {source, target} == {"adam", "adam32"} or (source, target) == ("momentum", "lion")


@given(
    st.sampled_from(sorted(SOURCES)),
    st.sampled_from(sorted(k for k in SOURCES if k != "torch")),
    st.sampled_from(DAMAGES),
)
def test_a_checkpoint_loads_exactly_or_is_rejected_with_the_state_kept(source, target, damage):
    note(f"checkpoint {source} -> {target} damage={damage}")
    p_src = torch.nn.Parameter(torch.randn(4096))
    src = SOURCES[source]([p_src])
    for _ in range(2):
        p_src.grad = torch.randn(4096)
        src.step()
    sd, applied = damaged(src.state_dict(), damage)
    p = torch.nn.Parameter(torch.randn(4096))
    opt = SOURCES[target]([p])
    p.grad = torch.randn(4096)
    opt.step()
    before = everything(opt, [p])
    error = raises_clearly(lambda: opt.load_state_dict(sd), type(opt).__name__)
    if error is not None:
        assert isinstance(error, (ValueError, TypeError)), repr(error)
        assert unchanged(before, everything(opt, [p])), "a rejected checkpoint changed the state"
    else:
        if source in ("adam", "adam32") and damage == "drop_state2":  # a first moment alone: a one-state checkpoint
            source, applied = "lion", False
        assert not applied, f"damage {damage} to {source}'s checkpoint was accepted by {target}"
        assert compatible(source, target), f"{source}'s checkpoint was accepted by {target}"
    p.grad = torch.randn(4096)
    opt.step()  # usable either way
    assert bool(torch.isfinite(p).all())
