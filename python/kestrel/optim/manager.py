"""GlobalOptimManager: per-parameter overrides of optimizer settings (bitsandbytes' API, with sound semantics).

    mng = GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())       # optional, while the model is still being built
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    mng.override_config(model.fc1.weight, "optim_bits", 32)   # before or after the optimizer is built
    mng.override_config([model.fc2.weight], key_value_dict={"lr": 1e-4, "betas": (0.9, 0.95)})

Overrides are looked up when a parameter's state is created (optim_bits, min_8bit_size) and at every step (lr,
betas, eps, weight_decay, ...). Where bnb's manager keys overrides by `id(p)` and applies registration positions to
any optimizer, this one:
- holds parameters weakly: an override belongs to the tensor it was given for, never to a later tensor that
  reuses a freed one's id, and nothing is kept alive by the manager (StableEmbedding modules included);
- applies an override recorded by `register_parameters` at position (group, index) only to the parameter
  registered there, or to its replacement once the registered tensor is gone (e.g. a module re-created on another
  device) when the shapes match; another model's parameters at the same position are not affected;
- checks keys and values when they are given: a misspelt key or a value out of range raises at once.

The manager is the one piece of global state kestrel keeps, as bnb users expect.
"""

import weakref

import torch

from .._checks import is_int, is_number


# the settings an override may change, and a check of each value (the optimizer checks its own rules again)
def _number(low=0.0, high=None):
    def check(key, value):
        if not is_number(value) or not value >= low or (high is not None and not value < high) or value == float("inf"):
            where = f"in [{low:g}, {high:g})" if high is not None else f">= {low:g} and finite"
            raise ValueError(f"GlobalOptimManager.override_config: {key} must be a number {where}, got {value!r}")

    return check


def _lr(key, value):
    if torch.is_tensor(value):
        if not value.is_floating_point() or value.numel() != 1:
            raise ValueError(
                f"GlobalOptimManager.override_config: a tensor {key} must hold one floating-point value, "
                f"got {value.dtype} with {value.numel()} values"
            )
        return
    _number()(key, value)


def _betas(key, value):
    try:
        betas = tuple(value)
    except TypeError:
        raise ValueError(
            f"GlobalOptimManager.override_config: betas must be a tuple of numbers, got {value!r}"
        ) from None
    if not 1 <= len(betas) <= 3:
        raise ValueError(f"GlobalOptimManager.override_config: betas must hold 2 (or AdEMAMix's 3) values, got {betas}")
    for i, b in enumerate(betas):
        _number(0.0, 1.0)(f"betas[{i}]", b)


def _choice(options):
    flags = all(isinstance(o, bool) for o in options)

    def check(key, value):
        if isinstance(value, bool) != flags or value not in options:
            raise ValueError(f"GlobalOptimManager.override_config: {key} must be one of {options}, got {value!r}")

    return check


def _int(key, value):
    if not is_int(value) or value < 0:
        raise ValueError(f"GlobalOptimManager.override_config: {key} must be an integer >= 0, got {value!r}")


def _optional_positive(key, value):
    if value is not None:
        _number(0.0)(key, value)
        if not value > 0:
            raise ValueError(f"GlobalOptimManager.override_config: {key} must be None or > 0, got {value!r}")


OVERRIDABLE = {
    "lr": _lr,
    "betas": _betas,
    "eps": _number(),
    "weight_decay": _number(),
    "alpha": _number(),
    "t_alpha": _optional_positive,
    "t_beta3": _optional_positive,
    "optim_bits": _choice((8, 32)),
    "min_8bit_size": _int,
    "max_unorm": _number(),
    "robust_rounding": _choice((False, True)),
    "skip_zeros": _choice((False, True)),
}


class _Entry:
    """An override of one tensor, held weakly."""

    __slots__ = ("ref", "config")

    def __init__(self, tensor, config, on_death):
        self.ref = weakref.ref(tensor, on_death)
        self.config = config


class GlobalOptimManager:
    _instance = None

    def __init__(self):
        raise RuntimeError("GlobalOptimManager is a singleton: use GlobalOptimManager.get_instance()")

    def initialize(self):
        self._by_id = {}  # id(p) -> _Entry (only while p is alive)
        self._positions = {}  # (group, index) -> (weakref of the registered tensor, its shape, config)
        self._registered = {}  # id(p) -> (group, index), for tensors registered by register_parameters
        self._modules = []  # (weakref of module, attribute, config), StableEmbedding's registrations
        self._pending = []  # module registrations not yet resolved into tensor overrides
        self.optimizer = None
        self.uses_config_override = False

    @classmethod
    def get_instance(cls):
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    # ------------------------------------------------------------------------------------------------- bnb's views
    @property
    def pid2config(self):
        """bnb's id(p) -> settings mapping (live tensors only)."""
        return {key: entry.config for key, entry in self._by_id.items() if entry.ref() is not None}

    @property
    def index2config(self):
        """bnb's (group, index) -> settings mapping of register_parameters."""
        return {index: config for index, (_, _, config) in self._positions.items()}

    @property
    def module_weight_config_triple(self):
        return [(module, attr, config) for ref, attr, config in self._modules if (module := ref()) is not None]

    # ------------------------------------------------------------------------------------------------- registering
    def _forget(self, key):
        def on_death(_ref):
            entry = self._by_id.get(key)
            if entry is not None and entry.ref is _ref:
                del self._by_id[key]

        return on_death

    def _entry(self, p):
        entry = self._by_id.get(id(p))
        if entry is None or entry.ref() is not p:  # a freed tensor's id, reused: not this tensor's override
            entry = _Entry(p, {}, self._forget(id(p)))
            self._by_id[id(p)] = entry
        return entry

    def register_parameters(self, params):
        """Record the layout (group, index) of `params` (a list of tensors or of param-group dicts), so that
        overrides of these tensors also reach their replacements at the same position of an optimizer."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group_index, group in enumerate(groups):
            for param_index, p in enumerate(group["params"]):
                config = self._entry(p).config
                self._positions[(group_index, param_index)] = (weakref.ref(p), tuple(p.shape), config)

    def override_config(self, parameters, key=None, value=None, key_value_dict=None):
        """Override settings of `parameters` (a tensor or a list): one `key`/`value`, or `key_value_dict`. Keys
        and values are checked now (a misspelt key or an out-of-range value raises and records nothing)."""
        if key is not None and key_value_dict is not None:
            raise ValueError("override_config: give key and value, or key_value_dict, not both")
        if key is not None:
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config: nothing to override (give key and value, or key_value_dict)")
        for name, setting in key_value_dict.items():
            if name not in OVERRIDABLE:
                raise ValueError(
                    f"override_config: unknown setting {name!r}; the settings that can be overridden "
                    f"are {sorted(OVERRIDABLE)}"
                )
            OVERRIDABLE[name](name, setting)
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"override_config: parameters must be tensors, got {type(p).__name__}")
        self.uses_config_override = True
        for p in parameters:
            self._entry(p).config.update(key_value_dict)

    def register_module_override(self, module, param_name, config):
        """Override settings of `getattr(module, param_name)` (StableEmbedding uses it for 32-bit state). The
        module is held weakly: a deleted module's registration disappears with it."""
        for name, setting in config.items():
            if name not in OVERRIDABLE:
                raise ValueError(f"register_module_override: unknown setting {name!r}")
            OVERRIDABLE[name](name, setting)
        registration = (weakref.ref(module), param_name, dict(config))
        self._modules.append(registration)
        self._pending.append(registration)
        if len(self._modules) > 2 * max(64, len(self._pending)):  # drop dead registrations now and then
            self._modules = [r for r in self._modules if r[0]() is not None]

    def resolve_module_overrides(self, everything=False):
        """Turn module registrations into overrides of the modules' current tensors: those made since the last call,
        or (`everything`, an optimizer's first step, as bnb's check_overrides) every live one."""
        if everything:
            self._modules = [r for r in self._modules if r[0]() is not None]
            pending, self._pending = list(self._modules), []
        else:
            pending, self._pending = self._pending, []
        for ref, attr, config in pending:
            module = ref()
            p = getattr(module, attr, None) if module is not None else None
            if isinstance(p, torch.Tensor):
                self._entry(p).config.update(config)

    # ------------------------------------------------------------------------------------------------- lookups
    def overrides_for(self, p, index=None):
        """The settings that override p's (empty if none): positional ones (register_parameters) first, then p's own."""
        config = {}
        if index is not None and index in self._positions:
            ref, shape, positional = self._positions[index]
            registered = ref()
            if registered is p or (registered is None and tuple(p.shape) == shape):
                config.update(positional)
        entry = self._by_id.get(id(p))
        if entry is not None and entry.ref() is p:
            config.update(entry.config)
        return config
