"""bf16 stochastic rounding of parameters (bf16_stochastic_round=True, beyond bnb): unbiased, deterministic given
the seed, resumable."""

import io

import pytest
import torch
from helpers import devices

import kestrel
from kestrel.optim import AdamW8bit, Lion8bit, SGD8bit

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("lr", [1e-4, 1e-3])
def test_mean_of_rounded_tiny_steps_equals_the_float32_step(device, lr):
    """Lion moves each element by exactly lr; at 1.0 that is below bf16's resolution (2^-8 below 1), so round to
    nearest leaves every element at 1.0, while stochastic rounding keeps the mean at 1 - lr."""
    n = 1 << 16
    nearest = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=device))
    stochastic = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=device))
    torch.manual_seed(0)
    opts = Lion8bit([nearest], lr=lr), Lion8bit([stochastic], lr=lr, bf16_stochastic_round=True)
    for p, opt in zip((nearest, stochastic), opts):
        p.grad = torch.ones_like(p)
        opt.step()
    assert bool((nearest == 1).all())
    values = stochastic.detach().float()
    assert set(values.unique().tolist()) <= {1.0, 1.0 - 2**-8}
    p_low = lr / 2**-8
    standard_error = 2**-8 * (p_low * (1 - p_low) / n) ** 0.5
    assert abs(values.mean().item() - (1.0 - lr)) < 5 * standard_error


@pytest.mark.parametrize("cls,kwargs", [(AdamW8bit, dict(lr=1e-3)), (SGD8bit, dict(lr=1e-3, momentum=0.9))])
def test_deterministic_given_the_seed(cls, kwargs):
    def run(seed):
        torch.manual_seed(seed)
        p = torch.nn.Parameter((torch.randn(5000, generator=torch.Generator().manual_seed(1))).bfloat16())
        opt = cls([p], bf16_stochastic_round=True, **kwargs)
        g = torch.Generator().manual_seed(2)
        for _ in range(5):
            p.grad = torch.randn(5000, generator=g).bfloat16()
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_float32_parameters_are_not_affected():
    torch.manual_seed(3)
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(a.detach().clone())
    opts = AdamW8bit([a]), AdamW8bit([b], bf16_stochastic_round=True)
    for p, opt in zip((a, b), opts):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(a, b)


def test_resume_is_bit_identical():
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(5000).bfloat16())]
    opt = AdamW8bit(params, bf16_stochastic_round=True)
    g = torch.Generator().manual_seed(5)

    def train(o, ps, steps, generator):
        for _ in range(steps):
            ps[0].grad = torch.randn(5000, generator=generator).bfloat16()
            o.step()

    train(opt, params, 3, g)
    buffer = io.BytesIO()
    torch.save({"p": params[0].detach().clone(), "opt": opt.state_dict()}, buffer)
    assert "round_seed" in opt.state_dict()["param_groups"][0]
    train(opt, params, 3, torch.Generator().manual_seed(6))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    torch.manual_seed(123)  # a different seed at construction: the loaded one must win
    resumed = [torch.nn.Parameter(saved["p"].clone())]
    opt2 = AdamW8bit(resumed, bf16_stochastic_round=True)
    opt2.load_state_dict(saved["opt"])
    train(opt2, resumed, 3, torch.Generator().manual_seed(6))
    assert torch.equal(params[0], resumed[0])


@pytest.mark.gpu
def test_cuda_draws_the_same_bits_as_the_cpu():
    torch.manual_seed(7)
    cpu = [torch.nn.Parameter(torch.randn(4097).bfloat16())]
    cuda = [torch.nn.Parameter(cpu[0].detach().cuda())]
    torch.manual_seed(8)
    a = AdamW8bit(cpu, bf16_stochastic_round=True)
    torch.manual_seed(8)
    b = AdamW8bit(cuda, bf16_stochastic_round=True)
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        grad = torch.randn(4097, generator=g).bfloat16()
        cpu[0].grad, cuda[0].grad = grad, grad.cuda()
        a.step()
        b.step()
    assert torch.equal(cpu[0], cuda[0].cpu())
