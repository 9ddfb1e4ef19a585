"""Muon (momentum orthogonalised by Newton-Schulz; Jordan et al., 2024) with 8-bit block-wise or float32 momentum,
and an AdamW (8-bit or 32-bit) for the parameters Muon does not take, in one optimizer.

A Muon group's parameters (matrices; a parameter of more dimensions is taken as the matrix (shape[0], -1), as the
reference does for convolutions) step as torch.optim.Muon does:

    m = beta m + (1 - beta) g                      (the momentum: kestrel's 8-bit block-wise state, or float32)
    u = beta m + (1 - beta) g   (Nesterov)  or  u = m
    O = NS5(u)                                     (quintic Newton-Schulz: O ~ the orthogonal polar factor of u)
    p = p (1 - lr wd) - lr * ratio * O             (ratio: "original" sqrt(max(1, rows / cols)), or
                                                    "match_rms_adamw" 0.2 sqrt(max(rows, cols)), Moonlight's)

The momentum and u come from one fused kernel over the 8-bit state (the one-state step op with optimizer "muon",
the same CPU and CUDA kernels as SGD8bit / Lion8bit); NS5 runs as matmuls in bfloat16 on a GPU and in float32 on
the CPU (`ns_dtype` overrides). Groups with `use_muon=False` (embeddings, the LM head, norms, biases:
muon_param_groups splits a model that way) step as kestrel's AdamW8bit (AdamW32bit for Muon32bit), with their own
lr, betas, eps and weight_decay (the adamw_* arguments by default).

FSDP2 (DTensor parameters sharded on dim 0): each rank steps the momentum of its shard; the orthogonalisation needs
the whole matrix, so each matrix's update is gathered to one rank (the matrices spread over the ranks in turn),
orthogonalised there once and its shards scattered back. The result equals one process's bit for bit where the
shards start at multiples of 256 elements.
"""

import math

import torch
import torch.distributed as dist

from .._checks import is_int, is_number
from . import distributed as D
from .adam import _Adam
from .optimizer import check_betas, check_number

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the reference Muon's quintic
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def newton_schulz(update, steps=5, coefficients=DEFAULT_NS_COEFFICIENTS, eps=1e-7, dtype=None):
    """The quintic Newton-Schulz iteration of Muon: an approximation of the orthogonal polar factor U V^T of a matrix
    (U S V^T its SVD) that maps every singular value s > 0 to p^(steps)(s / ||update||_F), with p(x) = a x + b x^3 +
    c x^5 (the reference's coefficients make the values land in about [0.7, 1.2] instead of exactly 1).

    update: a 2-D tensor (or a batch of them, (..., rows, cols)). Computed in `dtype` (default: bfloat16 on a GPU,
    float32 on the CPU) on the wide orientation (rows <= cols) and returned in that dtype. The matrix is scaled by
    its largest magnitude before its Frobenius norm is taken, so that neither a huge update (whose squares would
    overflow) nor a tiny one (below eps) loses its normalisation; an all-zero update stays zero.
    """
    if not torch.is_tensor(update):
        raise TypeError(f"newton_schulz: update must be a tensor, got {type(update).__name__}")
    if update.dim() < 2:
        raise ValueError(
            f"newton_schulz: update must be a matrix (2 or more dimensions), got shape {tuple(update.shape)}"
        )
    if not is_int(steps) or steps < 0:
        raise ValueError(f"newton_schulz: steps must be an integer >= 0, got {steps!r}")
    a, b, c = (float(x) for x in coefficients)
    if dtype is None:
        dtype = torch.bfloat16 if update.is_cuda else torch.float32
    x = update.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = torch.nan_to_num(x)  # a copy (the caller's tensor is never changed), normalised in place
    x.div_(x.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(dtype).tiny))
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.mT
        if x.dim() == 2:
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
        else:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if transposed else x


def matrix_shape(shape):
    """The matrix Muon orthogonalises for a parameter of `shape`: (shape[0], product of the rest)."""
    return (shape[0], math.prod(shape[1:]))


def lr_ratio(shape, adjust_lr_fn):
    """The factor of lr for a parameter of `shape`: "original" (or None) sqrt(max(1, rows / cols)), the reference
    Muon's; "match_rms_adamw" 0.2 sqrt(max(rows, cols)) (Moonlight: the update's RMS matches AdamW's, so AdamW's lr and
    weight decay carry over)."""
    rows, cols = matrix_shape(shape)
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def muon_param_groups(model, exclude=("lm_head",), **adamw_settings):
    """A model's trainable parameters split the usual way: [{"params": matrices, "use_muon": True}, {"params": the
    rest, "use_muon": False, **adamw_settings}]. The rest are parameters of fewer than 2 dimensions (biases, norms,
    gains), the weights of embeddings (torch.nn.Embedding and its subclasses, kestrel's codebooks) and every
    parameter tied to one of them, and the parameters of modules whose name (the last component of its path, e.g.
    "lm_head") is in `exclude`. Each parameter appears once (tied ones in the AdamW group). Empty groups are left
    out."""
    from ..nn import CodebookLayer

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"muon_param_groups: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    tables = set()
    for module_name, module in model.named_modules():
        table = isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag, CodebookLayer))
        if table or module_name.rsplit(".", 1)[-1] in exclude:
            tables.update(id(p) for p in module.parameters())
    muon, adamw, seen = [], [], set()
    for _, p in model.named_parameters(remove_duplicate=True):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (adamw if p.dim() < 2 or id(p) in tables else muon).append(p)
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True})
    if adamw:
        groups.append({"params": adamw, "use_muon": False, **adamw_settings})
    return groups


class _Muon(_Adam):
    """Muon groups (8-bit or float32 momentum) and AdamW groups (kestrel's AdamW8bit / AdamW32bit) in one optimizer."""

    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=DEFAULT_NS_COEFFICIENTS,
        eps=1e-7,
        ns_steps=5,
        adjust_lr_fn=None,
        *,
        adamw_lr=None,
        adamw_betas=(0.9, 0.999),
        adamw_eps=1e-8,
        adamw_weight_decay=None,
        optim_bits=8,
        min_8bit_size=4096,
        ns_dtype=None,
        robust_rounding=False,
    ):
        name = type(self).__name__
        muon_settings = dict(
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
        )
        self._check_muon(dict(muon_settings, eps=eps), name)
        adamw = dict(
            lr=lr if adamw_lr is None else adamw_lr,
            betas=adamw_betas,
            eps=adamw_eps,
            weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
        )
        check_betas(name, adamw["betas"], 2, ("adamw_betas[0]", "adamw_betas[1]"))
        for key in ("lr", "eps", "weight_decay"):
            check_number(name, "adamw_" + key, adamw[key])
        self._adamw_defaults = dict(adamw, betas=tuple(float(b) for b in adamw["betas"]))
        muon_settings["ns_coefficients"] = tuple(float(x) for x in ns_coefficients)
        super().__init__(
            params,
            lr,
            self._adamw_defaults["betas"],
            eps,
            weight_decay,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            robust_rounding=robust_rounding,
            _ademamix=dict(muon_settings, use_muon=True),
        )

    # ----------------------------------------------------------------------------------------- groups and checks
    def add_param_group(self, param_group):
        """A group with use_muon=False takes the adamw_* settings for the lr, betas, eps and weight_decay it does not
        set; a Muon group's parameters must be matrices (2 or more dimensions)."""
        name = type(self).__name__
        if isinstance(param_group, dict):
            use_muon = param_group.get("use_muon", True)
            if not isinstance(use_muon, bool):
                raise TypeError(f"{name}: a parameter group's use_muon must be True or False, got {use_muon!r}")
            if not use_muon:
                param_group = {**self._adamw_defaults, **param_group}
            else:
                params = param_group.get("params")
                params = [params] if torch.is_tensor(params) else list(params or [])
                param_group = dict(param_group, params=params)
                index = len(getattr(self, "param_groups", []))
                for position, p in enumerate(params):
                    if torch.is_tensor(p) and p.dim() < 2:
                        raise ValueError(
                            f"{name}: parameter {position} of group {index} has shape {tuple(p.shape)}; Muon "
                            "orthogonalises matrices (2 or more dimensions): put vectors and scalars (biases, norms), "
                            "embeddings and the LM head in a group with use_muon=False "
                            "(kestrel.optim.muon_param_groups(model) splits a model that way)"
                        )
        super().add_param_group(param_group)

    @staticmethod
    def _check_muon(config, where):
        check_number(where, "momentum", config["momentum"], 0.0, 1.0)
        if not isinstance(config["nesterov"], bool):
            raise TypeError(f"{where}: nesterov must be True or False, got {config['nesterov']!r}")
        steps = config["ns_steps"]
        if not is_int(steps) or not 1 <= steps < 100:
            raise ValueError(f"{where}: ns_steps must be an integer in [1, 100), got {steps!r}")
        coefficients = config["ns_coefficients"]
        try:
            coefficients = tuple(coefficients)
        except TypeError:
            coefficients = None
        if (
            coefficients is None
            or len(coefficients) != 3
            or not all(is_number(x) and math.isfinite(float(x)) for x in coefficients)
        ):
            raise ValueError(
                f"{where}: ns_coefficients must be three finite numbers (a, b, c), got {config['ns_coefficients']!r}"
            )
        if config["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"{where}: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {config['adjust_lr_fn']!r}"
            )
        if config.get("ns_dtype") is not None and config["ns_dtype"] not in NS_DTYPES:
            raise ValueError(
                f"{where}: ns_dtype must be None (bfloat16 on a GPU, float32 on the CPU) or one of "
                f"{', '.join(str(d) for d in NS_DTYPES)}, got {config['ns_dtype']!r}"
            )
        check_number(where, "eps", config["eps"])

    def check_family(self, config, where):
        if config.get("use_muon", True):
            self._check_muon(config, where)
        else:
            check_betas(where, config["betas"], 2)

    def keeps_two_states(self, group):
        return not group.get("use_muon", True)

    # ----------------------------------------------------------------------------------------- state
    @torch.no_grad()
    def init_state(self, p, config):
        if not config.get("use_muon", True):
            return super().init_state(p, config)
        self.init_one_state(p, config)  # SGD8bit's layout: step, state1 (+ absmax1, qmap1 when 8-bit)

    # ----------------------------------------------------------------------------------------- stepping
    @torch.no_grad()
    def update_params(self, items):
        adamw = [(p, config) for p, config in items if not config.get("use_muon", True)]
        if adamw:
            super().update_params(adamw)
        owner = 0  # the rank that orthogonalises the next sharded matrix
        for p, config in items:
            if config.get("use_muon", True):
                owner = self._muon_step(p, config, owner)

    def momentum_update(self, p, config):
        """The new momentum (in the state, in place) and this step's update u of parameter p's local shard, in the
        parameter's dtype, from one fused kernel (an element with a NaN/Inf gradient is skipped: u = 0 there and its
        8-bit momentum becomes 0, a float32 momentum is kept)."""
        state = self.state[p]
        grad = D.local(p.grad)
        grad = grad if grad.is_contiguous() else grad.contiguous()
        update = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        beta = float(config["momentum"])
        weight = beta if config["nesterov"] else 1.0  # u = weight * m + (1 - weight) * g
        steps = state["step"].reshape(1) + 1
        scalars = dict(lr=0.0, beta1=weight, beta2=beta, eps=0.0, weight_decay=0.0, gnorm_scale=1.0)
        robust = bool(config.get("robust_rounding", False))
        if state["state1"].dtype == torch.uint8:
            self.prefetch(p, [state["state1"]])
            torch.ops.kestrel.one_state8bit_step_(
                "muon",
                [update],
                [grad],
                [state["state1"]],
                [state["absmax1"]],
                state["qmap1"],
                steps,
                **scalars,
                robust_rounding=robust,
            )
        else:
            torch.ops.kestrel.one_state32bit_step_(
                "muon", [update], [grad], [state["state1"]], steps, **scalars, robust_rounding=robust
            )
        return update

    def orthogonalize(self, update, shape, config):
        """NS5 of the matrix view of a full update, in the update's dtype."""
        matrix = update.reshape(matrix_shape(shape))
        ortho = newton_schulz(
            matrix, config["ns_steps"], config["ns_coefficients"], float(config["eps"]), config.get("ns_dtype")
        )
        return ortho.to(update.dtype).reshape(update.shape)

    def _orthogonalize_sharded(self, update, p, config, info, owner):
        """Gather the shards of a sharded matrix's update to rank `owner` of its mesh, orthogonalise it there, scatter
        the result's shards back."""
        sizes = [end - start for start, end in info.ranges]
        width = max(sizes)
        padded = torch.zeros(width, dtype=update.dtype, device=update.device)
        padded[: update.numel()] = update.reshape(-1)
        root = dist.get_global_rank(info.group, owner)
        mine = info.rank == owner
        gathered = [torch.empty_like(padded) for _ in range(info.world)] if mine else None
        dist.gather(padded, gathered, dst=root, group=info.group)
        pieces = None
        if mine:
            full = torch.cat([gathered[r][: sizes[r]] for r in range(info.world)])
            ortho = self.orthogonalize(full, info.shape, config).reshape(-1)
            pieces = []
            for start, end in info.ranges:
                piece = torch.zeros(width, dtype=update.dtype, device=update.device)
                piece[: end - start] = ortho[start:end]
                pieces.append(piece)
        out = torch.empty_like(padded)
        dist.scatter(out, pieces, src=root, group=info.group)
        return out[: update.numel()].reshape(update.shape)

    def _muon_step(self, p, config, owner):
        update = self.momentum_update(p, config)
        info = self.shard(p)
        if info is None:
            ortho = self.orthogonalize(update, tuple(p.shape), config)
        else:
            ortho = self._orthogonalize_sharded(update, p, config, info, owner)
            owner = (owner + 1) % info.world
        loc = D.local(p)
        lr, lr_tensor = self.lr_of(config)
        ratio = lr_ratio(tuple(p.shape), config["adjust_lr_fn"])
        wd = float(config["weight_decay"])
        if lr_tensor is None:
            if wd != 0.0:
                loc.mul_(1.0 - lr * wd)
            loc.add_(ortho, alpha=-lr * ratio)
        else:  # a tensor lr (a scheduler under torch.compile): the same two steps with device scalars
            lr_value = lr_tensor.to(device=loc.device, dtype=torch.float32).reshape(())
            if wd != 0.0:
                loc.mul_(1.0 - lr_value * wd)
            loc.sub_(ortho * (lr_value * ratio))
        self.state[p]["step"] += 1
        return owner


_DOC = """
    Arguments (torch.optim.Muon's, same defaults): params, lr=1e-3, weight_decay=0.1 (decoupled: p *= 1 - lr * wd),
    momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7 (the Newton-Schulz
    normalisation's floor), ns_steps=5, adjust_lr_fn=None ("original": lr * sqrt(max(1, rows / cols)); or
    "match_rms_adamw": lr * 0.2 * sqrt(max(rows, cols))). Keywords: adamw_lr (default lr), adamw_betas=(0.9, 0.999),
    adamw_eps=1e-8, adamw_weight_decay (default weight_decay) for groups with use_muon=False;
    min_8bit_size=4096 (smaller tensors keep float32 state); ns_dtype=None (bfloat16 on a GPU, float32 on the CPU);
    robust_rounding=False (8-bit states: quantization never enlarges an update).

    Every group may set use_muon (default True) and its own lr, weight_decay and, for Muon groups, momentum,
    nesterov, ns_steps, ns_coefficients, adjust_lr_fn, ns_dtype; for AdamW groups, betas and eps.
    kestrel.optim.muon_param_groups(model) splits a model's parameters the usual way.
"""


class Muon(_Muon):
    __doc__ = "Muon with 8-bit (optim_bits=8, the default) or float32 momentum, and AdamW groups." + _DOC.replace(
        "Keywords: ", "Keywords: optim_bits=8, "
    )


def _fixed(bits):
    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=DEFAULT_NS_COEFFICIENTS,
        eps=1e-7,
        ns_steps=5,
        adjust_lr_fn=None,
        *,
        adamw_lr=None,
        adamw_betas=(0.9, 0.999),
        adamw_eps=1e-8,
        adamw_weight_decay=None,
        min_8bit_size=4096,
        ns_dtype=None,
        robust_rounding=False,
    ):
        _Muon.__init__(
            self,
            params,
            lr,
            weight_decay,
            momentum,
            nesterov,
            ns_coefficients,
            eps,
            ns_steps,
            adjust_lr_fn,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            optim_bits=bits,
            min_8bit_size=min_8bit_size,
            ns_dtype=ns_dtype,
            robust_rounding=robust_rounding,
        )

    return __init__


class Muon8bit(_Muon):
    __doc__ = (
        "Muon with 8-bit block-wise momentum (kestrel's signed dynamic map, blocks of 256), and AdamW8bit groups "
        "for the parameters that are not Muon's." + _DOC
    )
    __init__ = _fixed(8)


class Muon32bit(_Muon):
    __doc__ = "Muon with float32 momentum, and AdamW32bit groups." + _DOC
    __init__ = _fixed(32)
