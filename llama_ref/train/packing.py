"""Packing: several examples per row (padding-free batches), and the micro-batches of a packed window.

A packed row holds whole documents one after another: each document's positions restart at 0 (RoPE by position, not
by column), attention stays inside it (``Transformer.forward(positions=…, document_ids=…)``), and its first label is
ignored, so that its first token is never predicted from the end of the document before — in an unpacked batch that
label is never predicted either (the loss shifts). The window's loss is then the same mean over the same targets.

    rows = pack([len(e["input_ids"]) for e in examples], seq_len=256)    # first-fit decreasing: indices per row
    batch = collate_packed([[examples[i] for i in row] for row in rows], pad_id=0)

Shapes: R rows, L the longest row of a batch; ``document_ids`` counts a row's documents from 0, its padding -1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..loss import IGNORE_INDEX
from .data import DataError


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: the indices of the documents in each row of ``seq_len`` tokens (longest first; a row
    takes the next document that fits, rows in the order they were opened, documents within a row in the order
    placed). DataError naming the first document longer than a row (by its index in ``lengths``; llama-finetune
    checks its data before the first step, naming the record)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise DataError(f"example {i} has {n} tokens, more than a packed row of {seq_len} (--pack-len): raise "
                            "--pack-len, or split such examples into rows with --split-long")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def split_long(example: dict[str, torch.Tensor], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """``example`` cut into pieces of at most ``seq_len`` tokens, each packed as a document of its own (its positions
    restart and its first label is ignored: the context before the cut is lost — asked for with --split-long)."""
    n = len(example["input_ids"])
    return [{k: v[s:s + seq_len] for k, v in example.items()} for s in range(0, n, seq_len)]


def collate_packed(rows: Sequence[Sequence[dict[str, torch.Tensor]]], pad_id: Optional[int] = None
                   ) -> dict[str, torch.Tensor]:
    """Rows of whole documents → ``input_ids``, ``labels``, ``positions``, ``document_ids`` (R, L), padded on the
    right to the longest row, and ``lengths`` (R,) the real tokens of each row. Each document's first label is
    IGNORE_INDEX; padding has labels IGNORE_INDEX, positions 0 … and document -1."""
    if not rows or not all(rows):
        raise ValueError("collate_packed needs at least one row, each with at least one document")
    pad_id = 0 if pad_id is None else pad_id
    lengths = torch.tensor([sum(len(d["input_ids"]) for d in row) for row in rows], dtype=torch.long)
    width = int(lengths.max())
    out = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
           "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
           "positions": torch.zeros((len(rows), width), dtype=torch.long),
           "document_ids": torch.full((len(rows), width), -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        at = 0
        for doc, item in enumerate(row):
            n = len(item["input_ids"])
            out["input_ids"][r, at:at + n] = item["input_ids"]
            out["labels"][r, at:at + n] = item["labels"]
            out["labels"][r, at] = IGNORE_INDEX  # never predicted from the document before
            out["positions"][r, at:at + n] = torch.arange(n)
            out["document_ids"][r, at:at + n] = doc
            at += n
        out["positions"][r, at:] = torch.arange(width - at)
    out["lengths"] = lengths
    return out


def packed_micro_batches(examples: Sequence[dict[str, torch.Tensor]], seq_len: int, n_micro: int,
                         pad_id: Optional[int] = None, *, split: bool = False) -> list[dict[str, torch.Tensor]]:
    """One window's examples packed into rows of ``seq_len`` (first-fit decreasing) and dealt, in row order, into
    ``min(n_micro, rows)`` micro-batches whose row counts differ by at most one. ``split`` cuts an example longer
    than a row into pieces (:func:`split_long`); else it is a DataError naming it."""
    docs = [piece for e in examples for piece in (split_long(e, seq_len) if split else [e])]
    rows = pack([len(d["input_ids"]) for d in docs], seq_len)
    n = min(n_micro, len(rows))
    base, extra = divmod(len(rows), n)
    out, start = [], 0
    for m in range(n):
        take = base + (m < extra)
        out.append(collate_packed([[docs[i] for i in row] for row in rows[start:start + take]], pad_id))
        start += take
    return out
