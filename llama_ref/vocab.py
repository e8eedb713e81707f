"""Resizing the vocabulary of a Llama: new tokens (a chat template's specials) or a smaller table.

The input embedding and the output head grow or shrink together, the old rows kept as they are; a new row is the
mean of the old rows (transformers' ``resize_token_embeddings`` draws around that mean; the mean itself keeps the
result deterministic and a new token's logit near the old tokens' average). A tied model stays tied: one new
tensor, held by both modules.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import Transformer


def _resized(weight: torch.Tensor, vocab: int) -> nn.Parameter:
    old = weight.detach()
    if vocab <= old.shape[0]:
        table = old[:vocab].clone()
    else:
        mean = old.to(torch.promote_types(old.dtype, torch.float32)).mean(dim=0).to(old.dtype)
        table = torch.cat([old, mean.expand(vocab - old.shape[0], -1)])
    return nn.Parameter(table, requires_grad=weight.requires_grad)


@torch.no_grad()
def resize_token_embeddings(model: Transformer, vocab_size: int) -> Transformer:
    """Give ``model`` (in place) a vocabulary of ``vocab_size`` tokens: ``tok_embeddings`` and ``output`` resized,
    ``params.vocab_size`` updated, a tie kept. ValueError for a size below 1 or a model whose vocabulary matrices
    carry adapters (merge and unload them first)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    adapted = any(hasattr(m, a) for m in (model.tok_embeddings, model.output) for a in ("lora_A", "leader"))
    if adapted or not (isinstance(model.tok_embeddings, nn.Embedding) and isinstance(model.output, nn.Linear)):
        raise ValueError(f"resize_token_embeddings: the vocabulary matrices are a {type(model.tok_embeddings).__name__}"
                         f" and a {type(model.output).__name__}; merge and unload their adapters first")
    tied = model.output.weight is model.tok_embeddings.weight
    model.tok_embeddings.weight = _resized(model.tok_embeddings.weight, vocab_size)
    model.tok_embeddings.num_embeddings = vocab_size
    model.output.weight = model.tok_embeddings.weight if tied else _resized(model.output.weight, vocab_size)
    model.output.out_features = vocab_size
    model.params.vocab_size = model.vocab_size = vocab_size
    return model
