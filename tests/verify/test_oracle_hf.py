"""verify.oracle_hf: our weights in transformers' LlamaForCausalLM give the same logits and the same greedy tokens."""
from __future__ import annotations

import functools
import socket
import sys

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("transformers", reason="the transformers oracle needs `pip install llama-verify[test]`")

from llama_ref.args import ModelArgs  # noqa: E402
from llama_ref.model import (Transformer, apply_rotary_emb, apply_scaling, init_weights,  # noqa: E402
                             precompute_freqs_cis)
from verify import oracle_hf  # noqa: E402
from verify.tolerances import implementation_tolerance  # noqa: E402
from verify.oracle_hf import (build_hf_model, check_rope_frequencies, from_hf_state_dict, hf_config,  # noqa: E402
                              hf_logits, permute_rotary, rope_inv_freq, to_hf_state_dict, unpermute_rotary)

# fp32 on CPU, two independent implementations: the bound and its measurement are in verify/tolerances.py.
assert_logits_close = functools.partial(torch.testing.assert_close, **implementation_tolerance("hf_logits")._asdict())
MAX_SEQ_LEN = 48
# Largest |ours - transformers| seen by this session's logits test (the reply quotes it; -s prints it).
_OBSERVED: dict[str, float] = {"max_abs": 0.0, "examples": 0}


@st.composite
def small_args(draw) -> ModelArgs:
    """A small random Llama: GQA or MHA, scaled RoPE or not, tied or not; dim ≤ 128, vocab ≤ 512, ≤ 3 layers."""
    n_heads = draw(st.sampled_from([1, 2, 4, 8]))
    head_dim = draw(st.sampled_from([h for h in (8, 16, 32) if n_heads * h <= 128]))
    n_kv_heads = draw(st.sampled_from([k for k in (1, 2, 4, 8) if n_heads % k == 0]))
    return ModelArgs(
        dim=n_heads * head_dim, n_layers=draw(st.integers(1, 3)), n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=draw(st.integers(16, 512)), multiple_of=draw(st.sampled_from([16, 32])),
        ffn_dim_multiplier=draw(st.sampled_from([None, 1.3, 1.5])), norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        # θ ≥ 10000 with Dh ≥ 8 puts the slowest frequencies' wavelengths above 2048 = 8192/4: scaling changes them.
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])), use_scaled_rope=draw(st.booleans()),
        rope_scale_factor=draw(st.sampled_from([8.0, 32.0])), tie_embeddings=draw(st.booleans()),
        max_batch_size=3, max_seq_len=MAX_SEQ_LEN, kv_caching=False)


def _model(args: ModelArgs, seed: int) -> Transformer:
    return init_weights(Transformer(args), seed).eval()


def _tokens(args: ModelArgs, seed: int, batch: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, args.vocab_size, (batch, seq_len), generator=g)


# ---- the permutation and the key mapping -----------------------------------------------------------------------

@given(n_heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_permute_rotary_is_inverted_by_unpermute(n_heads, half, cols, seed):
    w = torch.randn(n_heads * 2 * half, cols, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpermute_rotary(permute_rotary(w, n_heads), n_heads), w)
    assert torch.equal(permute_rotary(unpermute_rotary(w, n_heads), n_heads), w)


def test_permute_rotary_moves_pair_members_to_halves():
    # One head, Dh = 6: rows 0..5 are pairs (0,1) (2,3) (4,5); rotate-half order is first members, then second.
    w = torch.arange(6.0)[:, None]
    assert permute_rotary(w, 1).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    # Two heads permute independently.
    w2 = torch.arange(8.0)[:, None]
    assert permute_rotary(w2, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_permute_rotary_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_heads=4"):
        permute_rotary(torch.zeros(6, 2), 4)
    with pytest.raises(ValueError, match="head_dim 3"):
        permute_rotary(torch.zeros(6, 2), 2)


@given(seed=st.integers(0, 2**31 - 1), n_heads=st.sampled_from([1, 2, 4]), half=st.sampled_from([1, 2, 4, 8]),
       pos=st.integers(0, 100))
def test_permutation_turns_interleaved_rope_into_rotate_half_rope(seed, n_heads, half, pos):
    """The reason for the permutation: Meta's RoPE of W·x, permuted, equals transformers' RoPE of (permuted W)·x."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = 2 * half
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_heads * head_dim, 5, generator=g)
    x = torch.randn(5, generator=g)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (Dh/2,)
    angles = pos * freqs
    q_meta = (w @ x).view(1, 1, n_heads, head_dim)  # (B, T, H, Dh)
    rotated_meta, _ = apply_rotary_emb(q_meta, q_meta, torch.polar(torch.ones_like(angles), angles)[None])
    emb = torch.cat([angles, angles])[None, None]  # (B, T, Dh)
    q_hf = (permute_rotary(w, n_heads) @ x).view(1, n_heads, 1, head_dim)  # (B, H, T, Dh)
    rotated_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, emb.cos(), emb.sin())
    expected = permute_rotary(rotated_meta.reshape(-1), n_heads)
    torch.testing.assert_close(rotated_hf.reshape(-1), expected, **implementation_tolerance("rope_rotation")._asdict())


@given(args=small_args(), seed=st.integers(0, 2**31 - 1))
def test_state_dict_round_trip_is_exact(args, seed):
    sd = _model(args, seed).state_dict()
    hf_sd = to_hf_state_dict(sd, args)
    assert len(hf_sd) == len(sd)
    back = from_hf_state_dict(hf_sd, args)
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_state_dict_keys_match_transformers_and_unknown_keys_raise():
    args = ModelArgs.preset("tiny", max_seq_len=MAX_SEQ_LEN)
    model = _model(args, 0)
    hf = build_hf_model(model)
    assert set(to_hf_state_dict(model, args)) == set(hf.state_dict())
    with pytest.raises(ValueError, match="'layers.0.attention.wz.weight'"):
        to_hf_state_dict({"layers.0.attention.wz.weight": torch.zeros(1)}, args)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.z_proj.weight'"):
        from_hf_state_dict({"model.layers.0.self_attn.z_proj.weight": torch.zeros(1)}, args)
    # ... and the conversion from transformers' own state dict gives our weights back.
    for key, value in from_hf_state_dict(hf, args).items():
        assert torch.equal(value, model.state_dict()[key]), key


# ---- RoPE configuration ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaled", [False, True])
def test_rope_inv_freq_is_what_the_model_uses(scaled):
    args = ModelArgs.preset("tiny", max_seq_len=MAX_SEQ_LEN, use_scaled_rope=scaled, rope_scale_factor=32.0)
    table = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta, args.use_scaled_rope,
                                 args.rope_scale_factor)  # what Transformer.forward rotates by
    angles = torch.angle(table[1])  # position 1: the frequencies themselves
    torch.testing.assert_close(angles, rope_inv_freq(args), **implementation_tolerance("rope_inv_freq")._asdict())


def test_rope_check_catches_a_config_transformers_ignored():
    scaled = ModelArgs.preset("tiny", max_seq_len=MAX_SEQ_LEN, use_scaled_rope=True, rope_scale_factor=8.0)
    hf = build_hf_model(_model(scaled, 0))
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32
    check_rope_frequencies(hf, scaled)
    with pytest.raises(ValueError, match="RoPE inv_freq"):
        check_rope_frequencies(hf, scaled.replace(use_scaled_rope=False))
    with pytest.raises(ValueError, match="RoPE inv_freq"):
        check_rope_frequencies(hf, scaled.replace(rope_scale_factor=32.0))
    with pytest.raises(ValueError, match="RoPE inv_freq"):
        check_rope_frequencies(hf, scaled.replace(rope_theta=500000.0))


def test_hf_config_fields():
    args = ModelArgs.preset("llama-3.2-1b")
    cfg = hf_config(args)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2048, 8192, 16)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 128256)
    assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings == args.max_seq_len
    assert cfg.eos_token_id is None and cfg.bos_token_id is None
    with pytest.raises(ValueError, match="vocab_size is -1"):
        hf_config(args.replace(vocab_size=-1))


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install llama-verify\[test\]"):
        hf_config(ModelArgs.preset("tiny"))


def test_no_network_is_touched(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    args = ModelArgs.preset("tiny", max_seq_len=MAX_SEQ_LEN, kv_caching=False)
    hf = build_hf_model(_model(args, 0))
    prompt = _tokens(args, 0, 1, 4)
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
                      pad_token_id=0)
    assert out.shape == (1, 6)


# ---- the oracle itself: logits and greedy tokens ---------------------------------------------------------------

_SCALED_GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                   ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=10000.0, use_scaled_rope=True,
                   rope_scale_factor=32.0, tie_embeddings=False, max_batch_size=3, max_seq_len=MAX_SEQ_LEN,
                   kv_caching=False)


@given(args=small_args(), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3),
       seq_len=st.integers(1, MAX_SEQ_LEN))
@example(args=ModelArgs(**_SCALED_GQA), seed=0, batch=2, seq_len=MAX_SEQ_LEN)
@example(args=ModelArgs(**{**_SCALED_GQA, "n_kv_heads": 4, "rope_scale_factor": 8.0, "tie_embeddings": True,
                           "ffn_dim_multiplier": None}), seed=1, batch=1, seq_len=MAX_SEQ_LEN)
def test_logits_equal_transformers(args, seed, batch, seq_len):
    model = _model(args, seed)
    hf = build_hf_model(model)
    tokens = _tokens(args, seed, batch, seq_len)
    with torch.no_grad():
        ours = model(tokens, start_pos=0)
    theirs = hf_logits(hf, tokens)
    _OBSERVED["max_abs"] = max(_OBSERVED["max_abs"], (ours - theirs).abs().max().item())
    _OBSERVED["examples"] += 1
    assert_logits_close(ours, theirs)


def test_scaled_example_really_scales():
    """The explicit @example above exercises the Llama 3.1 band: scaling changes frequencies, and logits."""
    args = ModelArgs(**_SCALED_GQA)
    plain = rope_inv_freq(args.replace(use_scaled_rope=False))
    scaled = apply_scaling(plain, args.rope_scale_factor)
    assert not torch.equal(scaled, plain)
    assert torch.equal(rope_inv_freq(args), scaled)
    # Positions < 48 turn the scaled (slow) frequencies by little (measured gap 1.4e-2), still far above 1e-4.
    model, unscaled = _model(args, 0), _model(args.replace(use_scaled_rope=False), 0)
    tokens = _tokens(args, 0, 2, MAX_SEQ_LEN)
    with torch.no_grad():
        gap = (model(tokens) - unscaled(tokens)).abs().max().item()
    assert gap > 10 * 1e-4, gap


@pytest.mark.parametrize("overrides, seed", [
    ({}, 0),
    ({"n_kv_heads": 4, "use_scaled_rope": False, "tie_embeddings": True}, 1),
    ({"n_heads": 8, "n_kv_heads": 1, "dim": 128, "rope_scale_factor": 8.0, "rope_theta": 500000.0}, 2),
])
def test_greedy_generation_equals_transformers(overrides, seed):
    args = ModelArgs(**{**_SCALED_GQA, **overrides})
    model = _model(args, seed)
    hf = build_hf_model(model)
    prompt = _tokens(args, seed, 1, 5)
    new_tokens = 16

    tokens, margins = prompt, []
    with torch.no_grad():
        for _ in range(new_tokens):  # no cache: the whole sequence every step
            last = model(tokens, start_pos=0)[:, -1]
            top2 = last.topk(2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).min().item())
            tokens = torch.cat([tokens, last.argmax(dim=-1, keepdim=True)], dim=1)

    assert hf.generation_config.eos_token_id is None and not hf.generation_config.min_length
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=0, eos_token_id=None)
    assert theirs.shape == tokens.shape
    diverged = (theirs != tokens).any(dim=0).nonzero()
    if diverged.numel():
        step = diverged[0].item() - prompt.shape[1]
        pytest.fail(f"greedy tokens diverge at new token {step}: ours {tokens[0].tolist()}, transformers "
                    f"{theirs[0].tolist()}; our top-2 margin there {margins[step]:.3g} (a near-tie if < 1e-4)")


@pytest.mark.parametrize("proj, heads", [("q_proj", "n_heads"), ("k_proj", "n_kv_heads")])
def test_oracle_has_teeth_without_the_rotary_permutation(proj, heads):
    """Loading wq (or wk) in Meta's interleaved order, i.e. forgetting the permutation, must fail the check."""
    args = ModelArgs(**_SCALED_GQA)
    model = _model(args, 3)
    hf = build_hf_model(model)
    sd = to_hf_state_dict(model, args)
    n = getattr(args, heads)
    for i in range(args.n_layers):
        key = f"model.layers.{i}.self_attn.{proj}.weight"
        sd[key] = unpermute_rotary(sd[key], n)  # Meta's order
    hf.load_state_dict(sd, strict=True)
    tokens = _tokens(args, 3, 2, 16)
    with torch.no_grad():
        gap = (model(tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert gap > 1e-2, gap
    with pytest.raises(AssertionError):
        assert_logits_close(model(tokens).detach(), hf_logits(hf, tokens))


def teardown_module(module) -> None:
    if _OBSERVED["examples"]:
        print(f"\noracle_hf: max |ours - transformers| logit difference {_OBSERVED['max_abs']:.3g} "
              f"over {_OBSERVED['examples']} examples (transformers {oracle_hf._import_transformers().__version__})")
