"""The reference model's building blocks against direct formulas, and the presets' published sizes."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

from llama_ref.args import PRESETS, ModelArgs
from llama_ref.kv_cache import KVCache
from llama_ref.model import (RMSNorm, Transformer, apply_rotary_emb, apply_scaling, attention_math, attention_sdpa,
                             causal_mask, init_weights, precompute_freqs_cis, repeat_kv)
from verify.strategies import model_args, seeds, token_batches
from verify.tolerances import implementation_tolerance, tolerance

assert_close = torch.testing.assert_close


def _params(args: ModelArgs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(args).parameters())


def test_llama32_1b_untied_parameter_count_matches_the_seed_report():
    assert _params(ModelArgs.preset("llama-3.2-1b")) == 1_498_482_688


def test_llama32_1b_tied_drops_exactly_the_output_matrix():
    assert _params(ModelArgs.preset("llama-3.2-1b", tie_embeddings=True)) == 1_498_482_688 - 128256 * 2048


@pytest.mark.parametrize("name, hidden, params", [
    # FFN sizes and counts from the published checkpoints (Meta's params.json + its FFN formula).
    ("llama-2-7b", 11008, 6_738_415_616),
    ("llama-3.2-1b", 8192, 1_498_482_688),
    ("llama-3.2-3b", 8192, 3_606_752_256),
    ("llama-3.1-8b", 14336, 8_030_261_248),
])
def test_published_presets_have_the_published_sizes(name, hidden, params):
    args = ModelArgs.preset(name)
    assert args.ffn_hidden_dim == hidden
    assert _params(args) == params


def test_llama32_presets_scale_rope_by_32_and_llama31_by_8():
    assert ModelArgs.preset("llama-3.2-1b").rope_scale_factor == 32.0
    assert ModelArgs.preset("llama-3.1-8b").rope_scale_factor == 8.0


def test_from_json_reads_meta_params_and_defaults_the_scale_factor_to_8(tmp_path):
    # Meta's Llama 3.2 1B params.json: use_scaled_rope without a factor, so Meta's loader uses 8.
    meta = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
            "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    path = tmp_path / "params.json"
    path.write_text(json.dumps(meta))
    args = ModelArgs.from_json(path, max_seq_len=64)
    assert args.rope_scale_factor == 8.0 and args.max_seq_len == 64 and args.ffn_hidden_dim == 8192


def test_llama2_params_without_rope_theta_use_10000(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                                "vocab_size": -1}))
    assert ModelArgs.from_json(path).rope_theta == 10000.0


def test_from_json_names_an_unknown_key(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "rope_scaling": 8}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'rope_scaling'"):
        ModelArgs.from_json(path)


@pytest.mark.parametrize("changes, message", [
    (dict(dim=65, n_heads=4), "dim=65 is not divisible by n_heads=4"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(dim=12, n_heads=4, n_kv_heads=4), "head_dim = dim / n_heads = 3 must be even"),
    (dict(n_layers=0), "n_layers must be a positive int, got 0"),
    (dict(max_seq_len=-1), "max_seq_len must be a positive int"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(norm_eps=0.0), "norm_eps must be a positive finite number"),
    (dict(attn_impl="flash"), "attn_impl must be 'math', 'sdpa' or 'flex'"),
])
def test_invalid_args_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.preset("tiny", **changes)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'llama-9'.*tiny"):
        ModelArgs.preset("llama-9")


def test_every_preset_is_valid_and_round_trips_through_params_json(tmp_path):
    for name in PRESETS:
        args = ModelArgs.preset(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(args.to_params_json()))
        again = ModelArgs.from_json(path, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size)
        assert again == args, name


@given(seed=seeds(), shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.sampled_from([8, 64])))
def test_rmsnorm_matches_its_formula_in_float64(seed, shape):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    norm = RMSNorm(shape[-1], eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g, dtype=torch.float64))
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_rmsnorm_reduces_in_fp32_for_half_inputs():
    # Values whose squares overflow fp16 (max 65504): only an fp32 reduction gets a finite answer.
    x = torch.full((1, 16), 300.0)
    out = RMSNorm(16).half()(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_close(out.float(), torch.ones(1, 16), **tolerance(torch.float16)._asdict())


@given(seed=seeds(), start=st.integers(0, 20), n_heads=st.sampled_from([1, 4]), head_dim=st.sampled_from([2, 8, 16]),
       scaled=st.booleans())
def test_rope_rotates_each_interleaved_pair_by_position_times_frequency(seed, start, n_heads, head_dim, scaled):
    seqlen, theta = 5, 10000.0
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(2, seqlen, n_heads, head_dim, generator=g)
    xk = torch.randn(2, seqlen, 1, head_dim, generator=g)
    freqs_cis = precompute_freqs_cis(head_dim, 32, theta, use_scaled=scaled, scale_factor=32.0)[start:start + seqlen]
    q_out, k_out = apply_rotary_emb(xq, xk, freqs_cis)

    # Direct formula in float64: pair (x[2k], x[2k+1]) rotated by angle pos·θ_k.
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaled:
        freqs = apply_scaling(freqs, 32.0)
    angle = torch.arange(start, start + seqlen, dtype=torch.float64)[:, None] * freqs  # (T, Dh/2)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rotate(x):
        x = x.double()
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    bound = implementation_tolerance("rope_rotation")._asdict()
    assert_close(q_out.double(), rotate(xq), **bound)
    assert_close(k_out.double(), rotate(xk), **bound)


def test_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
    freqs = torch.tensor([1.0, 2 * math.pi / 20000.0, 2 * math.pi / 100.0])
    scaled = apply_scaling(freqs, 32.0)
    assert_close(scaled, torch.tensor([1.0, 2 * math.pi / 20000.0 / 32, 2 * math.pi / 100.0]))
    mid = torch.tensor([2 * math.pi / 4096.0])  # wavelength 4096: half-way blend (smooth = 1.0)
    smooth = (8192 / 4096 - 1) / (4 - 1)
    assert_close(apply_scaling(mid, 8.0), (1 - smooth) * mid / 8 + smooth * mid)


@given(seed=seeds(), n_rep=st.integers(1, 4))
def test_repeat_kv_is_repeat_interleave(seed, n_rep):
    x = torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(repeat_kv(x, n_rep), torch.repeat_interleave(x, dim=2, repeats=n_rep))


@given(q_len=st.integers(1, 6), extra=st.integers(0, 6))
def test_causal_mask_is_bottom_right_aligned(q_len, extra):
    kv_len = q_len + extra
    mask = causal_mask(q_len, kv_len, torch.device("cpu"))
    expected = torch.tensor([[j <= extra + i for j in range(kv_len)] for i in range(q_len)])
    visible = torch.ones(1, kv_len, dtype=torch.bool) if mask is None else mask == 0  # None: one query sees all
    assert (mask is None) == (q_len == 1)
    assert torch.equal(visible, expected)


@given(args=model_args(), seed=seeds(), data=st.data())
def test_forward_shapes_and_float32_logits(args, seed, data):
    model = init_weights(Transformer(args), seed)
    tokens = data.draw(token_batches(args))
    logits = model(tokens, 0)
    assert logits.shape == (*tokens.shape, args.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@given(seed=seeds(), q_len=st.integers(1, 6), extra=st.integers(0, 6), n_rep=st.sampled_from([1, 2]))
def test_sdpa_path_equals_the_math_path(seed, q_len, extra, n_rep):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, 8, generator=g)
    k = torch.randn(2, 4, q_len + extra, 8, generator=g)
    v = torch.randn(2, 4, q_len + extra, 8, generator=g)
    mask = causal_mask(q_len, q_len + extra, q.device)
    assert_close(attention_sdpa(q, k, v, mask), attention_math(q, k, v, mask), **tolerance(torch.float32)._asdict())


@given(args=model_args(attn_impl="math"), seed=seeds(), data=st.data())
def test_sdpa_model_equals_math_model(args, seed, data):
    tokens = data.draw(token_batches(args))
    math_model = init_weights(Transformer(args), seed)
    sdpa_model = init_weights(Transformer(args.replace(attn_impl="sdpa")), seed)
    bound = implementation_tolerance("sdpa_vs_math_logits")._asdict()
    assert_close(sdpa_model(tokens, 0), math_model(tokens, 0), **bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_backward_in_each_dtype(dtype):
    model = init_weights(Transformer(ModelArgs.preset("tiny", kv_caching=False)), 0).to(dtype)
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = model(tokens, 0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_training_through_the_cache_gives_the_uncached_gradients():
    args = ModelArgs.preset("tiny")
    tokens = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    grads = {}
    for caching in (True, False):
        model = init_weights(Transformer(args.replace(kv_caching=caching)), 3)
        model(tokens, 0).logsumexp(-1).sum().backward()
        grads[caching] = {n: p.grad for n, p in model.named_parameters()}
        assert not any(b.requires_grad for b in model.buffers())  # no graph kept in the cache
    for name in grads[False]:
        assert_close(grads[True][name], grads[False][name], msg=name)


def test_kv_cache_is_state_not_parameters():
    model = Transformer(ModelArgs.preset("tiny"))
    assert not any("cache" in k for k in model.state_dict())
    cache = model.layers[0].attention.kv_cache
    assert isinstance(cache, KVCache) and cache.cache_k.numel() == 0  # nothing allocated until the first cached call
    model.kv_caching = False
    assert all(layer.attention.kv_cache is None for layer in model.layers)  # off: the caches are gone, memory freed
    model(torch.zeros(1, 3, dtype=torch.long), 0)
    model.kv_caching = True
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), 0)
    attn = model.layers[0].attention
    assert attn.kv_cache.cache_k.shape == (8, 256, 2, 16)  # (max_batch, max_seq, n_kv_heads, head_dim)
    assert model.to(torch.bfloat16).layers[0].attention.kv_cache.cache_k.dtype == torch.bfloat16  # moves with it


def test_kv_caching_setter_does_not_reach_other_models_built_from_the_same_args():
    args = ModelArgs.preset("tiny")
    a, b = Transformer(args), Transformer(args)
    a.kv_caching = False
    assert b.kv_caching and args.kv_caching and all(layer.attention.kv_cache is not None for layer in b.layers)


def test_the_cache_class_is_injected_and_kept_across_the_switch():
    class Counting(KVCache):
        writes = 0

        def update(self, xk, xv, start_pos):
            Counting.writes += 1
            return super().update(xk, xv, start_pos)

    model = init_weights(Transformer(ModelArgs.preset("tiny", n_layers=2), kv_cache_cls=Counting), 0)
    model.kv_caching = False
    model.kv_caching = True
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), 0)
    assert all(type(layer.attention.kv_cache) is Counting for layer in model.layers) and Counting.writes == 2


def test_positions_beyond_max_seq_len_and_oversized_batches_are_clear_errors():
    model = Transformer(ModelArgs.preset("tiny", max_seq_len=8, max_batch_size=2))
    with pytest.raises(ValueError, match="positions 5..9 outside max_seq_len=8"):
        model(torch.zeros(1, 5, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="batch of 3 exceeds max_batch_size=2"):
        model(torch.zeros(3, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="vocab_size is -1"):
        Transformer(ModelArgs.preset("tiny", vocab_size=-1))


def test_init_weights_is_seeded_and_leaves_the_global_rng_alone():
    args = ModelArgs.preset("tiny")
    a, b = Transformer(args), Transformer(args)  # nn.Linear's own init draws from the global RNG; ours must not
    state = torch.get_rng_state()
    a, b = init_weights(a, 5), init_weights(b, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    layer = a.layers[0]
    assert not torch.equal(layer.attention.wq.weight, layer.attention.wo.weight)  # same shape, different draws
    assert not torch.equal(layer.feed_forward.w1.weight, layer.feed_forward.w3.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_model_rotates_long_positions_with_an_fp32_table(dtype):
    # Llama 3.2's RoPE (theta 5e5, scaled by 32) near position 8k, where angles t·θ formed in bf16 are off by whole
    # radians (measured: 3.0 rad at 8188-8191); in fp32 they are off by a few fp32 ulps of t.
    args = ModelArgs.preset("llama-3.2-1b", dim=128, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32,
                            max_batch_size=1, max_seq_len=8192)
    half, exact = Transformer(args).to(dtype), Transformer(args).double()
    start, cpu = args.max_seq_len - 4, torch.device("cpu")
    table = half.rotary_freqs(start, 4, cpu, dtype)
    ref = exact.rotary_freqs(start, 4, cpu, torch.float64)
    err = float((table.to(torch.complex128) / ref).angle().abs().max())
    bound = 4 * torch.finfo(torch.float32).eps * (args.max_seq_len - 1)  # fp32 rounding of t·θ with θ <= 1
    assert table.dtype == torch.complex64 and err <= bound, (err, bound)
