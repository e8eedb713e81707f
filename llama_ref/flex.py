"""Attention through ``torch.nn.attention.flex_attention`` (``ModelArgs.attn_impl = "flex"``, torch >= 2.5).

The masks are ``BlockMask`` objects made from a mask function rather than additive (T, S) tensors: the causal mask
aligned bottom-right (a chunk at ``start_pos`` sees the cached keys before it), and the document mask of packed rows
(query i sees key j <= i of its own document) — the same masks as :func:`llama_ref.model.causal_mask` and
:func:`llama_ref.model.document_mask`, property-tested equal. Where it helps is CUDA: there the attention is
compiled into one fused kernel that skips the masked-out blocks of a packed row (the math and SDPA paths compute
every block and mask it). Off CUDA torch's FlexAttention has no backward: there it runs forward-only (generation,
evaluation), through torch's unfused implementation, which materialises the scores as the math path does — to be
checked against the other paths, not to be fast; a forward that needs gradients is an error saying so.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch


def flex_available() -> Optional[str]:
    """None where this torch has ``flex_attention``, else why not."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return (f"attn_impl 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention); this is torch "
                f"{torch.__version__}")
    return None


def causal_block_mask(q_len: int, kv_len: int, device: torch.device) -> Optional[Any]:
    """Query i (at position kv_len - q_len + i) sees keys <= it; None for a single query, which sees every key."""
    if q_len == 1:
        return None
    from torch.nn.attention.flex_attention import create_block_mask
    offset = kv_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx
    return create_block_mask(causal, None, None, q_len, kv_len, device=device)


def document_block_mask(document_ids: torch.Tensor) -> Any:
    """Packed rows ``document_ids`` (B, T): query i sees key j <= i of its own document (a row's padding is a document
    of its own)."""
    from torch.nn.attention.flex_attention import create_block_mask
    bsz, seqlen = document_ids.shape

    def same_document(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)
    return create_block_mask(same_document, bsz, None, seqlen, seqlen, device=document_ids.device)


@functools.lru_cache(maxsize=None)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[Any]) -> torch.Tensor:
    """flex_attention with ``mask`` (a ``BlockMask`` or None); q (B, H, T, Dh), k and v (B, H, S, Dh). Compiled
    on CUDA; the unfused implementation elsewhere (its warning that it is unfused is the point, and silenced)."""
    from torch.nn.attention.flex_attention import flex_attention
    if q.is_cuda:
        return _compiled()(q, k, v, block_mask=mask)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(f"attn_impl 'flex' trains on CUDA only: torch's FlexAttention has no backward on "
                         f"{q.device.type} (use 'sdpa' or 'math' there; 'flex' runs forward-only, e.g. generation, "
                         "off CUDA)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=mask)
