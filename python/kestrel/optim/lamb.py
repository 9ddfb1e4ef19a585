"""LAMB (You et al., 2020) with 8-bit block-wise or 32-bit state: bitsandbytes 0.50's classes and signatures.

The update is Adam's (kestrel.optim.Adam: bias-corrected moments, weight decay decoupled and applied after the
update), scaled by the trust ratio min(1, max_unorm * ||p|| / ||u||), where ||p|| is the parameter's norm before
the step and u = m_hat / (sqrt(v_hat) + eps) the bias-corrected update direction (bnb's CUDA definition). A
parameter whose norm is 0 (a zero-initialised bias) takes the plain Adam step. max_unorm=0 turns the ratio off.

Unlike bitsandbytes, whose 8-bit LAMB silently skips the trust ratio (and accepts only max_unorm=1.0), kestrel's
LAMB8bit applies it: each step runs a norm pass (kestrel.update_norms) before the fused update, on the device, with
no host synchronisation, and the CPU and CUDA kernels reduce the norms in the same order.
"""

from .adam import _Adam


class _LAMB(_Adam):
    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        adam_w_mode=True,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=1.0,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        name = type(self).__name__
        if not bias_correction:
            raise ValueError(f"{name}: bias_correction=False is not supported (bnb ignores it silently)")
        if not adam_w_mode:
            raise ValueError(
                f"{name}: adam_w_mode=False (L2 decay in the gradient) is not supported; weight decay is "
                "decoupled (bnb ignores adam_w_mode silently)"
            )
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
            False,
            bf16_stochastic_round=bf16_stochastic_round,
            max_unorm=max_unorm,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class LAMB(_LAMB):
    """LAMB, 8-bit (optim_bits=8) or 32-bit state (bnb.optim.LAMB): Adam scaled by the trust ratio (max_unorm)."""


class LAMB8bit(_LAMB):
    """LAMB with 8-bit block-wise state (bnb.optim.LAMB8bit's signature; the trust ratio is applied)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        adam_w_mode=True,
        args=None,
        min_8bit_size=4096,
        max_unorm=1.0,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            bias_correction,
            betas,
            eps,
            weight_decay,
            amsgrad,
            adam_w_mode,
            8,
            args,
            min_8bit_size,
            max_unorm,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )


class LAMB32bit(_LAMB):
    """LAMB with float32 state (bnb.optim.LAMB32bit)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        adam_w_mode=True,
        args=None,
        min_8bit_size=4096,
        max_unorm=1.0,
        *,
        bf16_stochastic_round=False,
        capturable=False,
        robust_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            bias_correction,
            betas,
            eps,
            weight_decay,
            amsgrad,
            adam_w_mode,
            32,
            args,
            min_8bit_size,
            max_unorm,
            bf16_stochastic_round=bf16_stochastic_round,
            capturable=capturable,
            robust_rounding=robust_rounding,
        )
