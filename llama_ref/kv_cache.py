"""The KV cache of one attention layer: keys and values of earlier positions, per batch row (gpt-fast's
``KVCache`` pattern, with Meta's ``start_pos`` bookkeeping).

Shapes: B batch, T new tokens, S keys (cached + new), Hkv key/value heads, Dh head_dim.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Buffers ``cache_k``/``cache_v`` of shape (max_batch_size, max_seq_len, Hkv, Dh).

    State, not parameters: never in a ``state_dict``, moved by ``.to()``, rewritten before it is read. Allocated at
    the first :meth:`update`, in the dtype and on the device of the keys written, so that a model that only trains
    never holds it. A different cache (a ring buffer, a paged one, a deliberately broken one) is a subclass that
    overrides :meth:`update`; the model takes the class (``Transformer.kv_cache_cls``).
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("cache_k", torch.empty(0), persistent=False)
        self.register_buffer("cache_v", torch.empty(0), persistent=False)

    def ensure(self, like: torch.Tensor) -> None:
        """Allocate the buffers, or move them, to ``like``'s dtype and device."""
        if self.cache_k.shape != self.shape:
            self.cache_k = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
            self.cache_v = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        elif self.cache_k.dtype != like.dtype or self.cache_k.device != like.device:
            self.cache_k, self.cache_v = self.cache_k.to(like), self.cache_v.to(like)

    def update(self, xk: torch.Tensor, xv: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, T, Hkv, Dh) at ``[:B, start_pos:start_pos+T]``; return all keys and values
        of those rows up to the last new position (B, S, Hkv, Dh)."""
        bsz, seqlen = xk.shape[:2]
        end = start_pos + seqlen
        self.ensure(xk)
        with torch.no_grad():
            self.cache_k[:bsz, start_pos:end] = xk
            self.cache_v[:bsz, start_pos:end] = xv
        if xk.requires_grad or xv.requires_grad:
            # Differentiable through the new chunk: the past comes from the cache, the present stays in the graph.
            return (torch.cat([self.cache_k[:bsz, :start_pos], xk], dim=1),
                    torch.cat([self.cache_v[:bsz, :start_pos], xv], dim=1))
        return self.cache_k[:bsz, :end], self.cache_v[:bsz, :end]
