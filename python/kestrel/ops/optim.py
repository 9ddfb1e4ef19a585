"""Fake (meta) kernels of the fused optimizer ops, so that an optimizer step traces under torch.compile.

The ops themselves (torch.ops.kestrel.two_state8bit_step_ / two_state32bit_step_ / one_state8bit_step_ /
one_state32bit_step_) are called by kestrel.optim; they mutate their tensor-list arguments in place and return
nothing. update_norms (LAMB / LARS) returns a float32 (len(params), 2) tensor of sums of squares. Their scalars go
by name (TwoStateScalars, OneStateScalars); the ops check every argument themselves (csrc/optim_checks.h:
read_step_call, the one prologue of the CPU and CUDA launchers).
"""

from typing import NamedTuple

import torch

from .. import _ext


class TwoStateScalars(NamedTuple):
    """The scalars of a two-state step op (two_state8bit_step_ / two_state32bit_step_), by their schema names:
    pass them as `**scalars._asdict()`. beta3 and alpha are AdEMAMix's (0 for Adam); round_seed >= 0 rounds bf16
    parameters stochastically. Hashable: the optimizers batch the parameters of equal scalars into one call."""

    lr: float
    beta1: float
    beta2: float
    beta3: float
    alpha: float
    eps: float
    weight_decay: float
    gnorm_scale: float
    round_seed: int = -1


class OneStateScalars(NamedTuple):
    """The scalars of a one-state step op (one_state8bit_step_ / one_state32bit_step_), by their schema names."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    gnorm_scale: float
    round_seed: int = -1


if _ext.available():

    @torch.library.register_fake("kestrel::two_state8bit_step_")
    def _two_state8bit_step_fake(
        optimizer,
        params,
        grads,
        state1,
        state2,
        absmax1,
        absmax2,
        qmap1,
        qmap2,
        steps,
        lr,
        beta1,
        beta2,
        beta3,
        alpha,
        eps,
        weight_decay,
        gnorm_scale,
        round_seed=-1,
        norms=None,
        max_unorm=0.0,
        lr_tensor=None,
        robust_rounding=False,
    ):
        return None

    @torch.library.register_fake("kestrel::two_state4bit_step_")
    def _two_state4bit_step_fake(
        optimizer,
        params,
        grads,
        state1,
        state2,
        absmax1,
        absmax2,
        qmap1,
        qmap2,
        steps,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        gnorm_scale,
        round_seed=-1,
        lr_tensor=None,
    ):
        return None

    @torch.library.register_fake("kestrel::two_state32bit_step_")
    def _two_state32bit_step_fake(
        optimizer,
        params,
        grads,
        state1,
        state2,
        steps,
        lr,
        beta1,
        beta2,
        beta3,
        alpha,
        eps,
        weight_decay,
        gnorm_scale,
        round_seed=-1,
        norms=None,
        max_unorm=0.0,
        lr_tensor=None,
        robust_rounding=False,
    ):
        return None

    @torch.library.register_fake("kestrel::one_state8bit_step_")
    def _one_state8bit_step_fake(
        optimizer,
        params,
        grads,
        state1,
        absmax1,
        qmap1,
        steps,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        gnorm_scale,
        round_seed=-1,
        norms=None,
        max_unorm=0.0,
        lr_tensor=None,
        robust_rounding=False,
    ):
        return None

    @torch.library.register_fake("kestrel::one_state32bit_step_")
    def _one_state32bit_step_fake(
        optimizer,
        params,
        grads,
        state1,
        steps,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        gnorm_scale,
        round_seed=-1,
        norms=None,
        max_unorm=0.0,
        lr_tensor=None,
        robust_rounding=False,
    ):
        return None

    @torch.library.register_fake("kestrel::update_norms")
    def _update_norms_fake(
        optimizer,
        params,
        grads,
        state1,
        state2,
        absmax1,
        absmax2,
        qmap1,
        qmap2,
        steps,
        beta1,
        beta2,
        eps,
        weight_decay,
        gnorm_scale,
    ):
        device = params[0].device if params else torch.device("cpu")
        return torch.empty((len(params), 2), dtype=torch.float32, device=device)

    @torch.library.register_fake("kestrel::managed_zeros")
    def _managed_zeros_fake(like, size, dtype):
        return like.new_empty(size, dtype=dtype)

    @torch.library.register_fake("kestrel::prefetch")
    def _prefetch_fake(tensors):
        return None


__all__ = ["OneStateScalars", "TwoStateScalars"]
