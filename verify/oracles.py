"""The oracles: what each property is checked against, restated from its definition, sharing no code with
``llama_ref`` — an oracle that called the implementation would agree with any bug in it, and one that copied the
implementation's formula line for line would share any mistake in how that formula was written down.

Each oracle, the product function it restates, and what makes it independent:

- ``token_loss_sum`` restates ``llama_ref.loss.token_loss_sum``: a gather of ``log_softmax`` behind an explicit
  mask, in the logits' own dtype, not ``F.cross_entropy``'s fused kernel with ``ignore_index`` in fp32.
- ``mean_token_loss`` restates the Trainer's window loss (``Trainer.window_loss``: micro-batch loss sums over the
  window's target count): one sum over the whole window's logits divided by its target count, never split.
- ``total_grad_norm`` restates the norm ``torch.nn.utils.clip_grad_norm_`` returns (``Trainer.clip_gradients``):
  every gradient as one float64 vector, where torch takes per-tensor norms in their dtype and then a norm of norms.
- ``clip_coefficient`` restates ``clip_grad_norm_``'s multiplier. llama_ref has no formula of its own here (it calls
  torch); the oracle is torch's documented contract ``min(1, max_norm / (norm + 1e-6))`` in Python float
  arithmetic on the float64 norm, where torch computes it as a tensor in the gradients' dtype.
- ``lr_factor`` restates ``llama_ref.train.optim.make_scheduler`` (a ``LambdaLR`` over a hand-written formula):
  the factors are read off a throwaway optimizer driven by torch's own ``LinearLR`` / ``CosineAnnealingLR`` /
  ``ConstantLR``, composed by ``SequentialLR``; no formula of the schedule is written here.
- ``policy_layers`` restates ``llama_ref.model.checkpoint_policy_layers``: a regular-expression parser (ASCII
  ``[0-9]``, whole string) and block sets built by slicing ``range(n_layers)``, where the product parses with
  ``startswith`` / ``isascii`` / ``isdigit`` and selects blocks by ``i % K``.

``tests/verify/test_oracles.py`` compares each oracle with its product counterpart.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Optional, Sequence

import torch
from torch.optim import lr_scheduler

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


# Restates clip_grad_norm_'s multiplier (torch's documented contract; llama_ref calls torch and has no formula).
def clip_coefficient(norm: float, max_norm: float) -> float:
    """``min(1, max_norm / (norm + 1e-6))``: what clip_grad_norm_ multiplies every gradient by."""
    return min(1.0, max_norm / (norm + CLIP_EPS))


# Restates llama_ref.train.optim.make_scheduler's factor (independent: torch's own schedulers, driven).
def lr_factor(step: int, kind: str, total_steps: int, warmup: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): ``(step+1)/warmup`` during ``warmup`` steps,
    then ``constant``, or ``linear`` / ``cosine`` decay reaching 0 at ``total_steps``.

    The decay starts at full rate at step ``warmup`` (so with a warm-up the peak lasts two steps: ``warmup - 1``
    and ``warmup``) and takes ``max(1, total_steps - warmup)`` steps, then stays at 0: with ``total_steps <=
    warmup``, step ``warmup`` is at full rate and every later one at 0. ``warmup = 0``: no warm-up, step 0 at full
    rate. ``constant`` stays at 1 after the warm-up, however long the run."""
    if step < 0:
        raise ValueError(f"step must be >= 0 (0-based optimizer step), got {step}")
    factors = _lr_factors(kind, total_steps, warmup)
    # Past the sequence every kind is flat (see _lr_factors): hold its last factor.
    return factors[min(step, len(factors) - 1)]


@functools.lru_cache(maxsize=None)
def _lr_factors(kind: str, total_steps: int, warmup: int) -> tuple[float, ...]:
    """The factors of steps ``0 .. warmup + decay`` (``decay = max(1, total_steps - warmup)``), read from torch's
    schedulers stepping a throwaway SGD optimizer (lr 1.0, so its lr *is* the factor) over a dummy tensor.

    The composition, one ``SequentialLR`` phase each, the decay phase starting at milestone ``warmup``:

    - warm-up, steps ``0 .. warmup-1``: ``LinearLR(start_factor=1/warmup, end_factor=1, total_iters=warmup-1)``
      gives ``1/warmup + (1 - 1/warmup) * k/(warmup-1) = (k+1)/warmup`` at its epoch k: it reaches 1 at the
      *last* warm-up step (the natural-looking ``total_iters=warmup`` would reach it one step late, and be off
      by a fraction at every warm-up step). With ``warmup = 1`` the start factor is 1 and total_iters (kept >= 1:
      LinearLR divides by it) does not matter. No warm-up phase when ``warmup = 0``.
    - decay, from step ``warmup``, which SequentialLR hands the decay scheduler as its epoch 0, so the decay starts
      at full rate there (the warm-up's last step and the decay's first are both at 1):
      ``linear``: ``LinearLR(start_factor=1, end_factor=0, total_iters=decay)``, which holds 0 after total_iters;
      ``cosine``: ``CosineAnnealingLR(T_max=decay, eta_min=0)``; ``constant``: ``ConstantLR(factor=1)``.

    Steps past ``warmup + decay`` are not read: the schedule is flat there (linear holds 0, constant 1), except that
    torch's CosineAnnealingLR is periodic (it would climb back up after T_max), whereas the definition's cosine
    stays at 0 once it reached it; ``lr_factor`` therefore holds the last factor, at step ``warmup + decay``,
    where every kind has reached its final value.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown LR schedule {kind!r}; expected constant, linear or cosine")
    if warmup < 0 or total_steps < 0:
        raise ValueError(f"warmup ({warmup}) and total_steps ({total_steps}) must be >= 0")
    decay = max(1, total_steps - warmup)
    # A plain CPU tensor, no Parameter: works under inference_mode and any default device or dtype. SGD skips it
    # (no gradient), so optimizer.step() changes nothing; it is called so that the schedulers see the usual order.
    dummy = torch.zeros(1, device="cpu")
    optimizer = torch.optim.SGD([dummy], lr=1.0)
    with warnings.catch_warnings():
        # Older torch's SequentialLR passes an epoch to step() at a milestone (a deprecation UserWarning).
        warnings.simplefilter("ignore")
        phases: list[lr_scheduler.LRScheduler] = []
        if warmup > 0:
            phases.append(lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0,
                                                total_iters=max(1, warmup - 1)))
        if kind == "linear":
            phases.append(lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=decay))
        elif kind == "cosine":
            phases.append(lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay, eta_min=0.0))
        else:
            phases.append(lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0))
        scheduler = (phases[0] if len(phases) == 1
                     else lr_scheduler.SequentialLR(optimizer, phases, milestones=[warmup]))
        factors = [float(optimizer.param_groups[0]["lr"])]
        for _ in range(warmup + decay):
            optimizer.step()
            scheduler.step()
            factors.append(float(optimizer.param_groups[0]["lr"]))
    return tuple(factors)


# Restates llama_ref.model.checkpoint_policy_layers (independent: regex parser, block sets by slicing).
_EVERY = re.compile(r"every:([0-9]+)")  # [0-9]: ASCII digits only ("²".isdigit() is True); fullmatch: whole string


def policy_layers(policy: Optional[str], n_layers: int) -> frozenset[int]:
    """The blocks ``policy`` must recompute, written from the policies' definitions (the oracle; independent of
    ``llama_ref.model.checkpoint_policy_layers``): ``None``/``"none"`` no block, ``"all"`` every block, ``"seed"``
    block i when ``i % 3 != 0`` (the seed report's choice), ``"every:K"`` block i when ``i % K == 0`` (K ≥ 1)."""
    blocks = range(n_layers)
    if policy is None or policy == "none":
        return frozenset()
    if policy == "all":
        return frozenset(blocks)
    if policy == "seed":  # every block but the multiples of 3
        return frozenset(blocks) - frozenset(blocks[::3])
    match = _EVERY.fullmatch(policy) if isinstance(policy, str) else None
    if match is not None and int(match.group(1)) >= 1:
        return frozenset(blocks[::int(match.group(1))])
    raise ValueError(f"unknown gradient-checkpointing policy {policy!r}; expected none, all, seed or every:K (K >= 1)")
