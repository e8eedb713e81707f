"""The bug zoo of property 1 (KV cache): caches, masks, RoPE offsets and decode loops that real code got wrong."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import llama_ref.model as M
from llama_ref.generation import Llama
from llama_ref.kv_cache import KVCache

from .base import Mutant, Patch, collector

PROP = "kv_cache"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)


@mutant("seed_cache_batch_index", "cache indexed `cache_k[:, bsz, start:end]` instead of `[:bsz, start:end]`",
        "the seed report's Attention.forward", component="cache_cls")
class _SeedCacheBatchIndex(KVCache):
    def update(self, xk, xv, start_pos):
        bsz, seqlen = xk.shape[:2]
        self.ensure(xk)
        with torch.no_grad():
            self.cache_k[:, bsz, start_pos:start_pos + seqlen] = xk
            self.cache_v[:, bsz, start_pos:start_pos + seqlen] = xv
        return self.cache_k[:, bsz, :start_pos + seqlen], self.cache_v[:, bsz, :start_pos + seqlen]


@mutant("cache_not_sliced_to_bsz", "all max_batch_size cache rows read back, stale rows included",
        "caches sized for max_batch_size read without `[:bsz]` (Meta's code slices; ports often drop it)",
        component="cache_cls")
class _CacheNotSliced(KVCache):
    def update(self, xk, xv, start_pos):
        bsz, seqlen = xk.shape[:2]
        self.ensure(xk)
        with torch.no_grad():
            self.cache_k[:bsz, start_pos:start_pos + seqlen] = xk
            self.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        return self.cache_k[:, :start_pos + seqlen], self.cache_v[:, :start_pos + seqlen]


@mutant("cache_write_ignores_start_pos", "new keys/values written at position 0 instead of start_pos",
        "cache updates written as `cache[:bsz, :seqlen] = xk` (offset bookkeeping lost in ring/static caches)",
        component="cache_cls")
class _CacheWriteAtZero(KVCache):
    def update(self, xk, xv, start_pos):
        bsz, seqlen = xk.shape[:2]
        self.ensure(xk)
        with torch.no_grad():
            self.cache_k[:bsz, :seqlen] = xk
            self.cache_v[:bsz, :seqlen] = xv
        return self.cache_k[:bsz, :start_pos + seqlen], self.cache_v[:bsz, :start_pos + seqlen]


@mutant("cache_wraps_after_8_positions", "a ring buffer of 8 slots posing as the full cache: position p written at "
        "slot p % 8, the first start_pos + seqlen slots read back",
        "a rolling (sliding-window) buffer where full attention is meant, or a cache sized by the wrong axis: a check "
        "on fewer than 8 positions passes it (a heads-first cache read as positions-first once checked 2)",
        component="cache_cls")
class _CacheWrapsAfter8(KVCache):
    def update(self, xk, xv, start_pos):
        bsz, seqlen = xk.shape[:2]
        self.ensure(xk)
        with torch.no_grad():
            for i in range(seqlen):
                self.cache_k[:bsz, (start_pos + i) % 8] = xk[:, i]
                self.cache_v[:bsz, (start_pos + i) % 8] = xv[:, i]
        return self.cache_k[:bsz, :start_pos + seqlen], self.cache_v[:bsz, :start_pos + seqlen]


@mutant("rope_not_offset", "RoPE of new tokens taken from position 0, not start_pos",
        "decode loops that slice `freqs_cis[:seqlen]` (rotary position ids not advanced with the cache)")
def _rope_not_offset() -> list[Patch]:
    original = M.Transformer.rotary_freqs

    def rotary_freqs(self, start_pos, seqlen, device, dtype=torch.float32):
        return original(self, 0, seqlen, device, dtype)
    return [(M.Transformer, "rotary_freqs", rotary_freqs)]


@mutant("mask_top_left", "causal mask aligned top-left (a square mask) when start_pos > 0",
        "SDPA's `is_causal=True` with q_len != kv_len, and hand-written `triu(ones(T, S), 1)` masks")
def _mask_top_left() -> list[Patch]:
    def causal_mask(q_len, kv_len, device, dtype=torch.float32):
        if q_len == 1:
            return None
        return torch.triu(torch.full((q_len, kv_len), float("-inf"), device=device, dtype=dtype), diagonal=1)
    return [(M, "causal_mask", causal_mask)]


@mutant("mask_dropped_with_cache", "no mask whenever the cache holds earlier tokens",
        "decoders that assume one new token per step once a cache exists (`if past: mask = None`)")
def _mask_dropped() -> list[Patch]:
    original = M.causal_mask

    def causal_mask(q_len, kv_len, device, dtype=torch.float32):
        return None if kv_len > q_len else original(q_len, kv_len, device, dtype)
    return [(M, "causal_mask", causal_mask)]


@mutant("mask_sees_next_token", "causal mask off by one: each query also sees the next token",
        "`triu(..., diagonal=start_pos + 2)` off-by-one in hand-built masks")
def _mask_off_by_one() -> list[Patch]:
    def causal_mask(q_len, kv_len, device, dtype=torch.float32):
        if q_len == 1:
            return None
        mask = torch.full((q_len, kv_len), float("-inf"), device=device, dtype=dtype)
        return torch.triu(mask, diagonal=kv_len - q_len + 2)
    return [(M, "causal_mask", causal_mask)]


@mutant("keys_cached_before_rope", "keys written to the cache before RoPE, current keys rotated",
        "attention layers calling `cache.update(k, v)` before `apply_rotary_emb`")
def _keys_cached_before_rope() -> list[Patch]:
    def forward(self, x, start_pos, freqs_cis, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        cache = self.kv_cache
        if cache is not None:
            cache.ensure(xk)
            with torch.no_grad():
                cache.cache_k[:bsz, start_pos:start_pos + seqlen] = xk  # not yet rotated
                cache.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        xq, xk = M.apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        if cache is not None:
            keys = torch.cat([cache.cache_k[:bsz, :start_pos], xk], dim=1)
            values = cache.cache_v[:bsz, :start_pos + seqlen]
        else:
            keys, values = xk, xv
        keys, values = M.repeat_kv(keys, self.n_rep), M.repeat_kv(values, self.n_rep)
        out = M.ATTENTION_IMPLS[self.attn_impl](xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                mask)
        return self.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, -1))
    return [(M.Attention, "forward", forward)]


@mutant("sdpa_is_causal", "the SDPA path uses `is_causal=True` instead of the bottom-right mask",
        "fast-attention ports of Llama (is_causal is top-left aligned when q_len != kv_len)", attn_impl="sdpa")
def _sdpa_is_causal() -> list[Patch]:
    def attention_sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask is not None)
    return [(M, "ATTENTION_IMPLS", {**M.ATTENTION_IMPLS, "sdpa": attention_sdpa})]


@mutant("uncached_forward_no_mask", "the forward without a cache builds no causal mask (every token sees the future)",
        "forwards that leave the mask to the cache path (the input_pos family's `mask = None` when no cache is set "
        "up); against such a reference the cache looks broken")
def _uncached_no_mask() -> list[Patch]:
    hidden_states, causal_mask = M.Transformer.hidden_states, M.causal_mask
    uncached: list[bool] = []  # the forward under way is uncached

    def forward_hidden(self, tokens, start_pos=0, **packing):
        uncached.append(not self.kv_caching)
        try:
            return hidden_states(self, tokens, start_pos, **packing)
        finally:
            uncached.pop()

    def mask(q_len, kv_len, device, dtype=torch.float32):
        return None if uncached and uncached[-1] else causal_mask(q_len, kv_len, device, dtype)
    return [(M.Transformer, "hidden_states", forward_hidden), (M, "causal_mask", mask)]


@mutant("uncached_generate_new_tokens_only",
        "uncached generation feeds only the new tokens (no cache to supply the past)",
        "the seed report's first uncached `generate` (the branch did not recompute tokens[:, :cur_pos])",
        component="generator_cls")
class _UncachedNewOnly(Llama):
    def step_logits(self, tokens, prev_pos, cur_pos, kv_caching):
        return self.model(tokens[:, prev_pos:cur_pos], prev_pos)


@mutant("cached_generate_start_pos_zero", "cached decode steps passed start_pos=0",
        "generation loops calling `model(tokens[:, prev_pos:cur_pos], 0)`", component="generator_cls")
class _CachedStartPosZero(Llama):
    def step_logits(self, tokens, prev_pos, cur_pos, kv_caching):
        if kv_caching:
            return self.model(tokens[:, prev_pos:cur_pos], 0)
        return self.model(tokens[:, :cur_pos], 0)[:, prev_pos:]
