"""Packed forwards as a user gives them to ``llama-verify --packed-forward PATH.py:FN`` (the signature:
``verify/targets/packed_forward.py``): right ones on llama_ref and transformers, and two wrong ones."""
from __future__ import annotations

import torch


def llama_ref_forward(model, input_ids, *, positions=None, document_ids=None):
    """llama_ref's own packed path: each token's position and document (a training forward: no KV cache)."""
    model.kv_caching = False
    return model(input_ids, 0, positions=positions, document_ids=document_ids)


def varlen_forward(model, input_ids, *, cu_seqlens=None):
    """flash-attn's varlen convention: the segments of the flattened batch, turned into positions and documents."""
    model.kv_caching = False
    if cu_seqlens is None:
        return model(input_ids, 0)
    flat = torch.zeros(input_ids.numel(), dtype=torch.long)
    positions = torch.zeros_like(flat)
    for d, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        flat[a:b] = d
        positions[a:b] = torch.arange(b - a)
    shape = input_ids.shape
    return model(input_ids, 0, positions=positions.view(shape).to(input_ids.device),
                 document_ids=flat.view(shape).to(input_ids.device))


def hf_forward(model, input_ids, *, positions=None):
    """transformers' padding-free path: position_ids restarting per document, no attention mask, no cache."""
    return model(input_ids=input_ids, position_ids=positions, use_cache=False).logits


def ignores_the_documents(model, input_ids, *, positions=None):
    """Wrong: takes the positions and drops them, so every row runs as one causal sequence (documents attend across,
    positions by column)."""
    return model(input_ids, 0)


def restarts_positions_only(model, input_ids, *, positions=None, document_ids=None):
    """Wrong: positions restart, but every row is one document (the mask does not follow them)."""
    model.kv_caching = False
    ids = None if document_ids is None else torch.zeros_like(document_ids)
    return model(input_ids, 0, positions=positions, document_ids=ids)


def no_packing_keyword(model, input_ids):
    """Not a packed forward: nothing tells it where the documents are."""
    return model(input_ids, 0)
