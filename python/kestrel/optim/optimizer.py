"""The base of kestrel's 8-bit optimizers: bitsandbytes 0.50's state layout and checkpoint format, argument checks,
and one fused kernel call per (device, dtype, state width) for all parameters of a group."""

import copy
import warnings
from collections import defaultdict
from itertools import chain

import torch

from .. import _ext
from ..ops.quantize import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED
from . import distributed as D
from .manager import GlobalOptimManager

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZE = 256  # elements per absmax block of an 8-bit state, as bnb's optimizers use


class MockArgs:
    """bnb's `args` object: attribute access to optim_bits, min_8bit_size, max_unorm, skip_zeros."""

    def __init__(self, initial_data):
        for key, value in initial_data.items():
            setattr(self, key, value)


def _blocks(n):
    return (n + BLOCKSIZE - 1) // BLOCKSIZE


def check_hyperparameters(name, lr, eps, betas, weight_decay, optim_bits, block_wise):
    """bnb's constructor checks, with errors that name the argument and the value."""
    if not lr >= 0.0:
        raise ValueError(f"{name}: lr must be >= 0, got {lr}")
    if not eps >= 0.0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: betas[{i}] must be in [0, 1), got {beta}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
    if optim_bits not in (8, 32):
        raise ValueError(f"{name}: optim_bits must be 8 or 32, got {optim_bits}")
    if not block_wise:
        raise ValueError(f"{name}: block_wise=False (bnb 0.49's tensor-wise 8-bit state) is not supported; "
                         "kestrel's 8-bit state is block-wise, as bnb 0.50's")


def check_max_unorm(name, args, supported):
    """max_unorm (bnb's args.max_unorm, the trust-ratio bound of LAMB / LARS) must be >= 0, and > 0 only where the
    kernels apply it (Adam-family two-state and SGD-momentum updates)."""
    max_unorm = getattr(args, "max_unorm", 0.0) or 0.0
    if not max_unorm >= 0.0:
        raise ValueError(f"{name}: max_unorm must be >= 0, got {max_unorm}")
    if max_unorm > 0.0 and not supported:
        raise ValueError(f"{name}: max_unorm (the LAMB / LARS trust ratio) applies to Adam and SGD-momentum updates "
                         f"only, got max_unorm={max_unorm}")


def default_args(args, optim_bits, min_8bit_size, max_unorm=0.0):
    """bnb's `args` object, built from the constructor's arguments when the caller gives none."""
    if args is not None:
        return args
    return MockArgs(dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, max_unorm=max_unorm,
                         skip_zeros=False))


def paged_class(base, name):
    """bnb's Paged<Name>: `base` with is_paged fixed to True (its signature otherwise; is_paged is not accepted)."""

    def __init__(self, *args, **kwargs):
        if "is_paged" in kwargs:
            raise TypeError(f"{name}: is_paged is fixed to True; do not pass it")
        base.__init__(self, *args, is_paged=True, **kwargs)

    doc = (f"{base.__name__} with paged state (bnb.optim.{name}): on a GPU, state1/state2 live in CUDA managed "
           "memory (the driver may evict them to host memory under pressure) and are prefetched before each step; "
           "never more than the device has free is asked for. On CPU it warns once and behaves as unpaged.")
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": base.__module__})


class Optimizer8bit(torch.optim.Optimizer):
    # bnb nests the quantization tensors under this key in state_dict() so that FSDP does not cast or gather them.
    _FSDP_WRAPPED_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
    non_castable_tensor_keys = frozenset({"qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1",
                                          "state2", "gnorm_vec", "absmax1", "absmax2", "unorm_vec"})

    def __init__(self, params, defaults, optim_bits=32, is_paged=False, bf16_stochastic_round=False, capturable=False):
        if bf16_stochastic_round:
            # drawn from torch's generator, so runs are deterministic given torch.manual_seed; saved with the
            # param_groups, so a resumed run draws the same rounding bits
            defaults = dict(defaults, round_seed=int(torch.randint(0, 2**62, (1,)).item()))
        super().__init__(params, defaults)
        self.mng = GlobalOptimManager.get_instance()
        self.is_paged = is_paged
        # capturable (CUDA graphs): step counts live on the parameter's device and the kernels read them (and a
        # device-tensor lr) there, so one captured step replays with the current values
        self.capturable = bool(capturable)
        self.percentile_clipping = 100
        self._paged_warned = False
        self.name2qmap = {}
        self._shards = {}
        if optim_bits == 8:
            self.fill_qmap()

    def fill_qmap(self):
        self.name2qmap["dynamic"] = DYNAMIC_MAP_SIGNED.clone()
        self.name2qmap["udynamic"] = DYNAMIC_MAP_UNSIGNED.clone()

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in state_dict["state"].items()}
        for param_state in state_dict["state"].values():
            if isinstance(param_state, dict) and torch.is_tensor(param_state.get("step")):
                param_state["step"] = int(param_state["step"])  # bnb's layout: a plain int
        ordered = [p for group in self.param_groups for p in group["params"]]
        for index, param_state in state_dict["state"].items():
            if isinstance(index, int) and index < len(ordered) and self.shard(ordered[index]) is not None:
                state_dict["state"][index] = self._export_sharded(ordered[index], param_state)
        for param_state in state_dict["state"].values():
            if isinstance(param_state, dict):
                nested = {key: param_state.pop(key) for key in list(param_state) if key in self.non_castable_tensor_keys}
                if nested:
                    param_state[self._FSDP_WRAPPED_QUANT_STATE_KEY] = nested
        return state_dict

    def load_state_dict(self, state_dict, move_to_device=True):
        """Load a state_dict written by kestrel or by bitsandbytes (nested or flat layout).

        Every parameter's state is checked against its parameter before anything is changed; on a mismatch a
        ValueError names the parameter and the offending entry, and the optimizer keeps its state.
        """
        name = type(self).__name__
        state_dict = copy.deepcopy(state_dict)
        for param_state in state_dict["state"].values():
            if isinstance(param_state, dict) and self._FSDP_WRAPPED_QUANT_STATE_KEY in param_state:
                param_state.update(param_state.pop(self._FSDP_WRAPPED_QUANT_STATE_KEY))
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"{name}.load_state_dict: the state_dict has {len(saved_groups)} parameter groups, "
                             f"the optimizer {len(groups)}")
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"{name}.load_state_dict: parameter group {index} has {len(saved['params'])} "
                                 f"parameters in the state_dict, {len(group['params'])} in the optimizer")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        ordinal = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in groups))}

        new_state = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                new_state[key] = value
                continue
            param = id_map[key]
            if self.shard(param) is not None:
                value = self._import_sharded(param, value)
            self._check_loaded_state(D.local(param), value, ordinal[id(param)])
            new_state[param] = self._place_loaded_state(param, value, move_to_device)
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            merged = dict(saved)
            merged["params"] = group["params"]
            new_groups.append(merged)
        self.__setstate__({"state": new_state, "param_groups": new_groups})

    # ----------------------------------------------------------------------------------------- sharded parameters
    @staticmethod
    def _moments(state_tensor, local_param):
        return state_tensor.shape[0] if state_tensor.dim() == local_param.dim() + 1 else 1

    def _export_sharded(self, p, state):
        """A sharded (FSDP2) parameter's state in the mesh-independent layout of kestrel.optim.distributed:
        states as DTensors placed like the parameter (global-block codes), absmax replicated (every block's)."""
        info, loc = self.shard(p), D.local(p)
        out = dict(state)
        for key in ("state1", "state2"):
            if key not in state:
                continue
            tensor = state[key]
            moments = self._moments(tensor, loc)
            if tensor.dtype == torch.uint8:
                absmax_key, qmap_key = "absmax" + key[-1], "qmap" + key[-1]
                absmax = state[absmax_key].reshape(moments, -1)
                pairs = [D.export_codes(tensor.reshape(moments, -1)[m], absmax[m], state[qmap_key], info)
                         for m in range(moments)]
                codes = torch.stack([c for c, _ in pairs]).reshape(tensor.shape)
                full = torch.stack([a for _, a in pairs]).reshape((moments, -1) if moments > 1 else (-1,))
                out[key] = D.as_sharded(codes, info, moments)
                out[absmax_key] = D.as_replicated(full, info)
            else:
                out[key] = D.as_sharded(tensor, info, moments)
        return out

    def _import_sharded(self, p, state):
        """The local state of a sharded parameter from the mesh-independent layout (DTensors from
        torch.distributed.checkpoint, or full plain tensors from a single-process checkpoint)."""
        info, loc = self.shard(p), D.local(p)
        name = type(self).__name__
        out = dict(state)
        for key in ("state1", "state2"):
            if key not in state:
                continue
            tensor = state[key]
            if D.is_dtensor(tensor):
                tensor = tensor.to_local()
            else:  # a full tensor: this shard's slice
                moments = tensor.numel() // max(info.numel, 1)
                if tensor.numel() != moments * info.numel or moments not in (1, 2):
                    raise ValueError(f"{name}.load_state_dict: {key} has {tensor.numel()} elements, expected a "
                                     f"multiple of the parameter's {info.numel}")
                tensor = tensor.reshape(moments, -1)[:, info.offset:info.offset + info.local_numel]
                tensor = tensor.reshape(((moments,) if moments > 1 else ()) + tuple(loc.shape))
            moments = self._moments(tensor, loc)
            if tensor.dtype == torch.uint8:
                absmax_key, qmap_key = "absmax" + key[-1], "qmap" + key[-1]
                full = state[absmax_key]
                full = full.to_local() if D.is_dtensor(full) else full
                qmap = state[qmap_key].to(tensor.device)
                full = full.to(tensor.device).reshape(moments, -1)
                pairs = [D.import_codes(tensor.reshape(moments, -1)[m], full[m], qmap, info) for m in range(moments)]
                out[key] = torch.stack([c for c, _ in pairs]).reshape(tensor.shape).contiguous()
                absmax = torch.stack([a for _, a in pairs])
                out[absmax_key] = (absmax if moments > 1 else absmax[0]).contiguous()
            else:
                out[key] = tensor.contiguous()
        return out

    def _check_loaded_state(self, param, state, index):
        name = type(self).__name__
        where = f"{name}.load_state_dict: parameter {index} (shape {tuple(param.shape)})"
        if not isinstance(state, dict):
            raise ValueError(f"{where}: its state must be a dict, got {type(state).__name__}")
        n = param.numel()
        for key in ("state1", "state2"):
            if key not in state:
                continue
            tensor = state[key]
            if tensor.dtype == torch.uint8:
                expected = n * (2 if tensor.dim() == param.dim() + 1 and tensor.shape[0] == 2 else 1)
                if tensor.numel() != expected:
                    raise ValueError(f"{where}: {key} has {tensor.numel()} elements, expected {expected}")
                absmax_key, qmap_key = "absmax" + key[-1], "qmap" + key[-1]
                for needed in (absmax_key, qmap_key):
                    if needed not in state:
                        raise ValueError(f"{where}: an 8-bit {key} needs {needed}, which the state_dict lacks")
                blocks = _blocks(n) * expected // n
                if state[absmax_key].dtype != torch.float32 or state[absmax_key].numel() != blocks:
                    raise ValueError(f"{where}: {absmax_key} must be float32 with {blocks} values, got "
                                     f"{state[absmax_key].dtype} with {state[absmax_key].numel()}")
                if state[qmap_key].dtype != torch.float32 or state[qmap_key].numel() != 256:
                    raise ValueError(f"{where}: {qmap_key} must be float32 with 256 values, got "
                                     f"{state[qmap_key].dtype} with {state[qmap_key].numel()}")
            elif tensor.dtype == torch.float32:
                if tensor.numel() not in (n, 2 * n):
                    raise ValueError(f"{where}: {key} has {tensor.numel()} elements, expected {n}")
            else:
                raise ValueError(f"{where}: {key} must be uint8 (8-bit state) or float32 (32-bit state), "
                                 f"got {tensor.dtype}")
        if "state1" in state and "state2" in state and state["state1"].dtype != state["state2"].dtype:
            raise ValueError(f"{where}: state1 is {state['state1'].dtype} but state2 is {state['state2'].dtype}")

    def _place_loaded_state(self, param, state, move_to_device):
        placed = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                if key in ("state1", "state2") and self._pages(param):  # paged: back into managed memory
                    placed[key] = self.state_zeros(param, value.dtype, value.shape)
                    placed[key].copy_(value)
                elif key in self.non_castable_tensor_keys:
                    placed[key] = value.to(param.device) if move_to_device else value
                elif key == "step":
                    placed[key] = self.new_step(param).fill_(int(value.item()))
                elif value.is_floating_point() and param.is_floating_point():
                    placed[key] = value.to(device=param.device, dtype=param.dtype)
                else:
                    placed[key] = value.to(param.device)
            elif key == "step":
                placed[key] = self.new_step(param).fill_(int(value))
            else:
                placed[key] = value
        return placed

    # ----------------------------------------------------------------------------------------- stepping
    def _check_param(self, p, index):
        name = type(self).__name__
        where = f"{name}: parameter {index} (shape {tuple(p.shape)})"
        if p.grad.is_sparse:
            raise RuntimeError(f"{where} has a sparse gradient; {name} supports dense gradients only")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where} is {p.dtype}; {name} supports float32, float16 and bfloat16 parameters")
        if p.grad.dtype != p.dtype:
            raise TypeError(f"{where} is {p.dtype} but its gradient is {p.grad.dtype}")
        if p.grad.shape != p.shape:
            raise ValueError(f"{where}: its gradient has shape {tuple(p.grad.shape)}")
        if p.grad.device != p.device:
            raise ValueError(f"{where} is on {p.device} but its gradient is on {p.grad.device}")
        _ext.require(name, p.device)
        if D.is_dtensor(p):
            if not D.is_dtensor(p.grad) or p.grad.placements != p.placements:
                raise ValueError(f"{where} is a DTensor placed {tuple(p.placements)}; its gradient must be placed "
                                 f"the same way, got {type(p.grad).__name__}")
            self.shard(p)  # raises for unsupported placements
        state = self.state.get(p)
        if state and "state1" in state and state["state1"].device != p.device:
            raise ValueError(f"{where} is on {p.device} but its optimizer state is on {state['state1'].device}")

    def _check_capturable(self, p, config):
        """What a captured (CUDA graph) step cannot do: read values on the host each step."""
        name = type(self).__name__
        lr = config["lr"]
        if torch.is_tensor(lr) and p.device.type == "cuda" and lr.device != p.device:
            raise ValueError(f"{name}(capturable=True): a tensor lr must be on the parameters' device {p.device}, "
                             f"got {lr.device}")
        if torch.is_tensor(lr) and p.device.type == "cuda" and lr.dtype != torch.float32:
            raise ValueError(f"{name}(capturable=True): a tensor lr must be float32, got {lr.dtype}")
        if self.percentile_clipping < 100:
            raise ValueError(f"{name}(capturable=True): percentile_clipping reads the gradient norm on the host; "
                             f"it cannot be captured (got percentile_clipping={self.percentile_clipping})")
        if (config.get("max_unorm", 0.0) or 0.0) > 0.0:
            raise ValueError(f"{name}(capturable=True): the trust ratio (max_unorm={config['max_unorm']}) is not "
                             "capturable yet; use max_unorm=0")
        if config.get("t_alpha") or config.get("t_beta3"):
            raise ValueError(f"{name}(capturable=True): the t_alpha/t_beta3 warm-ups read the step on the host")

    def _paged_buffer_warning(self, p):
        if self.is_paged and p.device.type == "cpu" and not self._paged_warned:
            warnings.warn(f"{type(self).__name__}: paged optimizer state needs CUDA; on CPU it behaves as unpaged",
                          stacklevel=3)
            self._paged_warned = True

    def shard(self, p):
        """ShardInfo of a Shard(0) DTensor parameter (FSDP2), None otherwise (cached per parameter)."""
        if not D.is_dtensor(p):
            return None
        key = id(p)
        if key not in self._shards:
            self._shards[key] = D.shard_info(p)
        return self._shards[key]

    def shard_key(self, p):
        """Batches never mix sharded and unsharded parameters (their norms are reduced differently)."""
        info = self.shard(p)
        return None if info is None else id(info.group)

    def local_batch(self, batch):
        """(local parameters, local gradients) of a batch: what the kernels update in place."""
        return [D.local(p) for p in batch], [D.local(p.grad) for p in batch]

    def reduce_norms(self, p, norms):
        """LAMB/LARS on sharded parameters: the norm pass's sums of squares over all shards."""
        info = self.shard(p)
        return D.all_reduce_sum(norms, info) if info is not None else norms

    def _pages(self, p):
        return self.is_paged and p.device.type == "cuda"

    def state_zeros(self, p, dtype, shape=None):
        """A zero state buffer for parameter p: in CUDA managed memory when paged (on a GPU), else ordinary."""
        shape = tuple(D.local(p).shape) if shape is None else tuple(shape)
        if self._pages(p):
            return torch.ops.kestrel.managed_zeros(p, list(shape), dtype)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def prefetch(self, p, tensors):
        """Paged state: prefetch the managed buffers to p's GPU on the current stream before the kernel reads them."""
        if self._pages(p):
            torch.ops.kestrel.prefetch(list(tensors))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every parameter before changing anything, so that bad input leaves all state untouched.
        work = []
        ordinal = 0
        for group_index, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._check_param(p, ordinal)
                    work.append((group_index, position, p))
                ordinal += 1
        self.mng.resolve_module_overrides()
        by_group = defaultdict(list)
        base_configs = {}
        for group_index, position, p in work:
            if group_index not in base_configs:
                base_configs[group_index] = self.group_config(self.param_groups[group_index])
            config = self.get_config(base_configs[group_index], p, (group_index, position))
            if D.is_dtensor(p):
                if not (D.local(p).is_contiguous() and D.local(p.grad).is_contiguous()):
                    raise ValueError(f"{type(self).__name__}: the local shard of a DTensor parameter or of its "
                                     "gradient is not contiguous")
            else:
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
                if not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()
            if self.capturable:
                self._check_capturable(p, config)
            if len(self.state[p]) == 0:
                self._paged_buffer_warning(p)
                self.init_state(p, config)
            by_group[group_index].append((p, config))
        for items in by_group.values():
            self.update_params(items)
        return loss

    def group_config(self, group):
        """A group's settings and the optimizer's args (optim_bits, min_8bit_size, max_unorm)."""
        config = {key: value for key, value in group.items() if key != "params"}
        config.update(optim_bits=self.args.optim_bits, min_8bit_size=self.args.min_8bit_size,
                      max_unorm=getattr(self.args, "max_unorm", 0.0))
        return config

    def get_config(self, base, p, index):
        """The settings of parameter p at `index` = (group index, position): its group's (`base`, not modified),
        then GlobalOptimManager overrides by registration index, then by parameter identity."""
        by_index, by_id = self.mng.index2config.get(index), self.mng.pid2config.get(id(p))
        if by_index is None and by_id is None:
            return base
        config = dict(base)
        config.update(by_index or {})
        config.update(by_id or {})
        return config

    def init_state(self, p, config):
        raise NotImplementedError

    def new_step(self, p=None):
        """A parameter's step count: an int64 tensor (a compiled step does not recompile as it grows; the
        checkpoint holds a plain int, as bnb's does), on the CPU, or on the parameter's GPU when capturable."""
        device = p.device if (self.capturable and p is not None and p.device.type == "cuda") else "cpu"
        return torch.zeros((), dtype=torch.int64, device=device)

    @staticmethod
    def steps_of(states):
        return torch.stack([s["step"] for s in states])

    @staticmethod
    def lr_of(config):
        """(lr as a float, lr as a tensor or None): a tensor lr (e.g. torch.tensor(1e-3), updated in place by a
        scheduler) goes to the kernels as a tensor, so that a compiled step does not recompile when it changes."""
        lr = config["lr"]
        if torch.is_tensor(lr):
            return 0.0, lr
        return float(lr), None

    @staticmethod
    def round_seed_for(p, config):
        """The kernels' round_seed: the optimizer's seed for a bf16 parameter with stochastic rounding on, else -1."""
        return int(config.get("round_seed", -1)) if p.dtype == torch.bfloat16 else -1

    def set_percentile_clipping(self, percentile):
        name = type(self).__name__
        if isinstance(percentile, bool) or not isinstance(percentile, int) or not 1 <= percentile <= 100:
            raise ValueError(f"{name}: percentile_clipping must be an integer in [1, 100], got {percentile!r}")
        self.percentile_clipping = percentile

    def init_clipping_state(self, p, config=None):
        if self.percentile_clipping < 100:
            self.state[p]["gnorm_vec"] = torch.zeros(100, dtype=torch.float32, device=p.device)
        if config is not None and (config.get("max_unorm", 0.0) or 0.0) > 0.0:
            # bnb's layout: its step reads state["unorm_vec"] when max_unorm > 0, so a checkpoint of ours loads into
            # bnb; kestrel's trust ratio takes its norms from the norm pass and does not use it
            self.state[p]["unorm_vec"] = torch.zeros((1,), dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def gnorm_scale(self, p):
        """bnb 0.49's percentile clipping: keep the last 100 squared gradient norms; if this step's norm exceeds the
        `percentile`-th smallest of them (index into the sorted history, zeros of unfilled slots included, as bnb
        does), scale the gradient down to it. 1.0 when percentile_clipping is 100. (Reads one value to the host.)"""
        if self.percentile_clipping >= 100:
            return 1.0
        state = self.state[p]
        history = state["gnorm_vec"]
        slot = int(state["step"]) % 100
        squared = D.local(p.grad).float().pow(2).sum()
        info = self.shard(p)
        history[slot] = D.all_reduce_sum(squared, info) if info is not None else squared
        current = history[slot].sqrt()
        clip = torch.sort(history).values[self.percentile_clipping].sqrt()
        return float((clip / current).item()) if bool(current > clip) else 1.0

    def update_params(self, items):
        """One step for [(parameter, config)]: one kernel call per batch of equal device, dtype, state kind and
        hyperparameters."""
        raise NotImplementedError
