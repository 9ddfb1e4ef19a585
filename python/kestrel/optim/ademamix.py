"""AdEMAMix (Pagliardini et al., 2024) with 8-bit or 32-bit state, bitsandbytes 0.50's classes and semantics.

state1 holds two first moments, m1 (beta1) and m2 (beta3), shape (2, *p.shape) (absmax1 (2, blocks) when 8-bit,
both on the signed map); state2 holds nu (beta2, unsigned map). The update is
p -= lr * (m1 / (1 - beta1^t) + alpha * m2) / (sqrt(nu) / sqrt(1 - beta2^t) + eps), then p *= 1 - lr * weight_decay.
Optional warm-ups: alpha_t = min(t * alpha / t_alpha, alpha) and the beta3 schedule of the paper (bnb's formula).
"""

import math

import torch

from ..ops.optim import TwoStateScalars
from . import distributed as D
from .adam import _Adam
from .optimizer import _blocks, check_betas, check_number, paged_class


class _AdEMAMix(_Adam):
    optimizer_name = "ademamix"
    num_betas = 3
    state1_moments = 2  # m1 and m2

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999, 0.9999),
        alpha=5.0,
        t_alpha=None,
        t_beta3=None,
        eps=1e-8,
        weight_decay=1e-2,
        optim_bits=32,
        min_8bit_size=4096,
        is_paged=False,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        settings = dict(alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3)
        self.check_schedule(type(self).__name__, settings)
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            False,
            optim_bits,
            None,
            min_8bit_size,
            is_paged,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
            _ademamix=settings,
        )

    @staticmethod
    def check_schedule(where, config):
        check_number(where, "alpha", config["alpha"])
        for key in ("t_alpha", "t_beta3"):
            value = config.get(key)
            if value is not None and not (check_number(where, key, value) > 0):
                raise ValueError(f"{where}: {key} must be None or > 0, got {value!r}")

    def check_family(self, config, where):
        """Each group's own betas (three), alpha and warm-ups: a group's settings are its own, never the
        constructor's."""
        check_betas(where, config["betas"], 3)
        self.check_schedule(where, config)

    @staticmethod
    def scheduled(config, step):
        """(alpha_t, beta3_t) at `step`, bnb's warm-up schedules."""
        beta1, _, beta3 = config["betas"]
        alpha, t_alpha, t_beta3 = config["alpha"], config.get("t_alpha"), config.get("t_beta3")
        alpha_t = min(step * alpha / t_alpha, alpha) if t_alpha else alpha
        if t_beta3:
            ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
            scale = step / t_beta3
            beta3_t = min(math.exp((ln_beta1 * ln_beta3) / ((1 - scale) * ln_beta3 + scale * ln_beta1)), beta3)
        else:
            beta3_t = beta3
        return alpha_t, beta3_t

    def step_scalars(self, config, step, gnorm_scale=1.0, round_seed=-1):
        beta1, beta2, _ = config["betas"]
        if config.get("t_alpha") or config.get("t_beta3"):  # the warm-ups read the step on the host
            alpha_t, beta3_t = self.scheduled(config, int(step))
        else:
            alpha_t, beta3_t = config["alpha"], config["betas"][2]
        return TwoStateScalars(
            lr=self.lr_of(config)[0],
            beta1=float(beta1),
            beta2=float(beta2),
            beta3=float(beta3_t),
            alpha=float(alpha_t),
            eps=float(config["eps"]),
            weight_decay=float(config["weight_decay"]),
            gnorm_scale=gnorm_scale,
            round_seed=round_seed,
        )

    @torch.no_grad()
    def init_state(self, p, config):
        state = self.state[p]
        state["step"] = self.new_step(p)
        eight_bit = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
        dtype = torch.uint8 if eight_bit else torch.float32
        state["state1"] = self.state_zeros(p, dtype, (2, *p.shape))
        state["state2"] = self.state_zeros(p, dtype)
        if not eight_bit:
            return
        if "dynamic" not in self.name2qmap:
            self.fill_qmap()
        for key in ("dynamic", "udynamic"):
            if self.name2qmap[key].device != p.device:
                self.name2qmap[key] = self.name2qmap[key].to(p.device)
        state["qmap1"], state["qmap2"] = self.name2qmap["dynamic"], self.name2qmap["udynamic"]
        state["absmax1"] = torch.zeros((2, _blocks(D.local(p).numel())), dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros(_blocks(D.local(p).numel()), dtype=torch.float32, device=p.device)


class AdEMAMix(_AdEMAMix):
    """AdEMAMix with 8-bit (optim_bits=8) or 32-bit state (bnb.optim.AdEMAMix)."""


class AdEMAMix8bit(_AdEMAMix):
    """AdEMAMix with 8-bit state (a drop-in for bnb.optim.AdEMAMix8bit)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999, 0.9999),
        alpha=5.0,
        t_alpha=None,
        t_beta3=None,
        eps=1e-8,
        weight_decay=1e-2,
        min_8bit_size=4096,
        is_paged=False,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            alpha,
            t_alpha,
            t_beta3,
            eps,
            weight_decay,
            8,
            min_8bit_size,
            is_paged,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class AdEMAMix32bit(_AdEMAMix):
    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999, 0.9999),
        alpha=5.0,
        t_alpha=None,
        t_beta3=None,
        eps=1e-8,
        weight_decay=1e-2,
        min_8bit_size=4096,
        is_paged=False,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            alpha,
            t_alpha,
            t_beta3,
            eps,
            weight_decay,
            32,
            min_8bit_size,
            is_paged,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


PagedAdEMAMix = paged_class(AdEMAMix, "PagedAdEMAMix")
PagedAdEMAMix8bit = paged_class(AdEMAMix8bit, "PagedAdEMAMix8bit")
PagedAdEMAMix32bit = paged_class(AdEMAMix32bit, "PagedAdEMAMix32bit")
