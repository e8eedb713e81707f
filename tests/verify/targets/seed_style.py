"""A Llama in the shape of Meta's reference ``model.py``, with the seed report's KV-cache switch: a target written
as our users write theirs, for the Meta-style adapter's tests and ``llama-verify --target``.

Written anew from the architecture (RMSNorm, complex RoPE, GQA attention with per-layer ``cache_k``/``cache_v``,
SwiGLU, ``@torch.inference_mode()`` forward with the mask shifted by ``start_pos``) and from the seed report's
changes (``../shared/seed/report.txt``): a ``kv_caching`` attribute on every attention module; uncached, keys and
values are the new tokens' own. :class:`SeedAttention` indexes the cache as the seed wrote it,
``cache_k[:, bsz, start_pos : start_pos + seqlen]``, where Meta's code has ``cache_k[:bsz, start_pos : ...]``;
other wrong caches are subclasses overriding :meth:`Attention.update_cache` (or
:meth:`Attention.rotated_keys_values`), wrong positions and masks subclasses of :class:`Transformer` overriding
:meth:`Transformer.rope_rows` or :meth:`Transformer.causal_mask`: the KV zoo's bugs in Meta-shaped code.

The seed's LoRA, written anew from its description: a loralib-style ``LoRALinear(nn.Linear)`` with ``lora_A``,
``lora_B``, ``scaling = lora_alpha / r``, dropout on the adapter's input and ``merge_weights`` (eval() merges,
train() unmerges); :func:`apply_lora` replaces ``wq`` and ``wv`` of every block (r=16, alpha=32, dropout 0.05, as
the report ran it) and freezes all but the adapters. Its ``layer_cls`` takes any class with that layer's
``from_linear`` (the bug zoo's LoRA layers).

The seed's gradient checkpointing: ``params.use_gradient_checkpoint`` makes ``forward`` checkpoint block i when
``i % 3 != 0``, with ``checkpoint(layer, h, start_pos, freqs_cis, mask)`` as the report called it (no
``use_reentrant``: torch's default, the reentrant checkpoint, and a warning). For tests, ``checkpoint_blocks`` (a
set of block indices) overrides the seed's choice, and ``block_runner`` is the seam through which another way of
running a block goes in (the bug zoo's, which share llama_ref's ``(layer, h, start_pos, table, mask, checkpointed)``).
:func:`trainable` takes Meta's ``forward`` out of ``inference_mode``, as a fork that trains does.

Factories for ``--target tests/verify/targets/seed_style.py:FACTORY``: :func:`make` (the seed's indexing),
:func:`make_fixed` (Meta's), :func:`make_lora` (Meta's, with the seed's LoRA) and :func:`make_trainable` (Meta's,
with the seed's LoRA, its forward out of ``inference_mode``); all the same seeded weights.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = 2
    vocab_size: int = 256
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 4
    max_seq_len: int = 64
    use_gradient_checkpoint: bool = False  # the seed report's switch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(head_dim: int, length: int, theta: float) -> torch.Tensor:
    inv = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(length).float()[:, None] * inv[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table[None, :, None, :]).flatten(3).type_as(x)


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 merge_weights: bool = True):
        super().__init__(in_features, out_features, bias=False)
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merge_weights, self.merged = merge_weights, False
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.weight.requires_grad = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    merge_weights: bool = True, *_, **__) -> "LoRALinear":
        layer = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, merge_weights)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)  # the report: copy the original weights in
        return layer

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.lora_B @ self.lora_A * self.scaling
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.lora_B @ self.lora_A * self.scaling
            self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    def forward(self, x):
        out = F.linear(x, self.weight)
        if self.merged:
            return out
        return out + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def apply_lora(model: "Transformer", rank: int = 16, alpha: float = 32, dropout: float = 0.05,
               layer_cls: type = LoRALinear, freeze: bool = True) -> "Transformer":
    """The seed's ``apply_lora_to_llama``: ``wq`` and ``wv`` of every block become LoRA layers (in place); all but
    the adapters frozen (``freeze=False``: the bug of forgetting to)."""
    g_state = torch.get_rng_state()
    torch.manual_seed(0)  # the adapters' A: the same every call
    try:
        for block in model.layers:
            for name in ("wq", "wv"):
                setattr(block.attention, name, layer_cls.from_linear(getattr(block.attention, name), rank, alpha,
                                                                      dropout, True))
    finally:
        torch.set_rng_state(g_state)
    if freeze:
        mark_only_lora_as_trainable(model)
    return model


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        shape = (args.max_batch_size, args.max_seq_len, self.n_kv_heads, self.head_dim)
        self.cache_k, self.cache_v = torch.zeros(shape), torch.zeros(shape)
        self.kv_caching = True  # the seed report's switch

    def update_cache(self, xk, xv, bsz: int, start_pos: int, seqlen: int):
        """Meta's: write the new keys/values of rows ``:bsz`` at their positions, read every position so far."""
        self.cache_k[:bsz, start_pos:start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        return self.cache_k[:bsz, :start_pos + seqlen], self.cache_v[:bsz, :start_pos + seqlen]

    def rotated_keys_values(self, xk, xv, table, bsz: int, start_pos: int, seqlen: int):
        """RoPE on the new keys, then (cached) every key and value so far, or (uncached) the new ones."""
        xk = rotate(xk, table)
        if not self.kv_caching:
            return xk, xv
        self.cache_k = self.cache_k.to(xk)
        self.cache_v = self.cache_v.to(xk)
        return self.update_cache(xk, xv, bsz, start_pos, seqlen)

    def forward(self, x, start_pos: int, table, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq = rotate(xq, table)
        keys, values = self.rotated_keys_values(xk, xv, table, bsz, start_pos, seqlen)
        rep = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(rep, dim=2).transpose(1, 2)
        values = values.repeat_interleave(rep, dim=2).transpose(1, 2)
        scores = xq.transpose(1, 2) @ keys.transpose(2, 3) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        out = F.softmax(scores.float(), dim=-1).type_as(xq) @ values
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class SeedAttention(Attention):
    def update_cache(self, xk, xv, bsz: int, start_pos: int, seqlen: int):
        """The seed report's indexing: ``bsz`` lands on the position axis."""
        self.cache_k[:, bsz, start_pos:start_pos + seqlen] = xk
        self.cache_v[:, bsz, start_pos:start_pos + seqlen] = xv
        return self.cache_k[:, bsz, :start_pos + seqlen], self.cache_v[:, bsz, :start_pos + seqlen]


class FeedForward(nn.Module):
    def __init__(self, dim: int, multiple_of: int):
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attention_cls: type[Attention]):
        super().__init__()
        self.attention = attention_cls(args)
        self.feed_forward = FeedForward(args.dim, args.multiple_of)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos, table, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, table, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def seed_block_runner(layer, h, start_pos, table, mask, checkpointed: bool):
    if checkpointed:
        return checkpoint(layer, h, start_pos, table, mask)  # as the report wrote it: use_reentrant not given
    return layer(h, start_pos, table, mask)


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs, attention_cls: type[Attention] = Attention):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params, attention_cls) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.table = rope_table(params.dim // params.n_heads, params.max_seq_len * 2, params.rope_theta)
        self.block_runner = seed_block_runner
        self.checkpoint_blocks: Optional[frozenset[int]] = None  # None: the seed's i % 3 != 0 when switched on

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int):
        _bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        table = self.rope_rows(start_pos, seqlen)
        mask = self.causal_mask(seqlen, start_pos, tokens.device)
        mask = None if mask is None else mask.type_as(h)
        for i, layer in enumerate(self.layers):
            on = (self.params.use_gradient_checkpoint and i % 3 != 0 if self.checkpoint_blocks is None
                  else i in self.checkpoint_blocks)
            h = self.block_runner(layer, h, start_pos, table, mask, on)
        return self.output(self.norm(h)).float()


    def rope_rows(self, start_pos: int, seqlen: int) -> torch.Tensor:
        return self.table[start_pos:start_pos + seqlen]

    def causal_mask(self, seqlen: int, start_pos: int, device) -> Optional[torch.Tensor]:
        """Meta's mask: causal among the new tokens, every cached position visible; none for one token."""
        if seqlen == 1:
            return None
        mask = torch.triu(torch.full((seqlen, seqlen), float("-inf"), device=device), diagonal=1)
        return torch.hstack([torch.zeros((seqlen, start_pos), device=device), mask])


def _seeded(model: Transformer, seed: int = 0) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "tok_embeddings" in name else p.shape[-1] ** -0.5))
    return model


def make(attention_cls: type[Attention] = SeedAttention, model_cls: Optional[type[Transformer]] = None
         ) -> Transformer:
    """The seed report's model: ``cache_k[:, bsz, …]`` (or another ``attention_cls``, ``model_cls``)."""
    return _seeded((model_cls or Transformer)(ModelArgs(), attention_cls))


def make_fixed() -> Transformer:
    """The same model with Meta's indexing, ``cache_k[:bsz, …]``."""
    return make(Attention)


def make_lora(layer_cls: type = LoRALinear, freeze: bool = True) -> Transformer:
    """Meta's indexing with the seed's LoRA on ``wq`` and ``wv`` (a fresh adapter: ``B = 0``)."""
    return apply_lora(make_fixed(), layer_cls=layer_cls, freeze=freeze)


def trainable(model: Transformer) -> Transformer:
    """``model`` with Meta's ``forward`` taken out of ``inference_mode`` (in place)."""
    model.forward = types.MethodType(Transformer.forward.__wrapped__, model)
    return model


def make_trainable() -> Transformer:
    return trainable(make_lora())
