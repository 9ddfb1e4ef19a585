"""The base of kestrel's 8-bit optimizers: bitsandbytes 0.50's state layout and checkpoint format, argument checks,
and one fused kernel call per (device, dtype, state width) for all parameters of a group."""

import copy
import warnings
from collections import defaultdict
from itertools import chain

import torch

from .. import _ext
from .._checks import is_int, is_number
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


def check_number(name, label, value, low=0.0, high=None, low_open=False, high_open=True):
    """A finite real number (not a bool) in [low, high) (the ends as given; no upper end when high is None): else a
    TypeError or ValueError naming it, with the expected and the given value."""
    if not is_number(value):
        raise TypeError(f"{name}: {label} must be a number, got {value!r}")
    x = float(value)
    inside = (x > low if low_open else x >= low) and (high is None or (x < high if high_open else x <= high))
    if not inside or x in (float("inf"), float("-inf")):
        if high is not None:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        else:
            expected = f"{'>' if low_open else '>='} {low:g}"
        finite = "a finite number " if inside else ""
        raise ValueError(f"{name}: {label} must be {finite}{expected}, got {value!r}")
    return x


def check_lr(name, lr, label="lr"):
    """lr: a finite number >= 0, or a one-element floating-point tensor (for LR schedulers under torch.compile;
    its value is checked when it is on the CPU)."""
    if torch.is_tensor(lr):
        if not lr.is_floating_point() or lr.numel() != 1:
            raise TypeError(
                f"{name}: a tensor {label} must hold one floating-point value, got {lr.dtype} with {lr.numel()} values"
            )
        if (
            lr.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(lr).all() & (lr >= 0).all())
        ):
            raise ValueError(f"{name}: {label} must be >= 0 and finite, got {lr.item()!r}")
        return lr
    if not is_number(lr):
        raise TypeError(f"{name}: {label} must be a number >= 0 or a one-element float tensor, got {lr!r}")
    return check_number(name, label, lr)


def check_int(name, label, value, low=0):
    if not is_int(value):
        raise TypeError(f"{name}: {label} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: {label} must be >= {low}, got {value}")
    return int(value)


def check_betas(name, betas, count, labels=None):
    """betas as a tuple of `count` numbers in [0, 1); `labels` name them (default betas[i])."""
    if isinstance(betas, str):  # bnb accepts '(0.9, 0.999)'
        try:
            betas = [float(b) for b in betas.replace("(", "").replace(")", "").split(",")]
        except ValueError:
            raise ValueError(f"{name}: betas must hold {count} numbers, got {betas!r}") from None
    try:
        betas = tuple(betas)
    except TypeError:
        raise TypeError(f"{name}: betas must be a tuple of {count} numbers, got {betas!r}") from None
    if len(betas) != count:
        what = {2: "two values (beta1, beta2)", 3: "three values (beta1, beta2, beta3)"}.get(count, f"{count} values")
        raise ValueError(f"{name}: betas must hold {what}, got {betas}")
    labels = labels or [f"betas[{i}]" for i in range(count)]
    return tuple(check_number(name, labels[i], b, 0.0, 1.0) for i, b in enumerate(betas))


def check_hyperparameters(
    name, lr, eps, betas, weight_decay, optim_bits, block_wise, beta_labels=None, supported_bits=(8, 32)
):
    """bnb's constructor checks, with errors that name the argument, the expected and the given value."""
    check_lr(name, lr)
    check_number(name, "eps", eps)
    check_betas(name, betas, len(tuple(betas)) if not isinstance(betas, str) else 2, beta_labels)
    check_number(name, "weight_decay", weight_decay)
    check_optim_bits(name, optim_bits, supported_bits)
    if not block_wise:
        raise ValueError(
            f"{name}: block_wise=False (bnb 0.49's tensor-wise 8-bit state) is not supported; "
            "kestrel's 8-bit state is block-wise, as bnb 0.50's"
        )


def check_optim_bits(name, optim_bits, supported=(8, 32)):
    if isinstance(optim_bits, bool) or optim_bits not in supported:
        listed = ", ".join(map(str, supported[:-1])) + f" or {supported[-1]}"
        raise ValueError(f"{name}: optim_bits must be {listed}, got {optim_bits!r}")
    return int(optim_bits)


def check_max_unorm(name, args, supported):
    """max_unorm (bnb's args.max_unorm, the trust-ratio bound of LAMB / LARS) must be >= 0, and > 0 only where the
    kernels apply it (Adam-family two-state and SGD-momentum updates)."""
    max_unorm = getattr(args, "max_unorm", 0.0) or 0.0
    max_unorm = check_number(name, "max_unorm", max_unorm)
    if max_unorm > 0.0 and not supported:
        raise ValueError(
            f"{name}: max_unorm (the LAMB / LARS trust ratio) applies to Adam and SGD-momentum updates "
            f"only, got max_unorm={max_unorm}"
        )


def check_args(name, args, supported_bits=(8, 32)):
    """bnb's `args` object (optim_bits, min_8bit_size, max_unorm): checked when the optimizer is built, so that
    nothing fails later inside step()."""
    for attr in ("optim_bits", "min_8bit_size"):
        if not hasattr(args, attr):
            raise ValueError(f"{name}: args must have the attribute {attr} (bnb's args), got {args!r}")
    check_optim_bits(name, args.optim_bits, supported_bits)
    check_int(name, "min_8bit_size", args.min_8bit_size)


def default_args(args, optim_bits, min_8bit_size, max_unorm=0.0):
    """bnb's `args` object, built from the constructor's arguments when the caller gives none."""
    if args is not None:
        return args
    return MockArgs(dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, max_unorm=max_unorm, skip_zeros=False))


def paged_class(base, name):
    """bnb's Paged<Name>: `base` with is_paged fixed to True (its signature otherwise; is_paged is not accepted)."""

    def __init__(self, *args, **kwargs):
        if "is_paged" in kwargs:
            raise TypeError(f"{name}: is_paged is fixed to True; do not pass it")
        base.__init__(self, *args, is_paged=True, **kwargs)

    doc = (
        f"{base.__name__} with paged state (bnb.optim.{name}): on a GPU, state1/state2 live in CUDA managed "
        "memory (the driver may evict them to host memory under pressure) and are prefetched before each step; "
        "never more than the device has free is asked for. On CPU it warns once and behaves as unpaged."
    )
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": base.__module__})


class Optimizer8bit(torch.optim.Optimizer):
    # bnb nests the quantization tensors under this key in state_dict() so that FSDP does not cast or gather them.
    _FSDP_WRAPPED_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
    non_castable_tensor_keys = frozenset(
        {
            "qmap1",
            "qmap2",
            "max1",
            "max2",
            "new_max1",
            "new_max2",
            "state1",
            "state2",
            "gnorm_vec",
            "absmax1",
            "absmax2",
            "unorm_vec",
        }
    )

    def __init__(
        self,
        params,
        defaults,
        optim_bits=32,
        is_paged=False,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        name = type(self).__name__
        for label, flag in (
            ("bf16_stochastic_round", bf16_stochastic_round),
            ("capturable", capturable),
            ("robust_rounding", robust_rounding),
            ("is_paged", is_paged),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: {label} must be True or False, got {flag!r}")
        if robust_rounding:  # a group setting, kept out of the default groups so their layout stays bnb's
            defaults = dict(defaults, robust_rounding=True)
        if bf16_stochastic_round:
            # drawn from torch's generator, so runs are deterministic given torch.manual_seed; saved with the
            # param_groups, so a resumed run draws the same rounding bits
            defaults = dict(defaults, round_seed=int(torch.randint(0, 2**62, (1,)).item()))
        super().__init__(params, defaults)
        self.mng = GlobalOptimManager.get_instance()
        self._overrides_resolved = False  # module overrides: all of them at the first step, then new ones
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

    # ----------------------------------------------------------------------------------------- settings
    # The betas a family uses and the names its errors give them (SGD's betas hold (momentum, dampening)).
    num_betas = 2
    supported_bits = (8, 32)  # the optim_bits a family takes (AdamW4bit: 4 or 32)
    beta_labels = None

    def add_param_group(self, param_group):
        """torch's add_param_group, after checking the group's settings (with the defaults filled in) the way the
        constructor checks its arguments: a bad group is rejected before it is added."""
        if isinstance(param_group, dict):
            own = {k: v for k, v in param_group.items() if k != "params"}
            index = len(getattr(self, "param_groups", []))
            # a group of the constructor's settings reports them as the constructor's arguments
            where = f"{type(self).__name__}: parameter group {index}" if own else type(self).__name__
            self.check_config({**getattr(self, "defaults", {}), **own}, where)
        super().add_param_group(param_group)

    def check_config(self, config, where):
        """Check one parameter's (or group's) settings; `where` starts each message."""
        check_lr(where, config["lr"])
        check_number(where, "eps", config["eps"])
        check_number(where, "weight_decay", config["weight_decay"])
        if not isinstance(config.get("robust_rounding", False), bool):
            raise TypeError(f"{where}: robust_rounding must be True or False, got {config['robust_rounding']!r}")
        for key in ("optim_bits", "min_8bit_size", "max_unorm"):
            if key in config:  # per-parameter overrides (GlobalOptimManager) and the optimizer's args
                {
                    "optim_bits": lambda v: check_optim_bits(where, v, self.supported_bits),
                    "min_8bit_size": lambda v: check_int(where, "min_8bit_size", v),
                    "max_unorm": lambda v: check_number(where, "max_unorm", v or 0.0),
                }[key](config[key])
        self.check_family(config, where)

    def check_family(self, config, where):
        """The family's own settings (betas, alpha, ...)."""
        check_betas(where, config["betas"], self.num_betas, self.beta_labels)

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
                nested = {
                    key: param_state.pop(key) for key in list(param_state) if key in self.non_castable_tensor_keys
                }
                if nested:
                    param_state[self._FSDP_WRAPPED_QUANT_STATE_KEY] = nested
        return state_dict

    def load_state_dict(self, state_dict, move_to_device=True):
        """Load a state_dict written by kestrel or by bitsandbytes (nested or flat layout).

        Everything is checked before anything changes: the groups' settings (as the constructor checks them), each
        parameter's state against its parameter and against this optimizer's kind (a torch.optim state, or another
        8-bit optimizer's, is rejected), the quantization maps (256 sorted finite values). On a mismatch a ValueError
        names the parameter and the entry, and the optimizer keeps its state.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' (an optimizer's "
                f"state_dict()), got {type(state_dict).__name__}"
                + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
            )
        state_dict = copy.deepcopy(state_dict)
        for param_state in state_dict["state"].values():
            if isinstance(param_state, dict) and self._FSDP_WRAPPED_QUANT_STATE_KEY in param_state:
                param_state.update(param_state.pop(self._FSDP_WRAPPED_QUANT_STATE_KEY))
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"{name}.load_state_dict: the state_dict has {len(saved_groups)} parameter groups, "
                f"the optimizer {len(groups)}"
            )
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: parameter group {index} has {len(saved['params'])} "
                    f"parameters in the state_dict, {len(group['params'])} in the optimizer"
                )
        new_groups = []
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            # settings the checkpoint lacks (e.g. kestrel-only ones in a bnb checkpoint) keep this optimizer's
            merged = {**{k: v for k, v in group.items() if k != "params"}, **saved, "params": group["params"]}
            try:
                self.check_config(merged, f"{name}.load_state_dict: parameter group {index}")
            except (TypeError, KeyError) as error:
                raise ValueError(str(error)) from None
            new_groups.append(merged)
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups), chain.from_iterable(g["params"] for g in groups)
            )
        )
        ordinal = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in groups))}
        group_of = {id(p): g for g in new_groups for p in g["params"]}

        new_state = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                new_state[key] = value
                continue
            param = id_map[key]
            if self.shard(param) is not None:
                value = self._import_sharded(param, value)
            self._check_loaded_state(
                D.local(param), value, ordinal[id(param)], self.keeps_two_states(group_of[id(param)])
            )
            new_state[param] = value
        placed = defaultdict(dict)
        for key, value in new_state.items():
            placed[key] = (
                self._place_loaded_state(key, value, move_to_device) if isinstance(key, torch.Tensor) else value
            )
        self.__setstate__({"state": placed, "param_groups": new_groups})

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
                pairs = [
                    D.export_codes(tensor.reshape(moments, -1)[m], absmax[m], state[qmap_key], info)
                    for m in range(moments)
                ]
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
                    raise ValueError(
                        f"{name}.load_state_dict: {key} has {tensor.numel()} elements, expected a "
                        f"multiple of the parameter's {info.numel}"
                    )
                tensor = tensor.reshape(moments, -1)[:, info.offset : info.offset + info.local_numel]
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

    # Which states a kind of optimizer keeps: two (Adam, LAMB, AdEMAMix) or one (SGD, LARS, RMSprop, Adagrad, Lion),
    # and the first moments in state1 (AdEMAMix: two).
    two_states = True
    state1_moments = 1

    def state_sizes(self, state, n):
        """The numel of state1 and state2 for a parameter of n elements (AdamW4bit: packed codes)."""
        return self.state1_moments * n, n

    def keeps_two_states(self, group):
        """Whether the parameters of `group` keep two states (Muon: its AdamW groups do, its Muon groups one)."""
        return self.two_states

    def _check_loaded_state(self, param, state, index, two_states=None):
        name = type(self).__name__
        two_states = self.two_states if two_states is None else two_states
        where = f"{name}.load_state_dict: parameter {index} (shape {tuple(param.shape)})"
        if not isinstance(state, dict):
            raise ValueError(f"{where}: its state must be a dict, got {type(state).__name__}")
        if not state:
            return  # no step taken yet
        if "state1" not in state:
            foreign = sorted(k for k in state if isinstance(k, str))
            raise ValueError(
                f"{where}: the state holds {foreign}, not a kestrel/bitsandbytes 8-bit optimizer's state "
                f"(step, state1, ...); is it another optimizer's checkpoint (torch.optim.* keeps "
                f"exp_avg / momentum_buffer)?"
            )
        if "step" not in state:
            raise ValueError(f"{where}: the state lacks step")
        step = state["step"]
        step_value = int(step.item()) if torch.is_tensor(step) and step.numel() == 1 else step
        if not is_int(step_value) or step_value < 0:
            raise ValueError(f"{where}: step must be an integer >= 0, got {step!r}")
        if two_states and "state2" not in state:
            raise ValueError(
                f"{where}: {name} keeps two states (state1, state2) but the state_dict has state1 only; "
                "is it a one-state optimizer's checkpoint (SGD, Lion, RMSprop, Adagrad, LARS)?"
            )
        if not two_states and "state2" in state:
            raise ValueError(
                f"{where}: {name} keeps one state but the state_dict has state2; is it a two-state "
                "optimizer's checkpoint (Adam, AdamW, LAMB, AdEMAMix)?"
            )
        n = param.numel()
        for key in ("state1", "state2"):
            if key not in state:
                continue
            tensor = state[key]
            if not torch.is_tensor(tensor):
                raise ValueError(f"{where}: {key} must be a tensor, got {type(tensor).__name__}")
            moments = self.state1_moments if key == "state1" else 1
            if tensor.numel() != moments * n:
                hint = ""
                if key == "state1" and tensor.numel() in (n, 2 * n) and tensor.numel() != moments * n:
                    hint = (
                        " (AdEMAMix keeps two first moments in state1, the others one: is it another optimizer's "
                        "checkpoint?)"
                    )
                raise ValueError(f"{where}: {key} has {tensor.numel()} elements, expected {moments * n}{hint}")
            if tensor.dtype == torch.uint8:
                absmax_key, qmap_key = "absmax" + key[-1], "qmap" + key[-1]
                for needed in (absmax_key, qmap_key):
                    if needed not in state:
                        raise ValueError(f"{where}: an 8-bit {key} needs {needed}, which the state_dict lacks")
                blocks = _blocks(n) * moments
                absmax = state[absmax_key]
                if not torch.is_tensor(absmax) or absmax.dtype != torch.float32 or absmax.numel() != blocks:
                    raise ValueError(
                        f"{where}: {absmax_key} must be float32 with {blocks} values, got "
                        f"{getattr(absmax, 'dtype', type(absmax).__name__)} with "
                        f"{getattr(absmax, 'numel', lambda: '?')()}"
                    )
                qmap = state[qmap_key]
                if not torch.is_tensor(qmap) or qmap.dtype != torch.float32 or qmap.numel() != 256:
                    raise ValueError(
                        f"{where}: {qmap_key} must be float32 with 256 values, got "
                        f"{getattr(qmap, 'dtype', type(qmap).__name__)} with "
                        f"{getattr(qmap, 'numel', lambda: '?')()}"
                    )
                q = qmap.detach().cpu().reshape(-1)
                if not bool(torch.isfinite(q).all()) or not bool((q[1:] >= q[:-1]).all()):
                    raise ValueError(
                        f"{where}: {qmap_key} must hold 256 finite values in ascending order (a quantization map)"
                    )
            elif tensor.dtype != torch.float32:
                raise ValueError(
                    f"{where}: {key} must be uint8 (8-bit state) or float32 (32-bit state), got {tensor.dtype}"
                )
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
        if self._pages(p):
            _ext.require(f"{name} (paged state in CUDA managed memory)", p.device, native_only=True)
        if D.is_dtensor(p):
            if not D.is_dtensor(p.grad) or p.grad.placements != p.placements:
                raise ValueError(
                    f"{where} is a DTensor placed {tuple(p.placements)}; its gradient must be placed "
                    f"the same way, got {type(p.grad).__name__}"
                )
            self.shard(p)  # raises for unsupported placements
        if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(D.local(p)) == 1:
            raise ValueError(
                f"{where} has elements that share memory (e.g. an expanded tensor); it cannot be updated "
                "element by element"
            )
        state = self.state.get(p)
        if not state or "state1" not in state:
            return
        if state["state1"].device != p.device:
            raise ValueError(f"{where} is on {p.device} but its optimizer state is on {state['state1'].device}")
        n = D.local(p).numel()
        size1, size2 = self.state_sizes(state, n)
        if state["state1"].numel() != size1 or ("state2" in state and state["state2"].numel() != size2):
            held = state["state1"].numel() * n // max(size1, 1)  # the elements (per moment) the state holds
            raise ValueError(
                f"{where}: its optimizer state holds {held} elements per moment but the parameter has "
                f"{n} (was the parameter resized or replaced after its state was made?)"
            )

    def check_capturable_settings(self):
        """capturable=True with a setting a captured step cannot take: rejected by the constructor (the same check
        runs per parameter at each step, for overrides)."""
        if not self.capturable:
            return
        for group in self.param_groups:
            config = self.group_config(group)
            self._check_capturable(None, config)

    def _check_capturable(self, p, config):
        """What a captured (CUDA graph) step cannot do: read values on the host each step."""
        name = type(self).__name__
        lr = config["lr"]
        if p is not None and torch.is_tensor(lr) and p.device.type == "cuda" and lr.device != p.device:
            raise ValueError(
                f"{name}(capturable=True): a tensor lr must be on the parameters' device {p.device}, got {lr.device}"
            )
        if p is not None and torch.is_tensor(lr) and p.device.type == "cuda" and lr.dtype != torch.float32:
            raise ValueError(f"{name}(capturable=True): a tensor lr must be float32, got {lr.dtype}")
        if self.percentile_clipping < 100:
            raise ValueError(
                f"{name}(capturable=True): percentile_clipping reads the gradient norm on the host; "
                f"it cannot be captured (got percentile_clipping={self.percentile_clipping})"
            )
        if (config.get("max_unorm", 0.0) or 0.0) > 0.0:
            raise ValueError(
                f"{name}(capturable=True): the trust ratio (max_unorm={config['max_unorm']}) is not "
                "capturable yet; use max_unorm=0"
            )
        if config.get("t_alpha") or config.get("t_beta3"):
            raise ValueError(f"{name}(capturable=True): the t_alpha/t_beta3 warm-ups read the step on the host")

    def _paged_buffer_warning(self, p):
        if self.is_paged and p.device.type == "cpu" and not self._paged_warned:
            warnings.warn(
                f"{type(self).__name__}: paged optimizer state needs CUDA; on CPU it behaves as unpaged", stacklevel=3
            )
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
        """(parameters, gradients, write_back) of a batch as the kernels take them: contiguous local tensors. A
        non-contiguous parameter is updated through a contiguous copy that `write_back` copies into it, in place (its
        storage and every view of it see the update, as with torch's optimizers)."""
        params, grads, write_back = [], [], []
        for p in batch:
            loc, grad = D.local(p), D.local(p.grad)
            if not loc.is_contiguous():
                work = loc.contiguous()
                write_back.append((loc, work))
                loc = work
            params.append(loc)
            grads.append(grad if grad.is_contiguous() else grad.contiguous())
        return params, grads, write_back

    @staticmethod
    def write_back(pairs):
        for target, work in pairs:
            target.copy_(work)

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
        name = type(self).__name__
        self.resolve_module_overrides()
        # Check every parameter and setting before changing anything, so that bad input leaves all state untouched.
        work = []
        ordinal = 0
        for group_index, group in enumerate(self.param_groups):
            base = None
            for position, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._check_param(p, ordinal)
                    if base is None:  # group settings may have been edited since the group was added
                        base = self.group_config(group)
                        self.check_config(base, f"{name}: parameter group {group_index}")
                    config = self.get_config(base, p, (group_index, position))
                    if config is not base:
                        self.check_config(config, f"{name}: parameter {ordinal} (with GlobalOptimManager overrides)")
                    if self.capturable:
                        self._check_capturable(p, config)
                    work.append((group_index, p, config))
                ordinal += 1
        by_group = defaultdict(list)
        for group_index, p, config in work:
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
        config.update(
            optim_bits=self.args.optim_bits,
            min_8bit_size=self.args.min_8bit_size,
            max_unorm=getattr(self.args, "max_unorm", 0.0),
        )
        return config

    def resolve_module_overrides(self):
        """StableEmbedding-style module overrides: every live registration at this optimizer's first step (as bnb's
        check_overrides), then only those registered since (no per-step loop over every embedding)."""
        self.mng.resolve_module_overrides(everything=not self._overrides_resolved)
        self._overrides_resolved = True

    def get_config(self, base, p, index):
        """The settings of parameter p at `index` = (group index, position): its group's (`base`, not modified),
        then GlobalOptimManager overrides (kestrel.optim.manager: by registration position where that position
        still holds the registered parameter or its replacement, then by parameter identity)."""
        overrides = self.mng.overrides_for(p, index)
        if not overrides:
            return base
        return {**base, **overrides}

    def init_state(self, p, config):
        raise NotImplementedError

    @torch.no_grad()
    def init_one_state(self, p, config):
        """A one-state parameter's state (SGD, RMSprop, Adagrad, Lion, LARS, Muon's momentum): step, and state1 in
        8 bits (the signed map, absmax per 256 elements) when optim_bits is 8 and p has min_8bit_size elements or
        more, else float32."""
        state = self.state[p]
        state["step"] = self.new_step(p)
        self.init_clipping_state(p, config)
        if not (config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]):
            state["state1"] = self.state_zeros(p, torch.float32)
            return
        if "dynamic" not in self.name2qmap:
            self.fill_qmap()
        if self.name2qmap["dynamic"].device != p.device:
            self.name2qmap["dynamic"] = self.name2qmap["dynamic"].to(p.device)
        state["state1"] = self.state_zeros(p, torch.uint8)
        state["qmap1"] = self.name2qmap["dynamic"]
        state["absmax1"] = torch.zeros(_blocks(D.local(p).numel()), dtype=torch.float32, device=p.device)

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
    def gnorm_scale(self, p, step=None):
        """bnb 0.49's percentile clipping: keep the last 100 squared gradient norms; if this step's norm exceeds the
        `percentile`-th smallest of them (index into the sorted history, zeros of unfilled slots included, as bnb
        does), scale the gradient down to it. 1.0 when percentile_clipping is 100. `step` is the step being taken
        (default: the state's count). (Reads one value to the host.)"""
        if self.percentile_clipping >= 100:
            return 1.0
        state = self.state[p]
        history = state["gnorm_vec"]
        slot = int(state["step"] if step is None else step) % 100
        squared = D.local(p.grad).float().pow(2).sum()
        info = self.shard(p)
        history[slot] = D.all_reduce_sum(squared, info) if info is not None else squared
        current = history[slot].sqrt()
        clip = torch.sort(history).values[self.percentile_clipping].sqrt()
        return float((clip / current).item()) if bool(current > clip) else 1.0

    def record_unorms(self, batch, norms, factors):
        """bnb's state["unorm_vec"] of LAMB / LARS: the sum of squares of the update direction, from the norm pass
        (`factors` rescale it, e.g. LAMB's bias correction), on the device."""
        targets = [self.state[p]["unorm_vec"] for p in batch if "unorm_vec" in self.state[p]]
        if len(targets) != len(batch):
            return
        scaled = norms[:, :1] * (factors.to(norms.device)[:, None] if torch.is_tensor(factors) else factors)
        torch._foreach_copy_(targets, list(scaled.unbind(0)))

    def update_params(self, items):
        """One step for [(parameter, config)]: one kernel call per batch of equal device, dtype, state kind and
        hyperparameters."""
        raise NotImplementedError
