"""GlobalOptimManager overrides and StableEmbedding (bitsandbytes' API)."""

import math

import pytest
import torch

import kestrel
from kestrel.nn import StableEmbedding
from kestrel.optim import AdamW8bit, GlobalOptimManager, Lion8bit

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128))


def step(opt, net, steps=1):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("when", ["before", "after"])
def test_override_optim_bits_before_or_after_the_optimizer(when):
    net = model()
    mng = GlobalOptimManager.get_instance()
    if when == "before":
        mng.override_config(net[0].weight, "optim_bits", 32)
    opt = AdamW8bit(net.parameters())
    if when == "after":
        mng.override_config(net[0].weight, "optim_bits", 32)
    step(opt, net)
    assert opt.state[net[0].weight]["state1"].dtype == torch.float32
    assert opt.state[net[2].weight]["state1"].dtype == torch.uint8


def test_register_parameters_then_override_by_index():
    net = model()
    mng = GlobalOptimManager.get_instance()
    mng.override_config([net[2].weight], key_value_dict={"optim_bits": 32})
    mng.register_parameters(net.parameters())
    assert (0, 2) in mng.index2config
    opt = AdamW8bit(net.parameters())
    step(opt, net)
    assert opt.state[net[2].weight]["state1"].dtype == torch.float32
    assert opt.state[net[0].weight]["state1"].dtype == torch.uint8


def test_override_hyperparameters_equals_a_separate_optimizer():
    net, twin = model(), model()
    GlobalOptimManager.get_instance().override_config(net[0].weight, key_value_dict={"lr": 1e-2, "betas": (0.8, 0.95)})
    opt = AdamW8bit(net.parameters(), lr=1e-3)
    twin_opts = [
        AdamW8bit([twin[0].weight], lr=1e-2, betas=(0.8, 0.95)),
        AdamW8bit([p for name, p in twin.named_parameters() if name != "0.weight"], lr=1e-3),
    ]
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        for a, b in zip(net.parameters(), twin.parameters()):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad, grad.clone()
        opt.step()
        for o in twin_opts:
            o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_override_arguments_are_checked():
    mng = GlobalOptimManager.get_instance()
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="give key and value, or key_value_dict, not both"):
        mng.override_config(p, "lr", 1.0, {"lr": 2.0})
    with pytest.raises(ValueError, match="nothing to override"):
        mng.override_config(p)
    with pytest.raises(RuntimeError, match="use GlobalOptimManager.get_instance"):
        GlobalOptimManager()


def test_stable_embedding_keeps_32bit_state():
    torch.manual_seed(3)
    emb = StableEmbedding(1000, 64, padding_idx=0)
    head = torch.nn.Linear(64, 1000)
    params = list(emb.parameters()) + list(head.parameters())
    opt = Lion8bit(params, lr=1e-3)
    tokens = torch.randint(0, 1000, (8, 16))
    loss = torch.nn.functional.cross_entropy(head(emb(tokens)).reshape(-1, 1000), tokens.reshape(-1))
    loss.backward()
    opt.step()
    assert emb.weight.numel() >= 4096
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert opt.state[head.weight]["state1"].dtype == torch.uint8


def test_stable_embedding_init_and_forward():
    torch.manual_seed(4)
    emb = StableEmbedding(500, 32, padding_idx=3)
    bound = math.sqrt(6.0 / (500 + 32))
    weight = emb.weight.detach()
    assert bool((weight.abs() <= bound).all()) and weight.abs().max() > 0.9 * bound
    assert bool((weight[3] == 0).all())
    tokens = torch.tensor([[1, 3, 499]])
    expected = torch.nn.functional.layer_norm(weight[tokens], (32,), emb.norm.weight, emb.norm.bias)
    torch.testing.assert_close(emb(tokens), expected)
    half = StableEmbedding(10, 8, dtype=torch.bfloat16)
    assert half(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert half.norm.weight.dtype == torch.float32  # bnb's float32 LayerNorm for a bf16 weight
    cast = StableEmbedding(10, 8).double()  # a module cast as a whole (model.double()) still runs
    out = cast(torch.tensor([1, 2]))
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, torch.nn.functional.layer_norm(cast.weight[[1, 2]], (8,), cast.norm.weight, cast.norm.bias)
    )
