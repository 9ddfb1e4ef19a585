"""Adam and AdamW with 8-bit block-wise or 32-bit state: bitsandbytes 0.50's classes and signatures.

Adam8bit and AdamW8bit apply weight decay decoupled, after the update (p *= 1 - lr * weight_decay), as bnb's
kernel does for both; so Adam8bit with weight decay behaves as AdamW.
"""

from collections import defaultdict

import torch

from ..ops.optim import TwoStateScalars
from . import distributed as D
from .four_bit import FourBitAdam
from .optimizer import (
    Optimizer8bit,
    _blocks,
    check_args,
    check_betas,
    check_hyperparameters,
    check_int,
    check_max_unorm,
    default_args,
    paged_class,
)


class _Adam(Optimizer8bit):
    """The shared implementation (bnb's Optimizer2State for "adam")."""

    optimizer_name = "adam"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        max_unorm=0.0,
        capturable=False,
        robust_rounding=False,
        _ademamix=None,
    ):
        name = type(self).__name__
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True")
        betas = check_betas(name, betas, self.num_betas, self.beta_labels)
        check_hyperparameters(
            name, lr, eps, betas, weight_decay, optim_bits, block_wise, self.beta_labels, self.supported_bits
        )
        check_int(name, "min_8bit_size", min_8bit_size)
        self.args = default_args(args, optim_bits, min_8bit_size, max_unorm)
        check_args(name, self.args, self.supported_bits)
        check_max_unorm(name, self.args, supported=self.optimizer_name == "adam")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=0.0, t_alpha=None, t_beta3=None)
        defaults.update(_ademamix or {})
        super().__init__(params, defaults, optim_bits, is_paged, bf16_stochastic_round, capturable, robust_rounding)
        self.set_percentile_clipping(percentile_clipping)
        self.check_capturable_settings()

    @torch.no_grad()
    def init_state(self, p, config):
        state = self.state[p]
        state["step"] = self.new_step(p)
        self.init_clipping_state(p, config)
        eight_bit = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
        if not eight_bit:
            state["state1"] = self.state_zeros(p, torch.float32)
            state["state2"] = self.state_zeros(p, torch.float32)
            return
        if "dynamic" not in self.name2qmap:
            self.fill_qmap()
        for key in ("dynamic", "udynamic"):
            if self.name2qmap[key].device != p.device:
                self.name2qmap[key] = self.name2qmap[key].to(p.device)
        state["state1"] = self.state_zeros(p, torch.uint8)
        state["qmap1"] = self.name2qmap["dynamic"]
        state["state2"] = self.state_zeros(p, torch.uint8)
        state["qmap2"] = self.name2qmap["udynamic"]
        state["absmax1"] = torch.zeros(_blocks(D.local(p).numel()), dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros(_blocks(D.local(p).numel()), dtype=torch.float32, device=p.device)

    def step_scalars(self, config, step, gnorm_scale=1.0, round_seed=-1):
        """The kernel's scalars at `step`, by name (TwoStateScalars; beta3 and alpha are AdEMAMix's)."""
        beta1, beta2 = config["betas"][:2]
        return TwoStateScalars(
            lr=self.lr_of(config)[0],
            beta1=float(beta1),
            beta2=float(beta2),
            beta3=0.0,
            alpha=0.0,
            eps=float(config["eps"]),
            weight_decay=float(config["weight_decay"]),
            gnorm_scale=gnorm_scale,
            round_seed=round_seed,
        )

    @torch.no_grad()
    def update_params(self, items):
        """One step for [(parameter, config)] (checked by step()): one fused call per batch of equal device, dtype,
        state kind and settings. Each batch's kernel runs with the next step counts; the states' counts advance
        after it, in place (a captured step replays the same)."""
        batches = defaultdict(list)
        for p, config in items:
            state = self.state[p]
            eight_bit = state["state1"].dtype == torch.uint8
            maps = (id(state["qmap1"]), id(state["qmap2"])) if eight_bit else None
            step = state["step"] + 1
            scalars = self.step_scalars(config, step, self.gnorm_scale(p, step), self.round_seed_for(p, config))
            max_unorm = float(config.get("max_unorm", 0.0) or 0.0)
            lr_tensor = self.lr_of(config)[1]
            robust = bool(config.get("robust_rounding", False))
            key = (p.device, p.dtype, eight_bit, maps, scalars, max_unorm, self.shard_key(p), id(lr_tensor), robust)
            batches[key].append((p, lr_tensor))
        for (_, _, eight_bit, _, scalars, max_unorm, _, _, robust), entries in batches.items():
            batch, lr_tensor = [p for p, _ in entries], entries[0][1]
            states = [self.state[p] for p in batch]
            params, grads, write_back = self.local_batch(batch)
            steps = self.steps_of(states) + 1
            state1, state2 = [s["state1"] for s in states], [s["state2"] for s in states]
            absmax1 = [s["absmax1"] for s in states] if eight_bit else []
            absmax2 = [s["absmax2"] for s in states] if eight_bit else []
            qmap1, qmap2 = (states[0]["qmap1"], states[0]["qmap2"]) if eight_bit else (None, None)
            self.prefetch(batch[0], state1 + state2)
            norms = None
            if max_unorm > 0.0:  # LAMB's trust ratio: the norm pass first (no host synchronisation)
                norms = torch.ops.kestrel.update_norms(
                    self.optimizer_name,
                    params,
                    grads,
                    state1,
                    state2,
                    absmax1,
                    absmax2,
                    qmap1,
                    qmap2,
                    steps,
                    beta1=scalars.beta1,
                    beta2=scalars.beta2,
                    eps=scalars.eps,
                    weight_decay=scalars.weight_decay,
                    gnorm_scale=scalars.gnorm_scale,
                )
                norms = self.reduce_norms(batch[0], norms)
                self.record_unorms(batch, norms, self.lamb_norm_factors(steps, scalars.beta1, scalars.beta2))
            if eight_bit:
                torch.ops.kestrel.two_state8bit_step_(
                    self.optimizer_name,
                    params,
                    grads,
                    state1,
                    state2,
                    absmax1,
                    absmax2,
                    qmap1,
                    qmap2,
                    steps,
                    **scalars._asdict(),
                    norms=norms,
                    max_unorm=max_unorm,
                    lr_tensor=lr_tensor,
                    robust_rounding=robust,
                )
            else:
                torch.ops.kestrel.two_state32bit_step_(
                    self.optimizer_name,
                    params,
                    grads,
                    state1,
                    state2,
                    steps,
                    **scalars._asdict(),
                    norms=norms,
                    max_unorm=max_unorm,
                    lr_tensor=lr_tensor,
                    robust_rounding=robust,
                )
            self.write_back(write_back)
            torch._foreach_add_([s["step"] for s in states], 1)

    @staticmethod
    def lamb_norm_factors(steps, beta1, beta2):
        """(c2 / c1)^2 per parameter, on the device of `steps`: the norm pass sums Adam's direction, bnb's unorm_vec
        holds the bias-corrected update's."""
        t = steps.double()
        return ((1.0 - beta2**t) / (1.0 - beta1**t) ** 2).float()


_SIGNATURE_DOC = """
    Arguments (bitsandbytes 0.50): params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay={wd},
    amsgrad=False (True raises), optim_bits={bits}, args=None, min_8bit_size=4096 (smaller tensors keep float32
    state), is_paged=False. bnb 0.49's percentile_clipping=100 (clip each gradient to the given percentile of its
    last 100 norms) and block_wise=True (False raises) are accepted as keywords. bf16_stochastic_round=False (beyond
    bnb): round bf16 parameters stochastically (unbiased), deterministic given torch's seed at construction.
    capturable=False (beyond bnb): keep step counts on the GPU (and accept a float32 GPU tensor lr) so that a step can
    be captured in a CUDA graph. lr may be a tensor (for LR schedulers under torch.compile).
"""


class Adam(FourBitAdam, _Adam):
    __doc__ = (
        "Adam with 8-bit (optim_bits=8), 4-bit (optim_bits=4: AdamW4bit's states) or 32-bit state; weight decay "
        "decoupled, after the update." + _SIGNATURE_DOC.format(wd=0, bits=32)
    )
    supported_bits = (4, 8, 32)

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        *,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            optim_bits,
            args,
            min_8bit_size,
            is_paged,
            percentile_clipping,
            block_wise,
            bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class AdamW(FourBitAdam, _Adam):
    __doc__ = (
        "AdamW with 8-bit (optim_bits=8), 4-bit (optim_bits=4: AdamW4bit's states) or 32-bit state."
        + _SIGNATURE_DOC.format(wd=1e-2, bits=32)
    )
    supported_bits = (4, 8, 32)

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        *,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            optim_bits,
            args,
            min_8bit_size,
            is_paged,
            percentile_clipping,
            block_wise,
            bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


def _fixed_bits(cls_name, bits, default_wd):
    """Adam8bit/AdamW8bit/Adam32bit/AdamW32bit: like bnb, optim_bits is accepted only at its default of 32."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=default_wd,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        *,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        if amsgrad:
            raise ValueError(f"{cls_name} does not support amsgrad=True")
        if optim_bits != 32:
            raise ValueError(
                f"{cls_name}: optim_bits is fixed to {bits} (only the default optim_bits=32 is accepted, "
                f"for bnb compatibility), got {optim_bits}"
            )
        _Adam.__init__(
            self,
            params,
            lr,
            betas,
            eps,
            weight_decay,
            False,
            bits,
            args,
            min_8bit_size,
            is_paged,
            percentile_clipping,
            block_wise,
            bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )

    return __init__


class Adam8bit(_Adam):
    __doc__ = "Adam with 8-bit block-wise state (a drop-in for bnb.optim.Adam8bit)." + _SIGNATURE_DOC.format(
        wd=0, bits="32 (ignored: always 8-bit)"
    )
    __init__ = _fixed_bits("Adam8bit", 8, 0)


class AdamW8bit(_Adam):
    __doc__ = "AdamW with 8-bit block-wise state (a drop-in for bnb.optim.AdamW8bit)." + _SIGNATURE_DOC.format(
        wd=1e-2, bits="32 (ignored: always 8-bit)"
    )
    __init__ = _fixed_bits("AdamW8bit", 8, 1e-2)


class Adam32bit(_Adam):
    __doc__ = "Adam with float32 state, bnb's update rule." + _SIGNATURE_DOC.format(wd=0, bits=32)
    __init__ = _fixed_bits("Adam32bit", 32, 0)


class AdamW32bit(_Adam):
    __doc__ = "AdamW with float32 state, bnb's update rule." + _SIGNATURE_DOC.format(wd=1e-2, bits=32)
    __init__ = _fixed_bits("AdamW32bit", 32, 1e-2)


PagedAdam = paged_class(Adam, "PagedAdam")
PagedAdamW = paged_class(AdamW, "PagedAdamW")
PagedAdam8bit = paged_class(Adam8bit, "PagedAdam8bit")
PagedAdamW8bit = paged_class(AdamW8bit, "PagedAdamW8bit")
PagedAdam32bit = paged_class(Adam32bit, "PagedAdam32bit")
PagedAdamW32bit = paged_class(AdamW32bit, "PagedAdamW32bit")
