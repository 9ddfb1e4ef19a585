"""Training helpers for KestrelLM: next-token loss, the draft heads' loss with the base frozen, the optimizers'
state size. The 8-bit optimizers (kestrel.optim.AdamW8bit) are the default.
"""

import torch
import torch.nn.functional as F

from ..optim import AdamW8bit


def lm_loss(model, tokens):
    """Mean next-token cross entropy of tokens (B, L + 1): the model reads [:, :-1] and predicts [:, 1:]."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def draft_loss(model, tokens, decay=0.8):
    """The draft heads' loss on tokens (B, L + 1) with the base model's hidden states computed without gradients:
    head k at position t predicts tokens[t + k + 2]; the heads' mean cross entropies weighted decay**k (Medusa).
    Returns (weighted loss, per-head losses as floats)."""
    num_heads = model.config.num_draft_heads
    if num_heads == 0:
        raise ValueError("draft_loss: the model has no draft heads (config.num_draft_heads == 0)")
    L = tokens.shape[1] - 1
    if L < num_heads + 1:
        raise ValueError(f"draft_loss: tokens need more than {num_heads + 1} positions, got {L + 1}")
    with torch.no_grad():
        _, hidden = model(tokens[:, :-1], return_hidden=True)
    total, per_head = 0.0, []
    for k, head in enumerate(model.draft_heads):
        shift = k + 2
        logits = model.lm_head(head(hidden[:, : L + 1 - shift]))
        target = tokens[:, shift : L + 1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        total = total + decay**k * loss
        per_head.append(loss.item())
    weight = sum(decay**k for k in range(num_heads))
    return total / weight, per_head


def freeze_base(model):
    """Turn off gradients of everything but the draft heads; returns the draft heads' parameters."""
    heads = set(id(p) for p in model.draft_heads.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in heads)
    return list(model.draft_heads.parameters())


def default_optimizer(params, lr=1e-3, weight_decay=0.0, **kwargs):
    """kestrel.optim.AdamW8bit, the default optimizer of the training helpers."""

    return AdamW8bit(params, lr=lr, weight_decay=weight_decay, **kwargs)


def train_steps(model, optimizer, batches, loss_fn=lm_loss, *, schedule=None, max_grad_norm=1.0, on_step=None):
    """Run one optimizer step per batch of `batches` (token tensors (B, L + 1), moved to the model's device).

    loss_fn(model, tokens) returns the loss (lm_loss; for the draft heads, after freeze_base, a function returning
    draft_loss(...)[0]); schedule(step) gives the learning rate of each step (None: leave it); gradients are clipped
    to max_grad_norm (None: no clipping); on_step(step, loss) is called after each step. Returns the losses."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    for step, tokens in enumerate(batches):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
        loss = loss_fn(model, tokens.to(model.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def optimizer_state_bytes(optimizer):
    """Bytes of the optimizer's state tensors (each storage counted once, so shared quantisation maps count once)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.device, value.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


__all__ = ["default_optimizer", "draft_loss", "freeze_base", "lm_loss", "optimizer_state_bytes", "train_steps"]
