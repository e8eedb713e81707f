"""The training loss: the sum of next-token cross-entropies in fp32, from full logits, a chunk of positions at a
time (``--loss-chunk``), or fused with the output projection (``--fused-loss``, :func:`linear_cross_entropy`): the
logits of a 128k vocabulary are the largest activation of a small model's step."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of a position nothing is learned at; torch.nn.functional.cross_entropy's default

# A loss kernel: fn(hidden (N, D), weight (V, D), labels (N,), *, reduction="sum") -> the loss — the labels already
# shifted (row i predicts labels[i]), IGNORE_INDEX where nothing is learned (``Transformer.forward(loss_kernel=)``).
LossKernel = Callable[..., torch.Tensor]
REDUCTIONS = ("mean", "sum", "none")  # torch.nn.functional.cross_entropy's
DEFAULT_LOSS_CHUNK = 512  # rows per chunk: 512 × 128,256 fp32 logits are 250 MiB at a time


def count_target_tokens(labels: torch.Tensor) -> int:
    """Number of positions the shifted loss averages over: (labels[:, 1:] != IGNORE_INDEX).sum() for labels
    (B, L) — the denominator for exact gradient accumulation over a window of micro-batches."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32; float64 for float64 logits) over the targets
    ``labels[:, 1:] != IGNORE_INDEX``.

    ``logits`` (B, T, V) predict position t+1 from position t; ``labels`` (B, T) are the unshifted token ids.
    """
    shifted = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(shifted if shifted.dtype == torch.float64 else shifted.float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  ignore_index: int) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets,
                           ignore_index=ignore_index, reduction="none")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, reduction: str = "mean",
                          ignore_index: int = IGNORE_INDEX, chunk_size: int = DEFAULT_LOSS_CHUNK,
                          num_items_in_batch: Optional[int] = None) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias), labels)`` (fp32) without ever holding the logits of more than
    ``chunk_size`` rows (``--loss-chunk``; arguments as :func:`linear_cross_entropy`'s).

    Each chunk of rows is projected, upcast and scored inside a non-reentrant ``torch.utils.checkpoint``, which
    saves only the chunk's hidden states: backward recomputes that chunk's logits (one more output projection per
    step) instead of keeping (N, V) logits, their fp32 copy and the softmax — with a 128k vocabulary, 250 MiB per
    512 positions each. The per-token losses are the same; only the order in which the output weight's gradient is
    summed over positions changes (fp32 rounding).
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"loss chunk must be >= 1 position, got {chunk_size}")
    _validate(hidden, weight, labels, reduction, num_items_in_batch)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_losses, h, weight, bias, t, ignore_index, use_reentrant=False))
        else:
            pieces.append(_chunk_losses(h, weight, bias, t, ignore_index))
    return _reduce(torch.cat(pieces), labels, reduction, ignore_index, num_items_in_batch)


def _validate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str,
              num_items_in_batch: Optional[int]) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch is the mean's denominator: reduction must be 'mean', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden (N, D), weight (V, D) and labels (N,) expected, got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}")


def _reduce(losses: torch.Tensor, labels: torch.Tensor, reduction: str, ignore_index: int,
            num_items_in_batch: Optional[int]) -> torch.Tensor:
    """Per-token ``losses`` (0 where ignored) reduced as ``torch.nn.functional.cross_entropy`` does; the mean over
    ``num_items_in_batch`` where given."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (num_items_in_batch if num_items_in_batch is not None else (labels != ignore_index).sum())


# ---- the fused output projection + cross-entropy ------------------------------------------------------------------



def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's where it is on for the tensor's device, else the input's."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if hasattr(torch, "get_autocast_dtype"):
            return torch.get_autocast_dtype(kind)
        return torch.get_autocast_cpu_dtype() if kind == "cpu" else torch.get_autocast_gpu_dtype()  # before 2.4
    return hidden.dtype


def _acc(dtype: torch.dtype) -> torch.dtype:
    """What the logits, losses and weight gradient are kept in: fp32, or float64 for a float64 computation."""
    return torch.promote_types(dtype, torch.float32)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token ``cross_entropy(softcap(hidden·Wᵀ + b), labels)`` (fp32; float64 for float64 inputs), ``chunk`` rows at
    a time, in both passes.

    Forward keeps, beside its inputs, only each row's log-sum-exp (N fp32 values); backward recomputes each chunk's
    logits, forms ``softmax − onehot`` from the saved log-sum-exp, scales each row by *its own* upstream gradient
    (so every reduction, ``none`` with a per-token upstream gradient included, differentiates right) and adds the
    chunk's share to the gradients of the hidden states, the weight (fp32 accumulator) and the bias. No (N, V) tensor
    exists in either pass. The projection runs in ``dtype`` (autocast's at the call), with autocast off inside, so
    forward and recomputation round the same way."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, softcap, ignore_index, dtype):
        losses = torch.zeros(hidden.shape[0], dtype=_acc(dtype), device=hidden.device)
        lse = torch.zeros_like(losses)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                z, _ = LinearCrossEntropyFunction.logits(hidden[rows], weight, bias, softcap, dtype)
                lse[rows] = torch.logsumexp(z, dim=-1)
                y = labels[rows]
                valid = y != ignore_index
                picked = z.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
                losses[rows] = torch.where(valid, lse[rows] - picked, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.softcap, ctx.ignore_index, ctx.dtype = chunk, softcap, ignore_index, dtype
        return losses

    @staticmethod
    def logits(hidden, weight, bias, softcap, dtype):
        """fp32 (float64 for float64) logits of ``hidden`` rows (softcapped where asked) and, with a softcap, ``tanh``
        of the raw ones."""
        z = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).to(_acc(dtype))
        if softcap is None:
            return z, None
        t = z.div_(softcap).tanh_()
        return t * softcap, t

    @staticmethod
    def logit_grad(hidden, weight, bias, labels, lse, grad_losses, softcap, ignore_index, dtype) -> torch.Tensor:
        """The gradient of the per-token losses of ``hidden`` rows, weighted by ``grad_losses``, with respect to
        their (pre-softcap) logits: ``(softmax − onehot)·grad`` from the saved log-sum-exp, 0 on ignored rows."""
        g, t = LinearCrossEntropyFunction.logits(hidden, weight, bias, softcap, dtype)
        valid = labels != ignore_index
        g.sub_(lse.unsqueeze(1)).exp_()  # the softmax, in the logits' storage
        g.scatter_add_(1, torch.where(valid, labels, 0).unsqueeze(1), -torch.ones_like(g[:, :1]))
        g.mul_(torch.where(valid, grad_losses.to(g.dtype), 0.0).unsqueeze(1))
        if t is not None:  # d(c·tanh(u/c))/du = 1 − tanh²
            g.mul_(t.square_().neg_().add_(1.0))
        return g

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        dtype = ctx.dtype
        grad_w = torch.zeros(weight.shape, dtype=_acc(dtype), device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=_acc(dtype), device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h = hidden[rows]
                g = LinearCrossEntropyFunction.logit_grad(h, weight, bias, labels[rows], lse[rows], grad_losses[rows],
                                                          ctx.softcap, ctx.ignore_index, dtype)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(dtype)  # what the projection's backward multiplies in (the input's dtype, or autocast's)
                if need_h:
                    grad_h[rows] = (g @ weight.to(dtype)).to(hidden.dtype)
                if need_w:
                    grad_w += (g.T @ h.to(dtype)).to(grad_w.dtype)
                del g
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, reduction: str = "mean",
                         ignore_index: int = IGNORE_INDEX, chunk_size: int = DEFAULT_LOSS_CHUNK,
                         softcap: Optional[float] = None, num_items_in_batch: Optional[int] = None) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias), labels)`` without the (N, V) logits: the output projection fused
    into the loss (:class:`LinearCrossEntropyFunction`), ``chunk_size`` rows at a time, in fp32 (float64 for float64
    inputs) whatever the input.

    Args:
        hidden: (N, D) — the final normed hidden states, one row per position.
        weight: (V, D), the output projection; ``bias`` (V,) optional.
        labels: (N,) class ids, ``ignore_index`` where nothing is learned (already shifted: row i predicts
            ``labels[i]``).
        reduction: ``"mean"`` over the targets (or over ``num_items_in_batch``), ``"sum"``, or ``"none"`` (N
            per-token losses, 0 where ignored) — as ``torch.nn.functional.cross_entropy``.
        softcap: logits become ``softcap·tanh(logits / softcap)`` before the softmax (Gemma 2's final softcap).
        num_items_in_batch: with ``"mean"``, the denominator: the whole window's target count when the window is
            accumulated over micro-batches (transformers' name), so that the micro-batches' losses sum to its mean.
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size!r}")
    _validate(hidden, weight, labels, reduction, num_items_in_batch)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap!r}")
    losses = LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, chunk_size, softcap, ignore_index,
                                              _compute_dtype(hidden))
    return _reduce(losses, labels, reduction, ignore_index, num_items_in_batch)
