"""The oracles: what each property is checked against, restated from its definition, sharing no code with
``llama_ref`` — an oracle that called the implementation would agree with any bug in it.

Each function restates one thing the implementation also computes (named at the function); the pair is deliberate
and stays independent.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# The label of a position nothing is learned at: cross_entropy's default ignore_index, restated (not imported) so the
# oracle cannot share a wrong value with llama_ref.loss.IGNORE_INDEX.
IGNORE_INDEX = -100


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), clamped to 1


# Restates llama_ref.loss.token_loss_sum (independent: gather of log-softmax, not cross_entropy).
def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over targets ``labels[:, 1:] != IGNORE_INDEX`` of ``-log softmax(logits[:, :-1])[target]``, in the logits'
    own dtype. ``logits`` (B, T, V), ``labels`` (B, T) unshifted: position t predicts t + 1."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return -torch.where(keep, picked, torch.zeros_like(picked)).sum()


# Restates the Trainer's window loss (the token mean over the window, however it is split).
def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over every target ``labels[:, 1:] != IGNORE_INDEX`` of ``-log softmax(logits[:, :-1])[target]``, in
    fp32 (fp64 for fp64 logits). ``logits`` (B, T, V), ``labels`` (B, T) unshifted: position t predicts t + 1."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return token_loss_sum(logits, labels) / (labels[:, 1:] != IGNORE_INDEX).sum()


# Restates torch.nn.utils.clip_grad_norm_'s total norm (independent: float64, one vector).
def total_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """2-norm of all gradients viewed as one vector (in float64)."""
    return math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))


# Restates clip_grad_norm_'s multiplier.
def clip_coefficient(norm: float, max_norm: float) -> float:
    """``min(1, max_norm / (norm + 1e-6))``: what clip_grad_norm_ multiplies every gradient by."""
    return min(1.0, max_norm / (norm + CLIP_EPS))


# Restates llama_ref.train.optim.make_scheduler's factor.
def lr_factor(step: int, kind: str, total_steps: int, warmup: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): ``(step+1)/warmup`` during ``warmup`` steps,
    then ``constant``, or ``linear`` / ``cosine`` decay reaching 0 at ``total_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


# Restates llama_ref.model.checkpoint_policy_layers.
def policy_layers(policy: Optional[str], n_layers: int) -> frozenset[int]:
    """The blocks ``policy`` must recompute, written from the policies' definitions (the oracle; independent of
    ``llama_ref.model.checkpoint_policy_layers``): ``None``/``"none"`` no block, ``"all"`` every block, ``"seed"``
    block i when ``i % 3 != 0`` (the seed report's choice), ``"every:K"`` block i when ``i % K == 0`` (K ≥ 1)."""
    if policy is None or policy == "none":
        return frozenset()
    if policy == "all":
        return frozenset(range(n_layers))
    if policy == "seed":
        return frozenset(i for i in range(n_layers) if i % 3 != 0)
    kind, _, k = policy.partition(":")
    if kind == "every" and k.isascii() and k.isdigit() and int(k) >= 1:  # ASCII: "²".isdigit() is True
        return frozenset(range(0, n_layers, int(k)))
    raise ValueError(f"unknown gradient-checkpointing policy {policy!r}; expected none, all, seed or every:K (K >= 1)")
