"""kestrel's 8-bit optimizers under PyTorch's distributed engine, on CPU with two gloo processes: FSDP2 (DTensor
shards: 8-bit state per shard, bit-identical to one process where shards start at multiples of 256), DDP, and
torch.distributed.checkpoint across world sizes (save at 2 / load at 1 and the reverse)."""

import os
import socket

import dist_workers as W
import pytest
import torch

import kestrel

dist = pytest.importorskip("torch.distributed")
pytestmark = [
    pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, tmp_path, *args, world=2):
    os.makedirs(tmp_path, exist_ok=True)
    torch.multiprocessing.spawn(fn, args=(world, free_port(), str(tmp_path)) + args, nprocs=world, join=True)
    return torch.load(os.path.join(tmp_path, "rank0.pt"), weights_only=False)


def single_process(name, steps, start_seed=0, grad_offset=0, model=None, opt=None):
    """The reference run, on one thread as the workers are (dist_workers.init): kestrel's kernels give the same bits
    on any number of threads, but the BLAS need not (Muon's Newton-Schulz matmuls differ in the last bits between one
    and two threads on some CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model or W.Bag(seed=start_seed)
        params = list(model.parameters())
        opt = opt or W.make_optimizer(name, params)
        for step in range(steps):
            for p, g in zip(params, W.grads_for(grad_offset + step)):
                p.grad = g
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model, params, opt


def flat_state(opt, params):
    sd = opt.state_dict()
    out = []
    for index, _ in enumerate(params):
        state = dict(sd["state"][index])
        state.update(state.pop("__bnb_optimizer_quant_state__", {}))
        out.append(state)
    return out


ALIGNED, UNALIGNED, SMALL = (0, 1), 2, 3


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "Muon8bit", "AdamW4bit"])
def test_fsdp2_same_gradients_bit_identical_where_aligned(tmp_path, name):
    """(Muon8bit: each matrix's update is gathered to one rank, orthogonalised once, scattered back.)"""
    sharded = spawn(W.same_gradients, tmp_path, name, 4)
    _, params, opt = single_process(name, 4)
    single = flat_state(opt, params)
    for i in ALIGNED + (SMALL,):
        assert torch.equal(sharded["params"][i], params[i].detach()), f"parameter {i}"
        for key, value in single[i].items():
            if torch.is_tensor(value):
                assert torch.equal(sharded["state"][i][key], value), f"parameter {i}: {key}"
            else:
                assert sharded["state"][i][key] == value
    assert sharded["state"][ALIGNED[0]]["state1"].dtype == torch.uint8  # 8-bit: the global size decides
    assert sharded["state"][SMALL]["state1"].dtype == torch.float32
    # the unaligned shard: its own blocks, within the format's rounding of the single-process run
    moved = (params[UNALIGNED].detach() - W.Bag().weights[UNALIGNED].detach()).abs().mean()
    diff = (sharded["params"][UNALIGNED] - params[UNALIGNED].detach()).abs().mean()
    assert diff < 0.05 * moved


def test_fsdp2_unaligned_is_deterministic_and_lamb_reduces_norms(tmp_path):
    first = spawn(W.same_gradients, tmp_path / "a", "LAMB8bit", 3)
    second = spawn(W.same_gradients, tmp_path / "b", "LAMB8bit", 3)
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
    _, params, _ = single_process("LAMB8bit", 3)
    start = W.Bag().weights
    for i, (ours, single) in enumerate(zip(first["params"], params)):
        moved = (single.detach() - start[i].detach()).abs().mean()
        # the trust ratio uses the norms of the whole tensor (all-reduced), not of the shard
        assert (ours - single.detach()).abs().mean() < 0.05 * moved, f"parameter {i}"


def test_fsdp2_training_tracks_single_process(tmp_path):
    sharded = spawn(W.train_fsdp, tmp_path, 8)
    torch.manual_seed(0)
    model = W.mlp()
    opt = W.make_optimizer("AdamW8bit", model.parameters())
    losses = W.run_mlp(model, opt, 8)
    assert losses[-1] < losses[0]
    for ours, single in zip(sharded["params"], model.parameters()):
        torch.testing.assert_close(ours, single.detach(), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(losses), atol=1e-4, rtol=1e-3)


def test_ddp_equals_single_process(tmp_path):
    ddp = spawn(W.train_ddp, tmp_path, 5)
    torch.manual_seed(0)
    model = W.mlp()
    opt = W.make_optimizer("AdamW8bit", model.parameters())
    losses = W.run_mlp(model, opt, 5)
    for ours, single in zip(ddp["params"], model.parameters()):
        assert torch.equal(ours, single.detach())  # the mean of two equal gradients is that gradient
    assert ddp["losses"] == losses


@pytest.mark.parametrize("name", ["AdamW8bit", "Muon8bit", "AdamW4bit"])
def test_dcp_save_at_two_load_at_one(tmp_path, name):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = spawn(W.dcp_save, tmp_path, 3, name)
    model = W.Bag(seed=99)
    params = list(model.parameters())
    opt = W.make_optimizer(name, params)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=os.path.join(tmp_path, "ckpt"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    loaded = flat_state(opt, params)
    for i in range(len(params)):
        assert torch.equal(params[i].detach(), saved["params"][i])
        assert loaded[i]["step"] == 3
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in saved["state"][i]:
                assert torch.equal(loaded[i][key], saved["state"][i][key]), f"parameter {i}: {key}"
    # the resumed single-process run equals an uninterrupted one where the shards were aligned
    _, ref_params, _ = single_process(name, 5)
    single_process(name, 2, model=model, opt=opt, grad_offset=3)
    for i in ALIGNED + (SMALL,):
        assert torch.equal(params[i].detach(), ref_params[i].detach()), f"parameter {i}"


@pytest.mark.parametrize("name", ["AdamW8bit", "Muon8bit", "AdamW4bit"])
def test_dcp_save_at_one_load_at_two(tmp_path, name):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, params, opt = single_process(name, 3)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=os.path.join(tmp_path, "ckpt"),
    )
    before = flat_state(opt, params)
    result = spawn(W.dcp_load, tmp_path, 2, name)
    for i in range(len(params)):
        assert torch.equal(result["loaded"]["params"][i], params[i].detach())
        for key in ("state1", "state2", "absmax1", "absmax2"):
            # the unaligned parameter is requantized across its shard boundary on load (checked by its steps below)
            if key not in before[i] or i == UNALIGNED:
                continue
            assert torch.equal(result["loaded"]["state"][i][key], before[i][key]), f"parameter {i}: {key}"
    # two more steps at world size 2 equal two more steps of the single process where the shards are aligned
    single_process(name, 2, model=model, opt=opt, grad_offset=50)
    for i in ALIGNED + (SMALL,):
        assert torch.equal(result["params"][i], params[i].detach()), f"parameter {i}"
    moved = (params[UNALIGNED].detach() - W.Bag().weights[UNALIGNED].detach()).abs().mean()
    assert (result["params"][UNALIGNED] - params[UNALIGNED].detach()).abs().mean() < 0.05 * moved
