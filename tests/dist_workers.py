"""Worker processes of test_optim_distributed.py (two ranks, gloo, CPU): FSDP2, DDP and distributed checkpoints with
kestrel's 8-bit optimizers. Each worker writes what the test compares to `out_dir/rank<r>.pt`."""

import os

import torch
import torch.distributed as dist

# Parameter shapes: the first two shard at multiples of 256 elements over 2 ranks ("aligned"); the third does not
# ((33, 200): rank 1 starts at element 17 * 200 = 3400); the fourth is below min_8bit_size (32-bit state).
SHAPES = [(128, 64), (512, 16), (33, 200), (40, 30)]


def init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def finish():
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active exception"), which
    # spawn reports as a crash: leave without it (rank 0 has written its result already)
    os._exit(0)


class Bag(torch.nn.Module):
    """A module holding one parameter per shape (FSDP2 shards each parameter on dim 0)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES])


def grads_for(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * 0.1 for s in SHAPES]


def make_optimizer(name, params):
    from kestrel import optim as K

    if name == "AdamW8bit":
        return K.AdamW8bit(params, lr=1e-2, weight_decay=0.01)
    if name == "Lion8bit":
        return K.Lion8bit(params, lr=1e-3, weight_decay=0.01)
    if name == "LAMB8bit":
        return K.LAMB8bit(params, lr=1e-2, weight_decay=0.01)
    if name == "AdamW4bit":
        return K.AdamW4bit(params, lr=1e-2, weight_decay=0.01)
    if name == "Muon8bit":  # every SHAPES entry is a matrix: all of them Muon's
        return K.Muon8bit(params, lr=0.02, weight_decay=0.01)
    raise ValueError(name)


def full_state(opt, params):
    """Every parameter's state in the mesh-independent layout, as full plain tensors."""
    from kestrel.optim.distributed import is_dtensor

    sd = opt.state_dict()
    out = []
    for index, _ in enumerate(params):
        state = dict(sd["state"][index])
        state.update(state.pop("__bnb_optimizer_quant_state__", {}))
        out.append({k: (v.full_tensor() if is_dtensor(v) else v) for k, v in state.items()})
    return out


def same_gradients(rank, world, port, out_dir, name, steps):
    """FSDP2 with the full gradients given by hand (distributed like the parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    model = Bag()
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    opt = make_optimizer(name, params)
    for step in range(steps):
        for p, g in zip(params, grads_for(step)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    result = dict(params=[p.full_tensor() for p in params], state=full_state(opt, params))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "rank0.pt"))
    finish()


def train_fsdp(rank, world, port, out_dir, steps):
    """A small MLP trained with FSDP2 + AdamW8bit, each rank on the same batch (so the averaged gradient equals the
    single-process one up to the reduction's rounding)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer("AdamW8bit", model.parameters())
    losses = run_mlp(model, opt, steps)
    full = [p.full_tensor() for p in model.parameters()]  # a collective: every rank
    if rank == 0:
        torch.save(dict(losses=losses, params=full), os.path.join(out_dir, "rank0.pt"))
    finish()


def train_ddp(rank, world, port, out_dir, steps):
    from torch.nn.parallel import DistributedDataParallel

    init(rank, world, port)
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp())
    opt = make_optimizer("AdamW8bit", model.parameters())
    losses = run_mlp(model, opt, steps)
    if rank == 0:
        torch.save(
            dict(losses=losses, params=[p.detach().clone() for p in model.parameters()]),
            os.path.join(out_dir, "rank0.pt"),
        )
    finish()


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))


def run_mlp(model, opt, steps):
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        loss = (model(x) - x.flip(1)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def dcp_save(rank, world, port, out_dir, steps, name="AdamW8bit"):
    """FSDP2 at world size 2: a few steps, then a distributed checkpoint of the model and the optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    model = Bag()
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    opt = make_optimizer(name, params)
    for step in range(steps):
        for p, g in zip(params, grads_for(step)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=os.path.join(out_dir, "ckpt"),
    )
    result = dict(params=[p.full_tensor() for p in params], state=full_state(opt, params))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "rank0.pt"))
    finish()


def dcp_load(rank, world, port, out_dir, steps, name="AdamW8bit"):
    """FSDP2 at world size 2: load a checkpoint written at world size 1, then take `steps` more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    model = Bag(seed=99)  # different values: everything must come from the checkpoint
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    opt = make_optimizer(name, params)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    loaded = dict(params=[p.full_tensor() for p in params], state=full_state(opt, params))
    for step in range(steps):
        for p, g in zip(params, grads_for(50 + step)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    result = dict(loaded=loaded, params=[p.full_tensor() for p in params], state=full_state(opt, params))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "rank0.pt"))
    finish()
