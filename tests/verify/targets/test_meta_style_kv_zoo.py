"""The KV zoo on Meta-shaped code: each KV mutant's bug written into the seed-style model (an attention or model
subclass overriding one seam), caught by the KV check through the Meta-style adapter."""
from __future__ import annotations

import pytest
import torch

from verify.checks.kv_cache import check_kv_cache
from verify.mutants import mutants_for

from . import seed_style as S
from .seed_style import rotate


class _NotSlicedToBsz(S.Attention):
    def update_cache(self, xk, xv, bsz, start_pos, seqlen):
        super().update_cache(xk, xv, bsz, start_pos, seqlen)
        return self.cache_k[:, :start_pos + seqlen], self.cache_v[:, :start_pos + seqlen]  # every row, stale too


class _WritesAtZero(S.Attention):
    def update_cache(self, xk, xv, bsz, start_pos, seqlen):
        self.cache_k[:bsz, :seqlen] = xk
        self.cache_v[:bsz, :seqlen] = xv
        return self.cache_k[:bsz, :start_pos + seqlen], self.cache_v[:bsz, :start_pos + seqlen]


class _WrapsAfter8(S.Attention):
    def update_cache(self, xk, xv, bsz, start_pos, seqlen):
        for i in range(seqlen):
            self.cache_k[:bsz, (start_pos + i) % 8] = xk[:, i]
            self.cache_v[:bsz, (start_pos + i) % 8] = xv[:, i]
        return self.cache_k[:bsz, :start_pos + seqlen], self.cache_v[:bsz, :start_pos + seqlen]


class _KeysCachedBeforeRope(S.Attention):
    def rotated_keys_values(self, xk, xv, table, bsz, start_pos, seqlen):
        if not self.kv_caching:
            return rotate(xk, table), xv
        keys, values = self.update_cache(xk, xv, bsz, start_pos, seqlen)  # unrotated keys in the cache
        return torch.cat([keys[:, :start_pos], rotate(xk, table)], dim=1), values


class _RopeNotOffset(S.Transformer):
    def rope_rows(self, start_pos, seqlen):
        return self.table[:seqlen]


class _MaskTopLeft(S.Transformer):
    def causal_mask(self, seqlen, start_pos, device):
        if seqlen == 1:
            return None
        return torch.triu(torch.full((seqlen, start_pos + seqlen), float("-inf"), device=device), diagonal=1)


class _MaskDroppedWithCache(S.Transformer):
    def causal_mask(self, seqlen, start_pos, device):
        return None if start_pos > 0 else super().causal_mask(seqlen, start_pos, device)


class _MaskSeesNextToken(S.Transformer):
    def causal_mask(self, seqlen, start_pos, device):
        if seqlen == 1:
            return None
        return torch.triu(torch.full((seqlen, start_pos + seqlen), float("-inf"), device=device),
                          diagonal=start_pos + 2)


class _UncachedNoMask(S.Transformer):
    def causal_mask(self, seqlen, start_pos, device):
        return super().causal_mask(seqlen, start_pos, device) if self.layers[0].attention.kv_caching else None


# KV mutant → the same bug in Meta-shaped code: (attention class, model class)
META_STYLE = {
    "seed_cache_batch_index": (S.SeedAttention, None),
    "cache_not_sliced_to_bsz": (_NotSlicedToBsz, None),
    "cache_write_ignores_start_pos": (_WritesAtZero, None),
    "cache_wraps_after_8_positions": (_WrapsAfter8, None),
    "keys_cached_before_rope": (_KeysCachedBeforeRope, None),
    "rope_not_offset": (S.Attention, _RopeNotOffset),
    "mask_top_left": (S.Attention, _MaskTopLeft),
    "mask_dropped_with_cache": (S.Attention, _MaskDroppedWithCache),
    "mask_sees_next_token": (S.Attention, _MaskSeesNextToken),
    "uncached_forward_no_mask": (S.Attention, _UncachedNoMask),
}
# Not bugs a Meta-style model can carry: the generation loop is verify's own for such targets, and the seed-style
# model has no SDPA path.
ELSEWHERE = {"uncached_generate_new_tokens_only", "cached_generate_start_pos_zero", "sdpa_is_causal"}


def test_every_kv_mutant_has_a_meta_style_twin_or_a_reason():
    assert set(META_STYLE) | ELSEWHERE == {m.name for m in mutants_for("kv_cache")}
    assert not set(META_STYLE) & ELSEWHERE


@pytest.mark.parametrize("name", list(META_STYLE))
def test_each_is_caught_through_the_meta_style_adapter(name):
    attention_cls, model_cls = META_STYLE[name]
    result = check_kv_cache(S.make(attention_cls, model_cls))
    assert not result.ok, f"{name} not caught on the Meta-style model: {result}"


def test_the_fixed_model_passes_the_same_check():
    assert check_kv_cache(S.make(S.Attention)).ok
