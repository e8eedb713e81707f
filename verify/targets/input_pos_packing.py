"""Property 7 on the input_pos family: torchtune's packed path (its ``PackedDataset``, ``padded_collate_packed`` and
the block-causal ``mask`` and per-document ``input_pos`` its forward takes), a mixin of
:class:`verify.targets.input_pos.InputPosTarget`. litgpt's ``GPT.forward`` takes no mask (with ``input_pos`` it reads
its KV cache's causal mask), gpt-fast's runs only through its cache: there the property is N/A.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .base import cast_floating, summed_next_token_loss



class TorchtunePacking:
    """:class:`verify.targets.protocols.PackingTarget` for an input_pos-family target (``style``, ``fresh_model()``,
    ``_plain(model, tokens)`` are the target's)."""

    style: str

    def _why_no_packing(self) -> Optional[str]:
        """Why property 7 cannot be asked of this style (None: it can)."""
        if self.style == "litgpt":
            return ("litgpt's GPT.forward takes no attention mask: with input_pos it reads the causal mask of its KV "
                    "cache (and writes the cache at those positions), without it the attention is causal over the "
                    "whole row; no padding-free path")
        if self.style == "gpt-fast":
            return ("gpt-fast's forward runs only through its KV cache, with the cache's causal mask indexed by "
                    "input_pos: no mask argument, no padding-free path")
        try:
            import torchtune.data  # noqa: F401
            import torchtune.datasets  # noqa: F401
        except ImportError as e:
            return (f"the packer is torchtune's own PackedDataset and padded_collate_packed, and torchtune does not "
                    f"import ({e})")
        return None

    def pack(self, documents: Sequence[dict[str, torch.Tensor]], row_len: int, n_micro: int
             ) -> list[dict[str, torch.Tensor]]:
        """torchtune's own packer: ``PackedDataset`` over the documents (``{"tokens", "labels"}`` samples, as its
        datasets give them; ``max_seq_len=row_len``, ``padding_idx=0``, ``split_across_pack=False``), its packs dealt
        in order into at most ``n_micro`` micro-batches, each collated by ``padded_collate_packed``. Each becomes the
        check's batch: ``input_ids`` (its ``tokens``), ``labels`` as it leaves them, ``positions`` (its ``input_pos``),
        ``document_ids`` from its ``seq_lens`` (the k-th segment of a row is document k; the padding segment, which
        torchtune appends and whose ``input_pos`` continue the last document's instead of starting at 0, is -1), and
        its block-causal ``mask`` (B, T, T) under ``"mask"``, which :meth:`batch_logits` passes on. Where its mask is a
        flex-attention ``BlockMask`` (a CUDA machine) it is left out and rebuilt by the same torchtune function on the
        model's device."""
        from torchtune.data import padded_collate_packed
        from torchtune.datasets import PackedDataset
        samples = [{"tokens": d["input_ids"].tolist(), "labels": d["labels"].tolist()} for d in documents]
        packs = PackedDataset(samples, max_seq_len=row_len, padding_idx=0, split_across_pack=False).packs
        n = min(n_micro, len(packs))
        base, extra = divmod(len(packs), n)
        out, start = [], 0
        for m in range(n):
            group = packs[start:start + base + (m < extra)]
            start += len(group)
            collated = padded_collate_packed(group)
            batch = {"input_ids": collated["tokens"], "labels": collated["labels"], "positions": collated["input_pos"],
                     "document_ids": torch.stack([_document_ids(p["seq_lens"], p["input_pos"]) for p in group])}
            if isinstance(collated["mask"], torch.Tensor):
                batch["mask"] = collated["mask"]
            out.append(batch)
        return out

    def _packed_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A padded batch (no ``positions``): the plain causal forward (:meth:`_plain`). A packed one:
        ``model(tokens, mask=…, input_pos=positions)``, the mask the batch's ``"mask"`` (torchtune's, from
        :meth:`pack`) or, where it has none (the check's whole window, joined from the micro-batches), torchtune's
        ``packed_block_causal_mask`` of the rows' segments (:func:`_block_causal_mask`)."""
        device = next(model.parameters()).device
        tokens = batch["input_ids"].to(device)
        if "positions" not in batch:
            return self._plain(model, tokens)
        mask = batch.get("mask")
        mask = _block_causal_mask(batch, device) if mask is None else mask.to(device)
        return model(tokens, mask=mask, input_pos=batch["positions"].to(device))

    def _packing_copy(self, float64: bool) -> nn.Module:
        model = self.fresh_model()
        return cast_floating(model, torch.float64) if float64 else model

    def batch_logits(self, batch: dict[str, torch.Tensor], *, float64: bool = False) -> torch.Tensor:
        model = self._packing_copy(float64).eval()
        with torch.no_grad():
            return self._packed_logits(model, batch)

    def batch_loss_and_grads(self, batch: dict[str, torch.Tensor], *, float64: bool = False
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On a fresh copy in train mode: the summed next-token cross-entropy of its logits (upcast to at least fp32,
        as torchtune's losses do; labels shifted as its recipes shift them, -100 ignored) and the trainable
        parameters' gradients."""
        model = self._packing_copy(float64).train()
        logits = self._packed_logits(model, batch)
        loss = summed_next_token_loss(logits, batch["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def train_window(self, window: Sequence[dict[str, torch.Tensor]], *, float64: bool = False
                     ) -> tuple[float, Optional[int], dict[str, torch.Tensor]]:
        raise NotImplementedError("torchtune's training loop is a recipe script (its FTRecipe classes read a config, "
                                  "a checkpoint and a dataset from disk), not a step this adapter can call on a "
                                  "window")


def _document_ids(seq_lens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One torchtune pack's document index per token from its ``seq_lens``: segment k is document k, except the
    padding segment ``PackedDataset`` appends, whose ``input_pos`` continue the previous document's (every document's
    start at 0): -1."""
    out, start = [], 0
    for k, n in enumerate(seq_lens.tolist()):
        out.append(torch.full((n,), k if int(input_pos[start]) == 0 else -1, dtype=torch.long))
        start += n
    return torch.cat(out)


def _block_causal_mask(batch: dict[str, torch.Tensor], device: torch.device) -> Any:
    """torchtune's block-causal mask of a packed batch without one: each row's segments — runs of one
    ``document_ids`` value (the padding's -1 a segment of its own, as torchtune gives it), or, without document ids,
    runs from one restart of ``positions`` at 0 to the next — as the ``seq_lens`` of its ``packed_block_causal_mask``
    (what ``padded_collate_packed`` calls). Off CUDA that function's dense fallback, ``create_block_causal_mask``, is
    called directly: on a CUDA machine it would make a flex-attention ``BlockMask`` on the GPU for a model that may
    not be there."""
    from torchtune.modules.attention_utils import create_block_causal_mask, packed_block_causal_mask
    if "document_ids" in batch:
        key = batch["document_ids"]
        starts = torch.ones_like(key, dtype=torch.bool)
        starts[:, 1:] = key[:, 1:] != key[:, :-1]
    else:
        starts = batch["positions"] == 0
        starts[:, 0] = True
    width = starts.shape[1]
    seq_lens = [torch.diff(torch.cat([row.nonzero()[:, 0], torch.tensor([width])])) for row in starts.cpu()]
    if device.type == "cuda":
        mask = packed_block_causal_mask([s.to(device) for s in seq_lens])
    else:
        mask = create_block_causal_mask(seq_lens)
    return mask.to(device) if isinstance(mask, torch.Tensor) else mask
