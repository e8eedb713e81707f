"""Property 1 (DESIGN §3.1) with hypothesis: cached ≡ uncached, over configs, chunkings, batch sizes and prompts."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, strategies as st

from llama_ref.args import ModelArgs
from llama_ref.generation import Llama
from llama_ref.kv_cache import KVCache
from llama_ref.model import Transformer, init_weights
from verify.checks.kv_cache import check_kv_cache, describe_chunking, random_chunking
from verify.strategies import chunkings, model_args, ragged_prompts, seeds


@st.composite
def kv_cases(draw: st.DrawFn):
    args = draw(model_args(max_seq_len=draw(st.integers(16, 32))))
    bsz = draw(st.integers(1, args.max_batch_size))
    length = draw(st.integers(8, args.max_seq_len // 2))  # verify.checks.kv_cache.MIN_POSITIONS
    g = torch.Generator().manual_seed(draw(seeds()))
    tokens = torch.randint(0, args.vocab_size, (bsz, length), generator=g)
    chunks = [draw(chunkings(length)) for _ in range(2)] + [[1, length - 1]]  # a several-token chunk at 1
    batch_sizes = sorted(set(draw(st.lists(st.integers(1, bsz), min_size=1, max_size=3))), reverse=True)
    prompts = draw(ragged_prompts(args, max_len=length))
    return args, tokens, chunks, batch_sizes, prompts


@given(case=kv_cases(), seed=seeds())
def test_cached_equals_uncached(case, seed):
    args, tokens, chunks, batch_sizes, prompts = case
    model = init_weights(Transformer(args), seed)
    result = check_kv_cache(model, tokens, chunkings=chunks, batch_sizes=batch_sizes, prompts=prompts,
                            max_gen_len=6, seed=seed)
    assert result.verdict == "PASS", str(result)


def test_check_leaves_the_model_as_it_found_it():
    model = init_weights(Transformer(ModelArgs.preset("tiny", kv_caching=False)), 0).train()
    assert check_kv_cache(model, seed=0).ok
    assert model.training and not model.kv_caching


class _Exploding(KVCache):
    def update(self, xk, xv, start_pos):
        raise RuntimeError("cache exploded")


def test_a_crash_in_the_model_is_a_failure_that_names_the_error():
    model = init_weights(Transformer(ModelArgs.preset("tiny")), 0)
    result = check_kv_cache(model, seed=0, cache_cls=_Exploding)
    # The place named is the implementation's own frame (here this file's KVCache subclass), not torch's or ours.
    assert not result.ok and result.error.startswith("RuntimeError: cache exploded (at test_kv_cache.py:")
    assert result.error.endswith(" in update)")
    assert model.kv_cache_cls is KVCache and type(model.layers[0].attention.kv_cache) is KVCache  # restored


def _nudged(size: float) -> type[Llama]:
    """A generator whose cached decode path favours higher token ids by ``size``·id, as a rounding difference would."""
    class Nudged(Llama):
        def step_logits(self, tokens, prev_pos, cur_pos, kv_caching):
            logits = super().step_logits(tokens, prev_pos, cur_pos, kv_caching)
            return logits + size * torch.arange(logits.shape[-1]) if kv_caching else logits
    return Nudged


def test_divergence_at_a_genuine_tie_is_excused_and_reported():
    # Output rows all zero but two equal ones: the top of every step is an exact tie, which the nudge breaks the
    # other way in the cached path.
    model = init_weights(Transformer(ModelArgs.preset("tiny", n_layers=1)), 0)
    with torch.no_grad():
        model.output.weight[2:].zero_()
        model.output.weight[1] = model.output.weight[0]
    result = check_kv_cache(model, seed=0, max_gen_len=4, generator_cls=_nudged(1e-9))
    assert result.ok, str(result)
    assert any(d.startswith("tie: generate row") for d in result.details), result.details


def test_divergence_without_a_tie_fails():
    model = init_weights(Transformer(ModelArgs.preset("tiny", n_layers=1)), 0)
    # 25 logits' worth at the top of the vocabulary: a real change
    result = check_kv_cache(model, seed=0, max_gen_len=4, generator_cls=_nudged(0.05))
    assert not result.ok and any("not a tie" in d for d in result.details), result.details


def test_invalid_chunkings_and_batch_sizes_are_clear_errors():
    model = init_weights(Transformer(ModelArgs.preset("tiny")), 0)
    tokens = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"chunking \[2, 3\] does not split a length of 6"):
        check_kv_cache(model, tokens, chunkings=[[2, 3]])
    with pytest.raises(ValueError, match=r"batch sizes \[3\] exceed the 2 rows"):
        check_kv_cache(model, tokens, batch_sizes=[3])


@given(length=st.integers(1, 40), seed=seeds())
@example(length=1, seed=0)
def test_random_chunking_splits_the_length(length, seed):
    c = random_chunking(length, torch.Generator().manual_seed(seed))
    assert sum(c) == length and min(c) >= 1


def test_describe_chunking():
    assert describe_chunking([1, 1, 1, 4, 4, 2]) == "1x3+4x2+2"


class _CountingCache(KVCache):
    """llama_ref's cache, counting its updates (class-wide: every layer's)."""

    updates = 0

    def update(self, xk, xv, start_pos):
        type(self).updates += 1
        return super().update(xk, xv, start_pos)


def test_llama_refs_uncached_path_never_touches_the_cache():
    # The reference side of every comparison: were it to read or write the cache, both sides would share every
    # cache bug. Poisoned cache rows change nothing, and not one update is made while uncached.
    from verify.targets.llama_ref import LlamaRefTarget
    model = init_weights(Transformer(ModelArgs.preset("tiny", max_batch_size=2, max_seq_len=32)), 0)
    target = LlamaRefTarget(model, cache_cls=_CountingCache)
    tokens = torch.randint(0, model.params.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with target.kv_session():
        clean = target.logits(tokens, 0, kv_caching=False)
        target.logits(torch.randint(0, model.params.vocab_size, (2, 20)), 0, kv_caching=True)  # the poison
        _CountingCache.updates = 0
        assert torch.equal(target.logits(tokens, 0, kv_caching=False), clean)
        generated = target.generate([[1, 5, 9], [1, 7]], 4, kv_caching=False)
    assert _CountingCache.updates == 0 and len(generated[0][0]) == 4


def test_a_mask_lost_inside_a_cached_chunk_is_caught_where_only_its_earlier_positions_are_wrong():
    # One layer: a chunk at start_pos > 0 attended without its causal mask is wrong at every position but its last
    # (the last token may see the whole chunk); nothing carries the error to the last position. A check comparing
    # each chunk's last (next-token) logits only would pass it.
    from llama_ref.default import default_model
    from verify.mutants import inject
    model = default_model(0, n_layers=1).eval()
    tokens = torch.randint(0, model.params.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with inject("mask_dropped_with_cache") as m, torch.no_grad():
        model.kv_caching = False
        whole = model(tokens, 0)
        model.kv_caching = True
        model(tokens[:, :4], 0)
        chunk = model(tokens[:, 4:8], 4)  # positions 4-7, cached, no mask
        model.kv_caching = False
        assert torch.allclose(chunk[0, -1], whole[0, 7], atol=1e-5)  # the premise: the last position is right
        assert not torch.allclose(chunk[0, :-1], whole[0, 4:7], atol=1e-2)  # and the earlier ones are not
        result = check_kv_cache(model, tokens, chunkings=[[4, 4, 4]], batch_sizes=[1], **m.components)
    assert not result.ok and "chunks=4x3" in result.details[0], str(result)


def test_an_uncached_path_without_its_mask_is_named_as_the_wrong_side():
    # Against a reference that lets every token see the future, the cache looks broken; the causality claim on the
    # uncached path says which side is wrong.
    from llama_ref.default import default_model
    from verify.mutants import inject
    with inject("uncached_forward_no_mask") as m:
        result = check_kv_cache(default_model(0, n_layers=1), batch_sizes=[1], **m.components)
    assert not result.ok and result.details[0].startswith("the uncached path is not causal: logits at positions "
                                                          "0-11 changed when only the tokens at 12-23 did"), result
