"""The 8-bit optimizers on sharded parameters (FSDP2's DTensors): the kernels run on each rank's local shard, and
checkpoints hold a layout that does not depend on the mesh, so that torch.distributed.checkpoint can reshard them.

A parameter sharded on dim 0 (FSDP2's default, `Shard(0)` on a 1-D mesh) has a contiguous local shard starting at
flat element `offset` of the full tensor. Its 8-bit state is quantized in 256-element blocks of the local shard;
when every shard starts at a multiple of 256 ("aligned", the usual case for LLM shapes) these are exactly the blocks
of the full tensor, so the state and the step equal the single-process ones bit for bit.

Checkpoint layout of a sharded parameter (the "global-block" layout, the same at every world size): `state1` /
`state2` are DTensors placed like the parameter (codes of the full tensor's blocks), `absmax1` / `absmax2` are
replicated DTensors holding every block's absmax of the full tensor. Aligned shards convert both ways exactly
(a gather of the absmax values); unaligned ones requantize across the shard boundary (within the format's rounding).
"""

import math

import torch
import torch.distributed as dist

try:  # torch >= 2.4, and builds with distributed support
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor = None

from ..ops.quantize import dequantize_blockwise, quantize_blockwise

BLOCK = 256


def is_dtensor(t):
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (the tensor the kernels update in place), else t itself."""
    return t.to_local() if is_dtensor(t) else t


class ShardInfo:
    """Where a Shard(0) DTensor parameter's local shard sits in the full tensor."""

    def __init__(self, p):
        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
            raise NotImplementedError(
                f"kestrel's 8-bit optimizers support DTensor parameters sharded on dim 0 of a 1-D mesh (FSDP2's "
                f"default) or replicated; got placements {tuple(placements)} on a {mesh.ndim}-D mesh"
            )
        self.mesh, self.placements = mesh, placements
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.shape = tuple(p.shape)
        self.numel = p.numel()
        row = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        rows = self.shape[0] if self.shape else 1
        chunk = -(-rows // self.world) if rows else 0  # torch.chunk's split, as DTensor's Shard(0)
        self.ranges = []  # flat (start, end) of every rank's shard
        for r in range(self.world):
            lo, hi = min(rows, r * chunk), min(rows, (r + 1) * chunk)
            self.ranges.append((lo * row, hi * row))
        self.offset, end = self.ranges[self.rank]
        self.local_numel = end - self.offset
        self.aligned = all(start % BLOCK == 0 for start, _ in self.ranges)


def shard_info(p):
    """ShardInfo for a Shard(0) DTensor, None for a plain tensor or a replicated DTensor."""
    if not is_dtensor(p):
        return None
    if all(isinstance(pl, Replicate) for pl in p.placements):
        return None
    return ShardInfo(p)


def blocks(n):
    return (n + BLOCK - 1) // BLOCK


def all_reduce_sum(tensor, info):
    """Sum over the shards (for LAMB/LARS norms and percentile clipping's gradient norm)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=info.group)
    return tensor


def _gather_flat(t, info, sizes):
    """Concatenate every rank's flat float32 tensor (rank r's has sizes[r] elements)."""
    width = max(sizes) if sizes else 0
    padded = torch.zeros(width, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t.reshape(-1)
    out = torch.empty(width * info.world, dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, padded, group=info.group)
    return torch.cat([out[r * width : r * width + sizes[r]] for r in range(info.world)])


def export_codes(codes, absmax, qmap, info):
    """(codes of the full tensor's blocks for this shard, every block's absmax) from the local state."""
    block_counts = [blocks(end - start) for start, end in info.ranges]
    if info.aligned:
        return codes.reshape(-1), _gather_flat(absmax.reshape(-1), info, block_counts)
    values = dequantize_blockwise(codes.reshape(-1), absmax, code=qmap, blocksize=BLOCK, dtype=torch.float32)
    full = _gather_flat(values, info, [end - start for start, end in info.ranges])
    full_codes, full_absmax = quantize_blockwise(full, code=qmap, blocksize=BLOCK)
    return full_codes[info.offset : info.offset + info.local_numel], full_absmax


def import_codes(codes, absmax_full, qmap, info):
    """The local 8-bit state (codes, absmax of the local blocks) from global-block codes of this shard and every
    block's absmax: exact for an aligned shard, a requantization otherwise."""
    codes = codes.reshape(-1)
    first = info.offset // BLOCK
    if info.offset % BLOCK == 0:
        return codes, absmax_full[first : first + blocks(info.local_numel)].clone()
    index = torch.arange(info.offset, info.offset + info.local_numel, device=codes.device) // BLOCK
    values = qmap[codes.long()] * absmax_full[index]
    return quantize_blockwise(values, code=qmap, blocksize=BLOCK)


def as_sharded(t, info, moments=1):
    """A local state tensor (shape (moments,) + local shape or the local shape) as a DTensor placed like the
    parameter."""
    if moments == 1:
        shape, placement = info.shape, Shard(0)
    else:
        shape, placement = (moments,) + info.shape, Shard(1)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, info.mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)


def as_replicated(t, info):
    return DTensor.from_local(t, info.mesh, [Replicate()], run_check=False)
