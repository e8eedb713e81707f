"""Small Llama models of the input_pos family, written anew for the tests (nothing taken from the frameworks): called
as ``forward(idx, input_pos=…)``, their KV caches modules set up by a method of the model, laid out (batch, heads,
positions, head_dim) — the shapes of gpt-fast's, litgpt's and torchtune's models:

- :class:`FastStyle`: ``setup_caches(max_batch_size, max_seq_length)`` puts a cache module (``k_cache``/``v_cache``
  buffers, every row written at the positions ``input_pos`` names: a fixed batch) in every attention and records
  those sizes (it returns early where they suffice); ``forward(idx, input_pos)`` runs only with caches set up, its
  mask the causal row of each position over the whole cache — an inference model, with no path without its cache;
- :class:`LitStyle`: ``set_kv_cache(batch_size, max_seq_length=…)`` / ``clear_kv_cache()``; ``input_pos=None`` is the
  plain path whether or not a cache is set;
- :class:`TuneStyle`: ``setup_caches(batch_size, dtype, decoder_max_seq_len=…)`` puts a cache of a fixed batch size
  that keeps its own position (``reset_caches()`` empties it); ``caches_are_enabled()``; with caches, forward takes
  ``mask`` (B, T, S: True where a query may attend) and ``input_pos`` (B, T); with caches set up but disabled and no
  mask, its attention is not causal at all (torchtune's is causal by itself only where no cache is set up).

Each may carry loralib-shaped LoRA layers on ``wq``/``wv`` (seed_style.LoRALinear).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .seed_style import RMSNorm, apply_lora, rope_table


@dataclass
class Config:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    block_size: int = 64
    norm_eps: float = 1e-5


def _rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # x (B, H, T, D), table (B or 1, T, D/2)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table[:, None]).flatten(3).type_as(x)


class PositionedCache(nn.Module):
    """Written at the positions the caller names; every slot read back (the mask hides the unwritten ones)."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, heads, length, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, heads, length, head_dim, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        bsz = k.shape[0]
        self.k_cache[:bsz, :, input_pos] = k
        self.v_cache[:bsz, :, input_pos] = v
        return self.k_cache[:bsz], self.v_cache[:bsz]


class FullBatchCache(PositionedCache):
    """Every row written: the batch must be the cache's."""

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class SelfPositionedCache(PositionedCache):
    """A fixed batch; each update appends at the cache's own position, which ``reset`` takes back to 0."""

    def __init__(self, *args):
        super().__init__(*args)
        self.size = 0

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if k.shape[0] != self.k_cache.shape[0]:
            raise RuntimeError(f"a batch of {k.shape[0]} in a cache set up for {self.k_cache.shape[0]}")
        pos = torch.arange(self.size, self.size + k.shape[2], device=k.device)
        self.size += k.shape[2]
        return super().update(pos, k, v)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.size = 0


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.dim // c.n_heads
        self.wq = nn.Linear(c.dim, c.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * self.head_dim, c.dim, bias=False)
        self.kv_cache: Optional[PositionedCache] = None
        self.cache_enabled = True

    def project(self, x):
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, table, mask, input_pos):
        bsz, seqlen, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, table), _rope(k, table)
        if self.kv_cache is not None and self.cache_enabled and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(c.dim, c.norm_eps), RMSNorm(c.dim, c.norm_eps)
        self.attention = Attention(c)
        self.w1, self.w2, self.w3 = (nn.Linear(c.dim, 4 * c.dim, bias=False), nn.Linear(4 * c.dim, c.dim, bias=False),
                                     nn.Linear(c.dim, 4 * c.dim, bias=False))

    def forward(self, x, table, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), table, mask, input_pos)
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class Model(nn.Module):
    causal_only_without_caches = False  # torchtune's: with caches set up but off, no mask given means none at all

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("table", rope_table(config.dim // config.n_heads, config.block_size, 10000.0),
                             persistent=False)

    def _cache(self) -> Optional[PositionedCache]:
        att = self.layers[0].attention
        return att.kv_cache if att.cache_enabled else None

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, *,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bsz, seqlen = idx.shape
        cache = self._cache()
        if cache is not None and input_pos is not None:
            pos = input_pos if input_pos.dim() == 2 else input_pos[None].expand(bsz, seqlen)
            if mask is None:  # causal over the cache's slots: a query at position p sees slots 0..p
                slots = torch.arange(cache.k_cache.shape[2], device=idx.device)
                mask = slots[None, None, :] <= pos[:, :, None]
            mask = mask[:, None]
        else:
            pos = torch.arange(seqlen, device=idx.device)[None].expand(bsz, seqlen)
            if mask is not None:  # the caller's (B, T, T)
                mask = mask[:, None]
            elif not (self.causal_only_without_caches and self.layers[0].attention.kv_cache is not None):
                mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=idx.device).tril()
        table = self.table[pos]  # (B, T, D/2)
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, table, mask, input_pos if cache is not None else None)
        return self.output(self.norm(h)).float()


class FastStyle(Model):
    max_batch_size = -1
    max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        dtype = self.output.weight.dtype
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = FullBatchCache(max_batch_size, a.n_kv_heads, max_seq_length, a.head_dim, dtype).to(
                self.output.weight.device)

    def forward(self, idx, input_pos=None, *, mask=None):
        assert self.layers[0].attention.kv_cache is not None, "Caches must be initialized first"
        return super().forward(idx, input_pos, mask=mask)


class LitStyle(Model):
    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None,
                     device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        length = max_seq_length or self.config.block_size
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = PositionedCache(batch_size, a.n_kv_heads, length, a.head_dim,
                                         dtype or self.output.weight.dtype).to(device or self.output.weight.device)

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(self, idx, input_pos=None, *, mask=None):
        return super().forward(idx, input_pos, mask=mask)


class TuneStyle(Model):
    causal_only_without_caches = True
    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, decoder_max_seq_len: Optional[int] = None) -> None:
        length = decoder_max_seq_len or self.config.block_size
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = SelfPositionedCache(batch_size, a.n_kv_heads, length, a.head_dim, dtype).to(
                self.output.weight.device)

    def caches_are_enabled(self) -> bool:
        return all(layer.attention.kv_cache is not None and layer.attention.cache_enabled for layer in self.layers)

    def reset_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache.reset()


def make(cls: type[Model] = FastStyle, lora: bool = False, seed: int = 0, **config) -> Model:
    model = cls(Config(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "tok_embeddings" in name else p.shape[-1] ** -0.5))
    return apply_lora(model, rank=4, alpha=8, dropout=0.0) if lora else model


class TuneLoRALinear(nn.Module):
    """An adapter in torchtune's shape, written anew: the base ``weight``, ``lora_a``/``lora_b`` Linear modules
    (``B`` zero-initialised), ``rank``, ``alpha``, ``dropout`` and a ``disabled`` switch; no merge of its own."""

    def __init__(self, linear: nn.Linear, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        self.rank, self.alpha, self.disabled = rank, alpha, False
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.lora_a = nn.Linear(linear.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, linear.out_features, bias=False)
        self.dropout = nn.Identity()
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        out = F.linear(x, self.weight)
        if self.disabled:
            return out
        return out + (self.alpha / self.rank) * self.lora_b(self.lora_a(self.dropout(x)))


def merged_lora_state(state_dict: dict, rank: int, alpha: float) -> dict:
    """A checkpoint merge in the way torchtune's ``get_merged_lora_ckpt`` is documented to work, written anew: every
    ``….weight`` with ``lora_a``/``lora_b`` beside it becomes ``W + (alpha / rank)·B·A``; the adapter keys go."""
    merged = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".lora_a.weight")]:
        prefix = key[:-len(".lora_a.weight")]
        a, b = merged.pop(key), merged.pop(f"{prefix}.lora_b.weight")
        merged[f"{prefix}.weight"] = merged[f"{prefix}.weight"] + (alpha / rank) * b @ a
    return merged


def with_tune_lora(model: Model) -> Model:
    """``wq`` and ``wv`` of every block adapted in torchtune's shape, only the adapters trainable (in place)."""
    torch.manual_seed(0)
    for layer in model.layers:
        for name in ("wq", "wv"):
            setattr(layer.attention, name, TuneLoRALinear(getattr(layer.attention, name)))
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in n
    return model


class FusedQKVLoRA(nn.Module):
    """A fused query/key/value projection with one adapter for its enabled parts, in litgpt's shape, written anew:
    ``linear`` (the fused base), ``lora_A`` (r·parts, in), ``lora_B`` (rows of the enabled parts, r): part i's update
    is ``B_i·A_i`` placed at its rows, the others zero. It merges in place (``merge()``, once) and cannot unmerge.
    ``bug``: ``"no scaling"`` merges without alpha/r; ``"rows"`` merges each part's update into the rows before it."""

    def __init__(self, sizes: tuple[int, int, int], linear: nn.Linear, enabled=(True, False, True), r: int = 4,
                 lora_alpha: float = 8.0, bug: Optional[str] = None):
        super().__init__()
        self.linear, self.r, self.lora_alpha, self.merged, self.bug = linear, r, lora_alpha, False, bug
        starts = [0, sizes[0], sizes[0] + sizes[1]]
        self.parts = [(s, n) for s, n, on in zip(starts, sizes, enabled) if on]  # (first row, rows) of each
        self.lora_A = nn.Parameter(torch.randn(r * len(self.parts), linear.in_features) / linear.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(sum(n for _, n in self.parts), r))

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (…, in) → the update's output (…, out): each enabled part through its own A_i, B_i."""
        out = x.new_zeros(*x.shape[:-1], self.linear.out_features)
        row = 0
        for i, (start, n) in enumerate(self.parts):
            a, b = self.lora_A[i * self.r:(i + 1) * self.r], self.lora_B[row:row + n]
            out[..., start:start + n] = F.linear(F.linear(x, a), b)
            row += n
        return out * (self.lora_alpha / self.r)

    def forward(self, x):
        return self.linear(x) if self.merged else self.linear(x) + self._update(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta = self._update(torch.eye(self.linear.in_features, dtype=self.lora_A.dtype)).T
        if self.bug == "no scaling":
            delta = delta / (self.lora_alpha / self.r)
        if self.bug == "rows":
            delta = delta.roll(-self.parts[-1][1], dims=0)
        self.linear.weight += delta
        self.merged = True


class FusedAttention(Attention):
    """The attention with ``wq``/``wk``/``wv`` fused into one ``qkv`` projection (litgpt's layout)."""

    def project(self, x):
        return self.qkv(x).split(self.qkv.sizes, dim=-1)


def with_fused_lora(model: Model, bug: Optional[str] = None) -> Model:
    """Every block's ``wq``/``wk``/``wv`` fused into one projection carrying a :class:`FusedQKVLoRA` on its query and
    value parts (``B`` zero, as a fresh adapter), only the adapters trainable (in place)."""
    torch.manual_seed(0)
    for layer in model.layers:
        att = layer.attention
        parts = (att.wq, att.wk, att.wv)
        fused = nn.Linear(att.wq.in_features, sum(p.out_features for p in parts), bias=False)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
        del att.wq, att.wk, att.wv
        att.__class__ = FusedAttention
        att.qkv = FusedQKVLoRA(tuple(p.out_features for p in parts), fused, bug=bug)
        att.qkv.sizes = tuple(p.out_features for p in parts)
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in n
    return model
