"""Plain-PyTorch model of the fused optimizer steps with 8-bit block-wise or 32-bit states (docs/optim8bit.md): the
two-state steps (Adam/AdamW and LAMB: adam8bit_step, adam32bit_step; AdEMAMix: ademamix_step), the one-state steps
(SGD with momentum and LARS, RMSprop, Adagrad, Lion, Muon's momentum: one_state_step), the trust-ratio norms and ratio
(norm_sums, trust_ratio), float32 operations in the kernels' order: the test oracle for the CPU and CUDA kernels;
muon_step, a whole Muon step (momentum as the kernels compute it, then Newton-Schulz and the parameter's update);
adam4bit_step, Adam with 4-bit states."""

import ctypes
import ctypes.util

import numpy as np
import torch

from .quantize import nearest_code

BLOCKSIZE = 256


def _libm_powf():
    # The kernels call the C library's powf; numpy's float32 power rounds differently in the last place.
    path = ctypes.util.find_library("m")
    if path is None:
        return lambda x, y: np.power(np.float32(x), np.float32(y))
    powf = ctypes.CDLL(path).powf
    powf.restype, powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    return lambda x, y: np.float32(powf(x, y))


_powf = _libm_powf()


def adam_scalars(step, lr, beta1, beta2, eps, weight_decay):
    """The per-step float32 scalars, computed in float32 as the kernels compute them."""
    f = np.float32
    correction1 = f(1.0) - _powf(f(beta1), f(step))
    correction2 = np.sqrt(f(1.0) - _powf(f(beta2), f(step)))
    return dict(
        beta1=float(f(beta1)),
        beta2=float(f(beta2)),
        one_minus_beta1=float(f(1.0) - f(beta1)),
        one_minus_beta2=float(f(1.0) - f(beta2)),
        step_size=float((-f(lr) * correction2) / correction1),
        eps_c2=float(correction2 * f(eps)),
        decay=float(f(1.0) - f(lr) * f(weight_decay)),
        apply_decay=weight_decay > 0,
        correction1=float(correction1),
        correction2=float(correction2),
        lr=float(f(lr)),
    )


def norm_sums(u, p):
    """(sum u^2, sum p^2) of flat float32 tensors in the kernels' fixed order (kestrel/optim.h, "trust ratio"):
    per 256-block, lane l sums elements l, l+32, ... in float32, the lanes combine as a butterfly; the block sums
    are added in double by 256 strided threads and a halving tree."""
    out = []
    n = u.numel()
    blocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    for x in (u.float(), p.float()):
        padded = torch.zeros(blocks * BLOCKSIZE, dtype=torch.float32)
        padded[:n] = x.cpu()
        lanes_in = padded.view(blocks, BLOCKSIZE // 32, 32)
        lanes = torch.zeros(blocks, 32, dtype=torch.float32)
        for k in range(BLOCKSIZE // 32):
            lanes = lanes + lanes_in[:, k, :] * lanes_in[:, k, :]
        offset = 16
        while offset > 0:
            lanes[:, :offset] = lanes[:, :offset] + lanes[:, offset : 2 * offset]
            offset //= 2
        block_sums = lanes[:, 0].double()
        rows = (blocks + 255) // 256
        strided = torch.zeros(rows * 256, dtype=torch.float64)
        strided[:blocks] = block_sums
        acc = torch.zeros(256, dtype=torch.float64)
        for r in range(rows):
            acc = acc + strided[r * 256 : (r + 1) * 256]
        stride = 128
        while stride > 0:
            acc[:stride] = acc[:stride] + acc[stride : 2 * stride]
            stride //= 2
        out.append(np.float32(acc[0].item()))
    return out


def trust_ratio(sums, max_unorm, a, adam):
    """The float32 scale of the update from norm_sums (kestrel/optim.h apply_trust_ratio)."""
    f = np.float32
    unorm = f(np.sqrt(f(sums[0])))
    if adam:
        unorm = f(unorm * f(f(a["correction2"]) / f(a["correction1"])))
    limit = f(f(max_unorm) * f(np.sqrt(f(sums[1]))))
    return f(limit / unorm) if (limit > 0 and unorm > limit) else f(1.0)


def _apply_lamb(a, s1, s2, finite, p, max_unorm):
    if max_unorm > 0:
        u = torch.where(finite, s1 / (_sqrt(s2) + a["eps_c2"]), torch.zeros_like(s1))
        scale = trust_ratio(norm_sums(u, p.reshape(-1).float()), max_unorm, a, adam=True)
        a["step_size"] = float(np.float32(np.float32(a["step_size"]) * scale))


def _per_element(block_values, n):
    return block_values.repeat_interleave(BLOCKSIZE)[:n]


def _sqrt(x):
    # Correctly rounded float32 square root (torch's vectorised float32 sqrt on CPU is not, in the last place).
    return x.double().sqrt().float()


def _update_param(p, s1, s2, finite, a):
    new_p = (p.float() + (s1 / (_sqrt(s2) + a["eps_c2"])) * a["step_size"]).to(p.dtype)
    if a["apply_decay"]:
        new_p = (new_p.float() * a["decay"]).to(p.dtype)
    return torch.where(finite, new_p, p)


def _block_absmax(s, n):
    blocks = torch.zeros(((n + BLOCKSIZE - 1) // BLOCKSIZE) * BLOCKSIZE, dtype=torch.float32, device=s.device)
    blocks[:n] = s
    return blocks.view(-1, BLOCKSIZE).abs().amax(dim=1)


def _requantize(s, absmax, qmap, signed, robust=False, denominator=None):
    """Codes of a state: nearest rounding, then bnb's sign fix on signed-map states, or (robust rounding,
    kestrel/optim.h round_numerator_code) no sign fix for numerators and, for denominators (second moments,
    RMSprop/Adagrad accumulators; by default the unsigned-map states), a positive value never on a code <= 0."""
    denominator = (not signed) if denominator is None else denominator
    n = s.numel()
    scale = _per_element(absmax, n)
    v = torch.where(scale > 0, s / scale, torch.zeros_like(s))
    idx = nearest_code(v, qmap)
    if robust:
        if denominator:
            idx = torch.where((v > 0) & (qmap[idx] <= 0), (idx + 1).clamp(max=255), idx)
    elif signed:  # bnb's sign fix
        differs = torch.signbit(qmap[idx]) != torch.signbit(v)
        step = torch.where(v > 0, torch.ones_like(idx), -torch.ones_like(idx))
        idx = torch.where(differs, (idx + step).clamp(0, 255), idx)
    return idx.to(torch.uint8)


def _stepped(grad, *moments):
    """kestrel/optim.h step_is_finite: the gradient and the new moments are finite (a square that overflows float32
    skips the element like a NaN/Inf gradient)."""
    ok = torch.isfinite(grad)
    for m in moments:
        ok = ok & torch.isfinite(m)
    return ok


@torch.no_grad()
def adam8bit_step(
    p,
    g,
    state1,
    state2,
    absmax1,
    absmax2,
    qmap1,
    qmap2,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    gnorm_scale=1.0,
    max_unorm=0.0,
    robust_rounding=False,
):
    """One step on flat tensors, in place (LAMB with max_unorm > 0)."""
    a = adam_scalars(step, lr, beta1, beta2, eps, weight_decay)
    n = p.numel()
    grad = g.reshape(-1).float() * float(np.float32(gnorm_scale))
    s1 = qmap1[state1.reshape(-1).long()] * _per_element(absmax1, n)
    s2 = qmap2[state2.reshape(-1).long()] * _per_element(absmax2, n)
    s1 = s1 * a["beta1"] + grad * a["one_minus_beta1"]
    s2 = s2 * a["beta2"] + (grad * grad) * a["one_minus_beta2"]
    finite = _stepped(grad, s1, s2)
    s1 = torch.where(finite, s1, torch.zeros_like(s1))
    s2 = torch.where(finite, s2, torch.zeros_like(s2))
    new_max1, new_max2 = _block_absmax(s1, n), _block_absmax(s2, n)
    _apply_lamb(a, s1, s2, finite, p, max_unorm)
    p.view(-1).copy_(_update_param(p.reshape(-1), s1, s2, finite, a))
    state1.view(-1).copy_(_requantize(s1, new_max1, qmap1, signed=True, robust=robust_rounding))
    state2.view(-1).copy_(_requantize(s2, new_max2, qmap2, signed=False, robust=robust_rounding))
    absmax1.copy_(new_max1)
    absmax2.copy_(new_max2)


@torch.no_grad()
def adam32bit_step(p, g, state1, state2, step, lr, beta1, beta2, eps, weight_decay, gnorm_scale=1.0, max_unorm=0.0):
    """One step with float32 states, in place; a NaN/Inf gradient element is skipped (bnb's 32-bit kernel). LAMB
    with max_unorm > 0."""
    a = adam_scalars(step, lr, beta1, beta2, eps, weight_decay)
    grad = g.reshape(-1).float() * float(np.float32(gnorm_scale))
    s1, s2 = state1.view(-1), state2.view(-1)
    new_s1 = s1 * a["beta1"] + grad * a["one_minus_beta1"]
    new_s2 = s2 * a["beta2"] + (grad * grad) * a["one_minus_beta2"]
    finite = _stepped(grad, new_s1, new_s2)
    _apply_lamb(a, new_s1, new_s2, finite, p, max_unorm)
    p.view(-1).copy_(_update_param(p.reshape(-1), new_s1, new_s2, finite, a))
    s1.copy_(torch.where(finite, new_s1, s1))
    s2.copy_(torch.where(finite, new_s2, s2))


def _one_state_update(kind, a, grad, p32, s, lr, eps, weight_decay, step):
    """(new state, new parameter before rounding) in the kernels' float32 order."""
    f = lambda v: float(np.float32(v))  # noqa: E731
    if kind == "muon":  # Muon's momentum; the "parameter" is the update beta1 * m + (1 - beta1) * g
        s = s * a["beta2"] + grad * a["one_minus_beta2"]
        return s, s * a["beta1"] + grad * a["one_minus_beta1"]
    if kind == "lion":
        decayed = p32 * a["decay"] if a["apply_decay"] else p32
        new_p = decayed - torch.sign(s * a["beta1"] + grad * a["one_minus_beta1"]) * f(lr)
        return s * a["beta2"] + grad * a["one_minus_beta2"], new_p
    if weight_decay > 0:
        grad = grad + p32 * f(weight_decay)
    if kind == "momentum":
        s = grad.clone() if step == 1 else s * a["beta1"] + grad
        return s, p32 - s * f(lr)
    s = s * a["beta1"] + (grad * grad) * a["one_minus_beta1"] if kind == "rmsprop" else s + grad * grad
    return s, p32 - (grad / (_sqrt(s) + f(eps))) * f(lr)


@torch.no_grad()
def one_state_step(
    kind,
    p,
    g,
    state1,
    absmax1,
    qmap1,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    gnorm_scale=1.0,
    max_unorm=0.0,
    robust_rounding=False,
):
    """One step of SGD-momentum / RMSprop / Adagrad / Lion on flat tensors, in place; 8-bit when qmap1 is given
    (signed map, sign fix), else float32 state. A NaN/Inf gradient keeps the parameter; its 8-bit state becomes 0
    and a float32 state is kept. LARS: kind "momentum" with max_unorm > 0."""
    a = adam_scalars(step, lr, beta1, beta2, eps, weight_decay)
    n = p.numel()
    grad = g.reshape(-1).float() * float(np.float32(gnorm_scale))
    old = qmap1[state1.reshape(-1).long()] * _per_element(absmax1, n) if qmap1 is not None else state1.reshape(-1)
    s, new_p = _one_state_update(kind, a, grad, p.reshape(-1).float(), old.clone(), lr, eps, weight_decay, step)
    finite = _stepped(grad, s)
    if kind == "momentum" and max_unorm > 0:  # LARS
        u = torch.where(finite, s, torch.zeros_like(s))
        scale = trust_ratio(norm_sums(u, p.reshape(-1).float()), max_unorm, a, adam=False)
        new_p = p.reshape(-1).float() - s * float(np.float32(np.float32(a["lr"]) * scale))
    s = torch.where(finite, s, torch.zeros_like(s) if qmap1 is not None else old)
    p.view(-1).copy_(torch.where(finite, new_p.to(p.dtype), p.reshape(-1)))
    if qmap1 is None:
        state1.view(-1).copy_(s)
        return
    new_max = _block_absmax(s, n)
    state1.view(-1).copy_(
        _requantize(s, new_max, qmap1, signed=True, robust=robust_rounding, denominator=kind in ("rmsprop", "adagrad"))
    )
    absmax1.copy_(new_max)


@torch.no_grad()
def ademamix_step(
    p,
    g,
    state1,
    state2,
    absmax1,
    absmax2,
    qmap1,
    qmap2,
    step,
    lr,
    beta1,
    beta2,
    beta3,
    alpha,
    eps,
    weight_decay,
    gnorm_scale=1.0,
    robust_rounding=False,
):
    """One AdEMAMix step in place: state1 (2, n) holds m1 and m2, state2 nu; 8-bit when qmap1 is given (absmax1
    (2, blocks)), else float32 states (a NaN/Inf gradient element is then skipped)."""
    f = lambda v: float(np.float32(v))  # noqa: E731
    a = adam_scalars(step, lr, beta1, beta2, eps, weight_decay)
    correction1 = f(np.float32(1.0) - _powf(np.float32(beta1), np.float32(step)))
    correction2 = f(np.sqrt(np.float32(1.0) - _powf(np.float32(beta2), np.float32(step))))
    n = p.numel()
    grad = g.reshape(-1).float() * f(gnorm_scale)
    eight_bit = qmap1 is not None
    s1, s2 = state1.view(2, -1), state2.view(-1)
    if eight_bit:
        old1 = qmap1[s1[0].long()] * _per_element(absmax1[0], n)
        old3 = qmap1[s1[1].long()] * _per_element(absmax1[1], n)
        old2 = qmap2[s2.long()] * _per_element(absmax2, n)
    else:
        old1, old3, old2 = s1[0].clone(), s1[1].clone(), s2.clone()
    m1 = old1 * a["beta1"] + grad * a["one_minus_beta1"]
    m3 = old3 * f(beta3) + grad * f(np.float32(1.0) - np.float32(beta3))
    nu = old2 * a["beta2"] + (grad * grad) * a["one_minus_beta2"]
    finite = _stepped(grad, m1, m3, nu)
    if eight_bit:
        m1, m3, nu = (torch.where(finite, t, torch.zeros_like(t)) for t in (m1, m3, nu))
    else:
        m1, m3, nu = (torch.where(finite, t, old) for t, old in ((m1, old1), (m3, old3), (nu, old2)))
    update = (m1 / correction1 + m3 * f(alpha)) / (_sqrt(nu) / correction2 + f(eps))
    new_p = (p.reshape(-1).float() - update * f(lr)).to(p.dtype)
    if a["apply_decay"]:
        new_p = (new_p.float() * a["decay"]).to(p.dtype)
    p.view(-1).copy_(torch.where(finite, new_p, p.reshape(-1)))
    if not eight_bit:
        s1[0].copy_(m1), s1[1].copy_(m3), s2.copy_(nu)
        return
    max1, max3, max2 = _block_absmax(m1, n), _block_absmax(m3, n), _block_absmax(nu, n)
    s1[0].copy_(_requantize(m1, max1, qmap1, signed=True, robust=robust_rounding))
    s1[1].copy_(_requantize(m3, max3, qmap1, signed=True, robust=robust_rounding))
    s2.copy_(_requantize(nu, max2, qmap2, signed=False, robust=robust_rounding))
    absmax1[0].copy_(max1), absmax1[1].copy_(max3), absmax2.copy_(max2)


@torch.no_grad()
def muon_step(
    p,
    g,
    state1,
    absmax1,
    qmap1,
    step,
    lr,
    momentum,
    nesterov,
    weight_decay,
    adjust_lr_fn=None,
    ns_steps=5,
    ns_coefficients=(3.4445, -4.7750, 2.0315),
    eps=1e-7,
    ns_dtype=torch.float32,
    robust_rounding=False,
):
    """One Muon step of matrix parameter p, in place: the momentum and the update as the kernels compute them (8-bit
    when qmap1 is given, else a float32 state1), kestrel.optim.newton_schulz of the update's matrix view, then
    p *= 1 - lr * weight_decay; p -= lr * ratio * O, ratio sqrt(max(1, rows / cols)) ("original") or
    0.2 sqrt(max(rows, cols)) ("match_rms_adamw"), as torch.optim.Muon."""
    from ..optim.muon import newton_schulz

    update = torch.zeros_like(p)
    weight = momentum if nesterov else 1.0
    with np.errstate(all="ignore"):  # Adam's bias corrections (unused) divide by 0 when weight is 1
        one_state_step(
            "muon",
            update,
            g,
            state1,
            absmax1,
            qmap1,
            step,
            0.0,
            weight,
            momentum,
            0.0,
            0.0,
            robust_rounding=robust_rounding,
        )
    rows = p.shape[0]
    cols = p.numel() // rows
    ortho = newton_schulz(update.reshape(rows, cols), ns_steps, ns_coefficients, eps, ns_dtype).to(p.dtype)
    ratio = 0.2 * max(rows, cols) ** 0.5 if adjust_lr_fn == "match_rms_adamw" else max(1.0, rows / cols) ** 0.5
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(ortho.reshape(p.shape), alpha=-lr * ratio)


@torch.no_grad()
def adam4bit_step(
    p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1, beta2, eps, weight_decay, gnorm_scale=1.0
):
    """One Adam step with 4-bit states (kestrel/optim.h "4-bit states") on flat tensors, in place: codes two per
    byte (element 2j in the high nibble), absmax per 128 elements, 16-entry maps, nearest rounding; the arithmetic and
    the NaN/Inf rule of adam8bit_step."""
    a = adam_scalars(step, lr, beta1, beta2, eps, weight_decay)
    n = p.numel()
    block = 128

    def unpack(packed):
        return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:n].long()

    def per_element(values):
        return values.repeat_interleave(block)[:n]

    def absmax(s):
        padded = torch.zeros(((n + block - 1) // block) * block, dtype=torch.float32)
        padded[:n] = s
        return padded.view(-1, block).abs().amax(dim=1)

    def requantize(s, new_max, qmap):
        scale = per_element(new_max)
        v = torch.where(scale > 0, s / scale, torch.zeros_like(s))
        codes = nearest_code(v, qmap).to(torch.uint8)
        if n % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        return (codes[0::2] << 4) | codes[1::2]

    grad = g.reshape(-1).float() * float(np.float32(gnorm_scale))
    s1 = qmap1[unpack(state1.reshape(-1))] * per_element(absmax1)
    s2 = qmap2[unpack(state2.reshape(-1))] * per_element(absmax2)
    s1 = s1 * a["beta1"] + grad * a["one_minus_beta1"]
    s2 = s2 * a["beta2"] + (grad * grad) * a["one_minus_beta2"]
    finite = _stepped(grad, s1, s2)
    s1 = torch.where(finite, s1, torch.zeros_like(s1))
    s2 = torch.where(finite, s2, torch.zeros_like(s2))
    new_max1, new_max2 = absmax(s1), absmax(s2)
    p.view(-1).copy_(_update_param(p.reshape(-1), s1, s2, finite, a))
    state1.view(-1).copy_(requantize(s1, new_max1, qmap1))
    state2.view(-1).copy_(requantize(s2, new_max2, qmap2))
    absmax1.copy_(new_max1)
    absmax2.copy_(new_max2)
