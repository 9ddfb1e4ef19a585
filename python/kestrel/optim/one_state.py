"""The one-state optimizers of bitsandbytes 0.50 (SGD with momentum, RMSprop, Adagrad, Lion), 8-bit or 32-bit
state, with bnb's signatures and argument checks. The 8-bit state uses the signed dynamic map (as bnb does, even
for RMSprop and Adagrad), in blocks of 256.

Update rules (t the step, from 1): SGD `g += wd*p; s = g (t=1) else momentum*s + g; p -= lr*s`; RMSprop
`g += wd*p; s = alpha*s + (1-alpha)*g*g; p -= lr*g/(sqrt(s)+eps)`; Adagrad `g += wd*p; s += g*g;
p -= lr*g/(sqrt(s)+eps)`; Lion `p *= 1-lr*wd; p -= lr*sign(b1*s + (1-b1)*g); s = b2*s + (1-b2)*g`.
"""

from collections import defaultdict

import torch

from ..ops.optim import OneStateScalars
from .optimizer import (
    Optimizer8bit,
    check_args,
    check_betas,
    check_hyperparameters,
    check_int,
    check_max_unorm,
    default_args,
    paged_class,
)


class _OneState(Optimizer8bit):
    """bnb's Optimizer1State; subclasses set `optimizer_name` (momentum, rmsprop, adagrad, lion)."""

    two_states = False

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.0),
        eps=1e-8,
        weight_decay=0.0,
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
    ):
        name = type(self).__name__
        betas = check_betas(name, betas, 2, self.beta_labels)
        check_hyperparameters(name, lr, eps, betas, weight_decay, optim_bits, block_wise, self.beta_labels)
        check_int(name, "min_8bit_size", min_8bit_size)
        self.args = default_args(args, optim_bits, min_8bit_size, max_unorm)
        check_args(name, self.args)
        check_max_unorm(name, self.args, supported=self.optimizer_name == "momentum")
        self.check_family(dict(betas=betas), name)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits, is_paged, bf16_stochastic_round, capturable, robust_rounding)
        self.set_percentile_clipping(percentile_clipping)
        self.check_capturable_settings()

    @torch.no_grad()
    def init_state(self, p, config):
        self.init_one_state(p, config)

    @torch.no_grad()
    def update_params(self, items):
        """As kestrel.optim.adam._Adam.update_params: the kernels run with the next step counts, which the states
        take after their batch's kernel."""
        batches = defaultdict(list)
        for p, config in items:
            state = self.state[p]
            eight_bit = state["state1"].dtype == torch.uint8
            beta1, beta2 = tuple(config["betas"])[:2]
            step = state["step"] + 1
            scalars = OneStateScalars(
                lr=self.lr_of(config)[0],
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(config["eps"]),
                weight_decay=float(config["weight_decay"]),
                gnorm_scale=self.gnorm_scale(p, step),
                round_seed=self.round_seed_for(p, config),
            )
            max_unorm = float(config.get("max_unorm", 0.0) or 0.0)
            lr_tensor = self.lr_of(config)[1]
            robust = bool(config.get("robust_rounding", False))
            key = (
                p.device,
                p.dtype,
                eight_bit,
                id(state["qmap1"]) if eight_bit else None,
                scalars,
                max_unorm,
                self.shard_key(p),
                id(lr_tensor),
                robust,
            )
            batches[key].append((p, lr_tensor))
        for (_, _, eight_bit, _, scalars, max_unorm, _, _, robust), entries in batches.items():
            batch, lr_tensor = [p for p, _ in entries], entries[0][1]
            states = [self.state[p] for p in batch]
            params, grads, write_back = self.local_batch(batch)
            steps = self.steps_of(states) + 1
            state1 = [s["state1"] for s in states]
            absmax1 = [s["absmax1"] for s in states] if eight_bit else []
            qmap1 = states[0]["qmap1"] if eight_bit else None
            self.prefetch(batch[0], state1)
            norms = None
            if max_unorm > 0.0:  # LARS's trust ratio: the norm pass first (no host synchronisation)
                norms = torch.ops.kestrel.update_norms(
                    self.optimizer_name,
                    params,
                    grads,
                    state1,
                    state1,
                    absmax1,
                    absmax1,
                    qmap1,
                    None,
                    steps,
                    beta1=scalars.beta1,
                    beta2=scalars.beta2,
                    eps=scalars.eps,
                    weight_decay=scalars.weight_decay,
                    gnorm_scale=scalars.gnorm_scale,
                )
                norms = self.reduce_norms(batch[0], norms)
                self.record_unorms(batch, norms, 1.0)
            if eight_bit:
                torch.ops.kestrel.one_state8bit_step_(
                    self.optimizer_name,
                    params,
                    grads,
                    state1,
                    absmax1,
                    qmap1,
                    steps,
                    **scalars._asdict(),
                    norms=norms,
                    max_unorm=max_unorm,
                    lr_tensor=lr_tensor,
                    robust_rounding=robust,
                )
            else:
                torch.ops.kestrel.one_state32bit_step_(
                    self.optimizer_name,
                    params,
                    grads,
                    state1,
                    steps,
                    **scalars._asdict(),
                    norms=norms,
                    max_unorm=max_unorm,
                    lr_tensor=lr_tensor,
                    robust_rounding=robust,
                )
            self.write_back(write_back)
            torch._foreach_add_([s["step"] for s in states], 1)


def _reject(name, condition, message, error=NotImplementedError):
    if condition:
        raise error(f"{name}: {message}")


class _Momentum(_OneState):
    """SGD with momentum and LARS: bnb keeps the momentum and the dampening in betas."""

    optimizer_name = "momentum"
    beta_labels = ("momentum", "dampening")  # bnb keeps SGD's momentum and dampening in betas

    def check_family(self, config, where):
        momentum, dampening = check_betas(where, config["betas"], 2, self.beta_labels)
        if not momentum > 0.0:
            raise ValueError(f"{where}: momentum must be in (0, 1), got {momentum!r}")
        if dampening != 0.0:
            raise ValueError(f"{where}: dampening must be 0, got {dampening!r}")


class _SGD(_Momentum):
    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        *,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        name = type(self).__name__
        _reject(name, momentum == 0, "SGD without momentum is not supported (momentum must be > 0, got 0)")
        _reject(name, dampening != 0, f"dampening is not supported (got {dampening})")
        _reject(name, nesterov, "nesterov=True is not supported")
        super().__init__(
            params,
            lr,
            (momentum, dampening),
            0.0,
            weight_decay,
            optim_bits,
            args,
            min_8bit_size,
            False,
            percentile_clipping,
            block_wise,
            bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class SGD(_SGD):
    """SGD with momentum, 8-bit (optim_bits=8) or 32-bit state (bnb.optim.SGD)."""


class SGD8bit(_SGD):
    """SGD with momentum and 8-bit state (a drop-in for bnb.optim.SGD8bit)."""

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        args=None,
        min_8bit_size=4096,
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
            momentum,
            dampening,
            weight_decay,
            nesterov,
            8,
            args,
            min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class SGD32bit(_SGD):
    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        args=None,
        min_8bit_size=4096,
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
            momentum,
            dampening,
            weight_decay,
            nesterov,
            32,
            args,
            min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class _LARS(_Momentum):
    """LARS (You et al., 2017) as bnb has it: SGD with momentum (L2 decay in the gradient) whose update is scaled by
    the trust ratio min(1, max_unorm * ||p|| / ||momentum||), ||p|| before the step (1 for an all-zero parameter).
    bnb's 8-bit LARS skips the ratio silently; kestrel applies it (a norm pass before the fused step)."""

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=0.02,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        name = type(self).__name__
        _reject(name, momentum == 0, "LARS without momentum is not supported (momentum must be > 0, got 0)")
        _reject(name, dampening != 0, f"dampening is not supported (got {dampening})")
        _reject(name, nesterov, "nesterov=True is not supported")
        super().__init__(
            params,
            lr,
            (momentum, dampening),
            0.0,
            weight_decay,
            optim_bits,
            args,
            min_8bit_size,
            False,
            100,
            True,
            bf16_stochastic_round,
            max_unorm,
            capturable,
            robust_rounding,
        )


class LARS(_LARS):
    """LARS, 8-bit (optim_bits=8) or 32-bit state (bnb.optim.LARS)."""


class LARS8bit(_LARS):
    """LARS with 8-bit state (bnb.optim.LARS8bit's signature; the trust ratio is applied)."""

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        args=None,
        min_8bit_size=4096,
        max_unorm=0.02,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            8,
            args,
            min_8bit_size,
            max_unorm,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class LARS32bit(_LARS):
    """LARS with float32 state (bnb.optim.LARS32bit)."""

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        args=None,
        min_8bit_size=4096,
        max_unorm=0.02,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            32,
            args,
            min_8bit_size,
            max_unorm,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class _RMSprop(_OneState):
    optimizer_name = "rmsprop"
    beta_labels = ("alpha", "momentum")  # bnb keeps RMSprop's alpha (and an unused momentum) in betas

    def check_family(self, config, where):
        alpha, momentum = check_betas(where, config["betas"], 2, self.beta_labels)
        if not alpha > 0.0:
            raise ValueError(f"{where}: alpha must be in (0, 1), got {alpha!r}")
        if momentum != 0.0:
            raise ValueError(f"{where}: momentum must be 0, got {momentum!r}")

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        *,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        name = type(self).__name__
        _reject(name, alpha == 0, "RMSprop with alpha=0 is not supported")
        _reject(name, centered, "centered RMSprop is not supported")
        _reject(name, momentum != 0, f"momentum is not supported (got {momentum}; bnb ignores it silently)")
        super().__init__(
            params,
            lr,
            (alpha, momentum),
            eps,
            weight_decay,
            optim_bits,
            args,
            min_8bit_size,
            False,
            percentile_clipping,
            block_wise,
            bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class RMSprop(_RMSprop):
    """RMSprop, 8-bit (optim_bits=8) or 32-bit state (bnb.optim.RMSprop)."""


class RMSprop8bit(_RMSprop):
    """RMSprop with 8-bit state (a drop-in for bnb.optim.RMSprop8bit)."""

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        args=None,
        min_8bit_size=4096,
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
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            8,
            args,
            min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class RMSprop32bit(_RMSprop):
    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        args=None,
        min_8bit_size=4096,
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
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            32,
            args,
            min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class _Adagrad(_OneState):
    optimizer_name = "adagrad"

    def check_family(self, config, where):
        check_betas(where, config["betas"], 2)  # unused by Adagrad (bnb keeps (0, 0))

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        *,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        name = type(self).__name__
        _reject(
            name,
            initial_accumulator_value != 0,
            f"initial_accumulator_value must be 0, got {initial_accumulator_value}",
            ValueError,
        )
        _reject(name, lr_decay != 0, f"lr_decay must be 0, got {lr_decay}", ValueError)
        super().__init__(
            params,
            lr,
            (0.0, 0.0),
            eps,
            weight_decay,
            optim_bits,
            args,
            min_8bit_size,
            False,
            percentile_clipping,
            block_wise,
            bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class Adagrad(_Adagrad):
    """Adagrad, 8-bit (optim_bits=8) or 32-bit state (bnb.optim.Adagrad)."""


class Adagrad8bit(_Adagrad):
    """Adagrad with 8-bit state (a drop-in for bnb.optim.Adagrad8bit)."""

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        optim_bits=8,
        args=None,
        min_8bit_size=4096,
        *,
        percentile_clipping=100,
        block_wise=True,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        _reject(type(self).__name__, optim_bits != 8, f"optim_bits is fixed to 8, got {optim_bits}", ValueError)
        super().__init__(
            params,
            lr,
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            8,
            args,
            min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class Adagrad32bit(_Adagrad):
    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
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
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            32,
            args,
            min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class _Lion(_OneState):
    optimizer_name = "lion"

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0,
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
            0.0,
            weight_decay,
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


class Lion(_Lion):
    """Lion, 8-bit (optim_bits=8) or 32-bit state (bnb.optim.Lion)."""


class Lion8bit(_Lion):
    """Lion with 8-bit state (a drop-in for bnb.optim.Lion8bit)."""

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0,
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
            weight_decay,
            8,
            args,
            min_8bit_size,
            is_paged,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class Lion32bit(_Lion):
    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0,
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
            weight_decay,
            32,
            args,
            min_8bit_size,
            is_paged,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


PagedLion = paged_class(Lion, "PagedLion")
PagedLion8bit = paged_class(Lion8bit, "PagedLion8bit")
PagedLion32bit = paged_class(Lion32bit, "PagedLion32bit")
