"""GlobalOptimManager: per-parameter overrides of optimizer settings (bitsandbytes' API and semantics).

    mng = GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())       # optional, while the model is still being built
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    mng.override_config(model.fc1.weight, "optim_bits", 32)   # before or after the optimizer is built
    mng.override_config([model.fc2.weight], key_value_dict={"lr": 1e-4, "betas": (0.9, 0.95)})

Overrides are looked up by parameter identity when a parameter's state is created (optim_bits, min_8bit_size) and
at every step (lr, betas, eps, weight_decay). The manager is the one piece of global state kestrel keeps, as bnb
users expect.
"""

import torch


class GlobalOptimManager:
    _instance = None

    def __init__(self):
        raise RuntimeError("GlobalOptimManager is a singleton: use GlobalOptimManager.get_instance()")

    def initialize(self):
        self.pid2config = {}
        self.index2config = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple = []

    @classmethod
    def get_instance(cls):
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group_index, group in enumerate(groups):
            for param_index, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(group_index, param_index)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None):
        """Override settings of `parameters` (a tensor or a list): one `key`/`value`, or `key_value_dict`."""
        if key is not None and key_value_dict is not None:
            raise ValueError("override_config: give key and value, or key_value_dict, not both")
        if key is not None:
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config: nothing to override (give key and value, or key_value_dict)")
        self.uses_config_override = True
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for p in parameters:
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)

    def register_module_override(self, module, param_name, config):
        """Override settings of `getattr(module, param_name)` (StableEmbedding uses it for 32-bit state)."""
        self.module_weight_config_triple.append((module, param_name, config))

    def resolve_module_overrides(self):
        for module, attr, config in self.module_weight_config_triple:
            p = getattr(module, attr, None)
            if isinstance(p, torch.Tensor):
                self.pid2config.setdefault(id(p), {}).update(config)
