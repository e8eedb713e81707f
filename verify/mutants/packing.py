"""The bug zoo of property 7 (packed batches): packers, masks, labels and counts that padding-free training got
wrong. Packers are given to the check as its ``packer``, trainers as its ``trainer_cls``; the model's masks are
patched (it has no seam for them)."""
from __future__ import annotations

import torch

import llama_ref.model as M
from llama_ref.loss import IGNORE_INDEX, count_target_tokens, token_loss_sum
from llama_ref.train.packing import packed_micro_batches
from llama_ref.train.trainer import PACKING, Trainer

from .base import Mutant, collector

PROP = "packing"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)


def _packer(change):
    def packer(documents, row_len, n_micro):
        return [change(b) for b in packed_micro_batches(list(documents), row_len, n_micro)]
    return packer


def _positions_by_column(b):
    rows = {k: v for k, v in b.items() if k != "document_ids"}  # the documents known from the positions alone
    return {**rows, "positions": torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"]).clone()}


def _first_tokens_labelled(b):
    d = b["document_ids"]
    starts = (d >= 0) & torch.cat([torch.ones_like(d[:, :1], dtype=torch.bool), d[:, 1:] != d[:, :-1]], dim=1)
    return {**b, "labels": torch.where(starts, b["input_ids"], b["labels"])}


mutant("pack_positions_continue", "positions count the row's columns instead of restarting in each document, and "
       "the documents are read from the positions (as transformers reads position_ids): no boundary is left",
       "hiyouga/LlamaFactory#7318: packed sequences whose position ids were not reset per document",
       component="packer")(_packer(_positions_by_column))
mutant("pack_first_token_labelled", "each document's first token keeps its label: predicted from the end of the "
       "document before it", "packers that concatenate labels with their documents (the boundary label the shifted "
       "loss then predicts across documents)", component="packer")(_packer(_first_tokens_labelled))


def _drops(documents, row_len, n_micro):
    return packed_micro_batches(list(documents)[:-1], row_len, n_micro)


def _duplicates(documents, row_len, n_micro):
    return packed_micro_batches(list(documents) + [documents[0]], row_len, n_micro)


mutant("pack_drops_an_example", "the packer leaves the last example out", "bin-packing code that drops what does "
       "not fit (the issue's zoo: a packer that drops or duplicates an example)", component="packer")(_drops)
mutant("pack_duplicates_an_example", "the packer puts the first example in twice", "bin-packing code that re-adds an "
       "example on a retry (the issue's zoo: a packer that drops or duplicates an example)",
       component="packer")(_duplicates)


@mutant("pack_no_document_mask", "packed rows attend causally across documents (the document mask not applied)",
        "transformers#46634 and every packing path that forgot the block-diagonal mask: later documents attend to "
        "earlier ones while the loss still falls")
def _no_document_mask():
    def causal_only(document_ids, dtype=torch.float32):
        n = document_ids.shape[1]
        return M.causal_mask(n, n, document_ids.device, dtype)
    return [(M, "document_mask", causal_only)]


@mutant("pack_full_rows_take_the_causal_path", "a row with no padding takes the plain causal path (its documents see "
        "each other), as an all-ones attention mask did", "transformers#46634: a packed input with an all-ones 2D "
        "mask took the causal fast path")
def _full_rows_causal():
    original = M.document_mask

    def mask(document_ids, dtype=torch.float32):
        out = original(document_ids, dtype)
        full = (document_ids >= 0).all(dim=1)  # rows without padding: the fast path
        n = document_ids.shape[1]
        causal = M.causal_mask(n, n, document_ids.device, dtype)
        return torch.where(full[:, None, None, None], causal, out)
    return [(M, "document_mask", mask)]


@mutant("pack_count_off_by_rows", "a packed micro-batch's target count one too many per row after the first (the "
        "count off by batch_size - 1)", "unslothai/unsloth-zoo#348: the packed token count off by batch_size - 1",
        component="trainer_cls")
class _CountOffByRows(Trainer):
    def window_tokens(self, window) -> int:
        return sum(count_target_tokens(b["labels"]) + (b["labels"].shape[0] - 1 if "document_ids" in b else 0)
                   for b in window)


@mutant("pack_loss_mean_per_row", "each row's loss its own token mean, the rows then weighted alike (a mean per row, "
        "not per token)", "axolotl#1672 and NVIDIA-NeMo/Speech#14437: packed losses off by a per-row or per-boundary "
        "normalisation", component="trainer_cls")
class _MeanPerRow(Trainer):
    def loss_sum(self, batch):
        packed = {k: batch[k] for k in PACKING if k in batch}
        logits = self.model(batch["input_ids"], 0, **packed)
        rows = [token_loss_sum(logits[r:r + 1], batch["labels"][r:r + 1]) /
                max(count_target_tokens(batch["labels"][r:r + 1]), 1) for r in range(logits.shape[0])]
        return torch.stack(rows).mean() * count_target_tokens(batch["labels"])
