"""Hypothesis strategies: model configurations, token batches, ragged prompts, chunkings, seeds.

torch's RNG is not managed by hypothesis: draw a seed with :func:`seeds` and seed a ``torch.Generator`` with it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from hypothesis import strategies as st

from llama_ref.args import ModelArgs


def seeds() -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def model_args(draw: st.DrawFn, *, max_layers: int = 2, max_seq_len: Optional[int] = None,
               max_batch_size: Optional[int] = None, **fixed: Any) -> ModelArgs:
    """Small valid ``ModelArgs``: GQA (``n_kv_heads`` a proper divisor of ``n_heads``) and MHA, even head_dim,
    scaled RoPE on and off (factor 8 or 32, with a theta where the scaled band is reached), tied and untied output,
    both attention paths. ``fixed`` pins any field."""
    n_kv_heads = draw(st.sampled_from([1, 2]))
    n_rep = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv_heads * n_rep
    head_dim = draw(st.sampled_from([8, 16]))
    draw_fields = dict(
        dim=n_heads * head_dim,
        n_layers=draw(st.integers(1, max_layers)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=draw(st.sampled_from([32, 61, 128])),
        multiple_of=draw(st.sampled_from([8, 32])),
        ffn_dim_multiplier=draw(st.sampled_from([None, 1.3])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        # theta 10000 with head_dim 8–16 puts some wavelengths above 8192: the scaling really changes them.
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        use_scaled_rope=draw(st.booleans()),
        rope_scale_factor=draw(st.sampled_from([8.0, 32.0])),
        max_batch_size=max_batch_size or draw(st.integers(1, 4)),
        max_seq_len=max_seq_len or draw(st.integers(8, 40)),
        tie_embeddings=draw(st.booleans()),
        attn_impl=draw(st.sampled_from(["math", "sdpa"])),
    )
    return ModelArgs(**{**draw_fields, **fixed})


@st.composite
def chunkings(draw: st.DrawFn, length: int) -> list[int]:
    """Positive chunk lengths summing to ``length`` (cut points drawn as a sorted subset)."""
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=min(length - 1, 8)))) if length > 1 else []
    bounds = [0, *cuts, length]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@st.composite
def token_batches(draw: st.DrawFn, args: ModelArgs, *, max_len: Optional[int] = None) -> torch.Tensor:
    """(B, L) token ids with 1 ≤ B ≤ max_batch_size and 1 ≤ L ≤ min(max_len, max_seq_len)."""
    bsz = draw(st.integers(1, args.max_batch_size))
    length = draw(st.integers(1, min(max_len or args.max_seq_len, args.max_seq_len)))
    g = torch.Generator().manual_seed(draw(seeds()))
    return torch.randint(0, args.vocab_size, (bsz, length), generator=g)


@st.composite
def ragged_prompts(draw: st.DrawFn, args: ModelArgs, *, max_len: Optional[int] = None) -> list[list[int]]:
    """1 … max_batch_size non-empty prompts of different lengths (each ≤ max_len and < max_seq_len)."""
    bsz = draw(st.integers(1, args.max_batch_size))
    top = min(max_len or args.max_seq_len - 1, args.max_seq_len - 1)
    lens = draw(st.lists(st.integers(1, max(1, top)), min_size=bsz, max_size=bsz))
    token = st.integers(0, args.vocab_size - 1)
    return [draw(st.lists(token, min_size=n, max_size=n)) for n in lens]
