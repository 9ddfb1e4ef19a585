"""8-bit optimizers under torch.compile: a training step with optimizer.step() compiles with fullgraph=True, gives
the eager numbers, and does not recompile as the step count grows or an LR scheduler changes a tensor lr."""

import pytest
import torch
from helpers import assert_compiled_step_equals_eager

import kestrel
from kestrel import optim as K

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own closure of one code object: dynamo's per-code recompile budget starts afresh."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


SHAPES = [(64, 128), (4097,), (300,)]  # 8-bit, 8-bit with a partial block, 32-bit (below min_8bit_size)


def params_and_grads(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    grads = [[torch.randn(s, generator=g) * 0.1 for s in SHAPES] for _ in range(steps)]
    return start, grads


class CountingBackend:
    def __init__(self, inner="eager"):
        self.compiles, self.inner = 0, inner

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("AdamW8bit", {}),
        ("Lion8bit", {}),
        ("LAMB8bit", {}),
        ("SGD8bit", dict(momentum=0.9)),
        ("AdEMAMix8bit", {}),
        ("AdamW8bit", dict(robust_rounding=True)),
        ("RMSprop8bit", dict(robust_rounding=True)),
    ],
)
def test_compiled_step_equals_eager_without_recompiling(name, kwargs):
    """The first call builds the state; every later step reuses one graph (the step count is a tensor)."""
    start, grads = params_and_grads(6)
    cls = getattr(K, name)
    assert_compiled_step_equals_eager(lambda ps: cls(ps, lr=1e-3, **kwargs), start, grads)


def test_tensor_lr_with_a_scheduler_does_not_recompile():
    """torch's recipe for a compiled optimizer with an LR scheduler (the scheduler wraps step() in a function dynamo
    does not trace, so the step compiles as its own frame): a tensor lr, changed in place, never recompiles."""
    start, grads = params_and_grads(6, seed=1)
    eager = [torch.nn.Parameter(t.clone()) for t in start]
    compiled = [torch.nn.Parameter(t.clone()) for t in start]
    opt_eager = K.AdamW8bit(eager, lr=torch.tensor(1e-2))
    opt_compiled = K.AdamW8bit(compiled, lr=torch.tensor(1e-2))
    sched_eager = torch.optim.lr_scheduler.StepLR(opt_eager, step_size=1, gamma=0.5)
    sched_compiled = torch.optim.lr_scheduler.StepLR(opt_compiled, step_size=1, gamma=0.5)
    backend = CountingBackend()

    @torch.compile(fullgraph=False, backend=backend)
    def step(gs):
        for p, g in zip(compiled, gs):
            p.grad = g
        opt_compiled.step()

    after_warmup = None
    for index, gs in enumerate(grads):
        for p, g in zip(eager, gs):
            p.grad = g.clone()
        opt_eager.step()
        sched_eager.step()
        step([g.clone() for g in gs])
        sched_compiled.step()
        if index == 1:
            after_warmup = backend.compiles
    assert float(opt_compiled.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**6)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert backend.compiles == after_warmup, f"recompiled as the lr changed: {after_warmup} -> {backend.compiles}"


def test_float_and_tensor_lr_give_the_same_step():
    start, grads = params_and_grads(3, seed=2)
    a = [torch.nn.Parameter(t.clone()) for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    opt_a, opt_b = K.AdamW8bit(a, lr=1e-3), K.AdamW8bit(b, lr=torch.tensor(1e-3, dtype=torch.float64))
    for gs in grads:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_training_step_with_backward_compiles_fullgraph():
    """forward, backward and optimizer.step() in one fullgraph=True function (inductor), against eager."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace Tensor.backward() in a full graph")
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    models = [
        torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)) for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    opts = [K.AdamW8bit(m.parameters(), lr=1e-2) for m in models]

    def train_step(model, opt):
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(train_step, fullgraph=True)
        losses = [[], []]
        for _ in range(4):
            losses[0].append(train_step(models[0], opts[0]).item())
            opts[0].zero_grad()
            losses[1].append(compiled(models[1], opts[1]).item())
            opts[1].zero_grad()
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-6)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)


def test_capturable_checks_and_cpu_behaviour():
    start, grads = params_and_grads(3, seed=3)
    a = [torch.nn.Parameter(t.clone()) for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    opt_a, opt_b = K.AdamW8bit(a, lr=1e-3), K.AdamW8bit(b, lr=1e-3, capturable=True)
    for gs in grads:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)  # on the CPU, capturable changes nothing
    p = [torch.nn.Parameter(torch.randn(5000))]
    p[0].grad = torch.randn(5000)
    for make, message in [
        (lambda: K.AdamW8bit(p, capturable=True, percentile_clipping=5), "percentile_clipping reads the gradient norm"),
        (lambda: K.LAMB8bit(p, capturable=True), r"the trust ratio \(max_unorm=1.0\) is not capturable"),
        (lambda: K.AdEMAMix8bit(p, capturable=True, t_alpha=100), "warm-ups read the step on the host"),
    ]:
        with pytest.raises(ValueError, match=message):  # by the constructor: never at a later step
            make()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name,kwargs",
    [("AdamW8bit", {}), ("AdamW32bit", {}), ("Lion8bit", {}), ("SGD8bit", dict(momentum=0.9)), ("AdEMAMix8bit", {})],
)
def test_cuda_graph_replay_equals_eager(name, kwargs):
    """capturable=True: one step captured in a CUDA graph and replayed with new gradients and a changed device lr
    equals the same capturable optimizer stepped eagerly, bit for bit (and the non-capturable one within float
    rounding: the bias corrections are computed on the device)."""
    cls = getattr(K, name)
    start, grads = params_and_grads(8, seed=4)
    graphed = [torch.nn.Parameter(t.cuda()) for t in start]
    eager = [torch.nn.Parameter(t.cuda()) for t in start]
    lr_graphed = torch.tensor(1e-3, device="cuda")
    lr_eager = torch.tensor(1e-3, device="cuda")
    opt_g = cls(graphed, lr=lr_graphed, capturable=True, **kwargs)
    opt_e = cls(eager, lr=lr_eager, capturable=True, **kwargs)
    static = [torch.zeros_like(p) for p in graphed]
    for p, s in zip(graphed, static):
        p.grad = s
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds the state outside the capture
        for gs in grads[:2]:
            for s, g, p in zip(static, gs, eager):
                s.copy_(g.cuda())
                p.grad = g.cuda()
            opt_g.step()
            opt_e.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for index, gs in enumerate(grads[2:]):
        if index == 3:
            lr_graphed.fill_(5e-4)
            lr_eager.fill_(5e-4)
        for s, g, p in zip(static, gs, eager):
            s.copy_(g.cuda())
            p.grad = g.cuda()
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
        for key, value in opt_e.state[b].items():
            other = opt_g.state[a][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert int(opt_g.state[graphed[0]]["step"]) == 8
