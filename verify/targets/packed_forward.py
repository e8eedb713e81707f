"""Property 7 on a user's packed forward given as a callable (``llama-verify --packed-forward PATH.py:FN``).

The documented signature::

    fn(model, input_ids, *, positions=None, document_ids=None, cu_seqlens=None) -> logits

``model`` the model the run checks (the embedded default, or what ``--target``'s factory returns), ``input_ids``
(B, T). Called with none of the keywords, ``fn`` runs the model's ordinary causal forward: that is the padded
reference, one document per row. For packed rows it is called with the keywords it takes (read from its signature;
at least one of them): ``positions`` (B, T) each token's position inside its document, ``document_ids`` (B, T) its
document's index within the row (-1 for a row's padding), ``cu_seqlens`` (S + 1,) int32 the cumulative lengths of
the segments of the flattened batch, flash-attn's varlen convention (each row's documents, then its padding as a
segment of its own). It returns the logits (B, T, V) of every token.

The packer is first-fit decreasing (:func:`pack_rows`, each document's first label ignored) unless the check is
given another; the loss is the summed shifted cross-entropy of the returned logits, the gradients those of the
model's trainable parameters. There is no training loop here: claim 5 is said not checked.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .base import Target, cast_floating, summed_next_token_loss
from .protocols import Limits

KEYWORDS = ("positions", "document_ids", "cu_seqlens")
IGNORE_INDEX = -100


def packed_keywords(fn: Callable[..., Any], name: str) -> frozenset[str]:
    """The packing keywords ``fn`` takes; TypeError naming what is wrong with its signature."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise TypeError(f"packed forward {name}: its signature cannot be read ({e})") from None
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        raise TypeError(f"packed forward {name}: takes {len(positional)} positional arguments; the signature is "
                        "fn(model, input_ids, *, positions=None, document_ids=None, cu_seqlens=None)")
    takes = frozenset(k for k in KEYWORDS if k in params)
    if not takes:
        raise TypeError(f"packed forward {name}: takes none of {', '.join(KEYWORDS)}: nothing tells it where a "
                        "packed row's documents begin")
    return takes


def cu_seqlens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cumulative segment lengths of ``batch``'s rows flattened (flash-attn's varlen ``cu_seqlens``): a segment
    is a run of one ``document_ids`` value (padding, -1, a segment of its own), or, without ids, a run of
    ``positions`` counting up by 1."""
    bounds = [0]
    width = batch["input_ids"].shape[1]
    for r in range(batch["input_ids"].shape[0]):
        if "document_ids" in batch:
            key = batch["document_ids"][r]
            starts = [0] + [i for i in range(1, width) if key[i] != key[i - 1]]
        else:
            pos = batch["positions"][r]
            starts = [0] + [i for i in range(1, width) if pos[i] != pos[i - 1] + 1]
        bounds += [r * width + s for s in starts[1:]] + [(r + 1) * width]
    return torch.tensor(bounds, dtype=torch.int32)


def pack_rows(documents: list[dict[str, torch.Tensor]], row_len: int) -> list[list[dict[str, torch.Tensor]]]:
    """First-fit decreasing: longest document first, each into the first row it fits (rows in the order opened);
    ValueError naming a document longer than a row."""
    order = sorted(range(len(documents)), key=lambda i: -len(documents[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(documents[i]["input_ids"])
        if n > row_len:
            raise ValueError(f"document {i} has {n} tokens, more than a row of {row_len}")
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([])
            free.append(row_len)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n
    return [[documents[i] for i in row] for row in rows]


def _collate(rows: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Rows of documents → ``input_ids``, ``labels`` (each document's first label ignored), ``positions`` (from 0 in
    each document) and ``document_ids`` (-1 for padding), right-padded to the longest row (ids 0, positions 0 …)."""
    width = max(sum(len(d["input_ids"]) for d in row) for row in rows)
    out = {"input_ids": torch.zeros((len(rows), width), dtype=torch.long),
           "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
           "positions": torch.arange(width).repeat(len(rows), 1),
           "document_ids": torch.full((len(rows), width), -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        at = 0
        for k, d in enumerate(row):
            n = len(d["input_ids"])
            out["input_ids"][r, at:at + n] = d["input_ids"]
            out["labels"][r, at + 1:at + n] = d["labels"][1:]
            out["positions"][r, at:at + n] = torch.arange(n)
            out["document_ids"][r, at:at + n] = k
            at += n
        out["positions"][r, at:] = torch.arange(width - at)
    return out


class PackedForwardTarget(Target):
    """``model`` run by the user's ``forward`` (see the module's doc); ``name`` for the result's case."""

    def __init__(self, model: nn.Module, forward: Callable[..., torch.Tensor], *, name: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"a packed forward runs an nn.Module; got {type(model).__qualname__}")
        self.model, self.forward = model, forward
        self.name = name or getattr(forward, "__qualname__", repr(forward))
        self.takes = packed_keywords(forward, self.name)
        self.description = f"{type(model).__qualname__} through the packed forward {self.name}"
        self._vocab: Optional[int] = None

    def not_applicable(self, prop: str) -> Optional[str]:
        if prop != "packing":
            return f"a packed forward ({self.name}) is checked for property 7 only"
        return None

    @property
    def limits(self) -> Limits:
        p = next(p for p in self.model.parameters() if p.is_floating_point())
        if self._vocab is None:  # the width of the logits of one token
            with torch.no_grad():
                self._vocab = int(self.forward(copy.deepcopy(self.model).eval(),
                                               torch.zeros((1, 1), dtype=torch.long, device=p.device)).shape[-1])
        return Limits(self._vocab, 1, 2 ** 31 - 1, p.dtype, p.device)

    def pack(self, documents: Sequence[dict[str, torch.Tensor]], row_len: int, n_micro: int
             ) -> list[dict[str, torch.Tensor]]:
        """First-fit decreasing rows (:func:`pack_rows`), dealt in order into at most ``n_micro`` micro-batches."""
        rows = pack_rows(list(documents), row_len)
        n = min(n_micro, len(rows))
        base, extra = divmod(len(rows), n)
        out, start = [], 0
        for m in range(n):
            take = base + (m < extra)
            out.append(_collate(rows[start:start + take]))
            start += take
        return out

    def _copy(self, float64: bool) -> nn.Module:
        model = copy.deepcopy(self.model)
        return cast_floating(model, torch.float64) if float64 else model

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        kwargs: dict[str, torch.Tensor] = {}
        if "positions" in batch:  # packed rows: what the forward takes of where the documents are
            given = {"positions": batch["positions"], "document_ids": batch.get("document_ids"),
                     "cu_seqlens": cu_seqlens(batch)}
            kwargs = {k: v.to(device) for k, v in given.items() if k in self.takes and v is not None}
        logits = self.forward(model, batch["input_ids"].to(device), **kwargs)
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != batch["input_ids"].shape:
            raise TypeError(f"packed forward {self.name}: returned "
                            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__},"
                            f" not logits (B, T, V) for input_ids {tuple(batch['input_ids'].shape)}")
        return logits

    def batch_logits(self, batch: dict[str, torch.Tensor], *, float64: bool = False) -> torch.Tensor:
        model = self._copy(float64).eval()
        with torch.no_grad():
            return self._logits(model, batch)

    def batch_loss_and_grads(self, batch: dict[str, torch.Tensor], *, float64: bool = False
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed shifted cross-entropy of the forward's logits (at least fp32), and the trainable parameters'
        gradients (in train mode: a model with dropout should have it off for this check)."""
        model = self._copy(float64).train()
        logits = self._logits(model, batch)
        loss = summed_next_token_loss(logits, batch["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def train_window(self, window: Sequence[dict[str, torch.Tensor]], *, float64: bool = False
                     ) -> tuple[float, Optional[int], dict[str, torch.Tensor]]:
        raise NotImplementedError(f"a packed forward ({self.name}) comes with no training loop")
