"""The training loss: the sum of next-token cross-entropies in fp32, from full logits or a chunk of positions at a
time (the logits of a 128k vocabulary are the largest activation of a small model's step)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of a position nothing is learned at; torch.nn.functional.cross_entropy's default


def count_target_tokens(labels: torch.Tensor) -> int:
    """Number of positions the shifted loss averages over: (labels[:, 1:] != IGNORE_INDEX).sum() for labels
    (B, L) — the denominator for exact gradient accumulation over a window of micro-batches."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32) over the targets ``labels[:, 1:] != IGNORE_INDEX``.

    ``logits`` (B, T, V) predict position t+1 from position t; ``labels`` (B, T) are the unshifted token ids.
    """
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_loss_sum(output: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss_sum(output: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int
                           ) -> torch.Tensor:
    """``token_loss_sum(output(hidden), labels)`` without ever holding the logits of more than ``chunk`` positions.

    ``hidden`` (B, T, D) are the final normed hidden states (``Transformer.hidden_states``), ``output`` the vocabulary
    projection. Each chunk of ``chunk`` positions is projected, upcast and scored inside a non-reentrant
    ``torch.utils.checkpoint``, which saves only the chunk's hidden states: backward recomputes that chunk's
    logits (one more output projection per step) instead of keeping (B, T, V) logits, their fp32 copy and the
    softmax — with a 128k vocabulary, 250 MiB per 512 positions each. The per-token losses are the same; only the
    order in which the output weight's gradient is summed over positions changes (fp32 rounding).
    """
    if chunk < 1:
        raise ValueError(f"loss chunk must be >= 1 position, got {chunk}")
    # Position t predicts labels[t+1]; the last position of each row has no target.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    flat = hidden.flatten(0, 1)  # a view: hidden is contiguous
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, flat.shape[0], chunk):
        h, t = flat[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, output, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(output, h, t)
    return total
