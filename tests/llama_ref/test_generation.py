"""Meta's generation algorithm: ragged prompts, stop tokens, log-probabilities, sampling, and bad input."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from llama_ref.args import ModelArgs
from llama_ref.formats.meta import save_checkpoint
from llama_ref.default import default_model, default_tokenizer
from llama_ref.generation import SEED_PROMPTS, Llama, sample_top_p
from llama_ref.model import Transformer, init_weights
from llama_ref.tokenizer import default_tokenizer_path
from verify.strategies import seeds
from verify.tolerances import tolerance


@dataclass(frozen=True)
class Vocab:
    n_words: int
    stop_tokens: frozenset = frozenset()


def _llm(stop_tokens=frozenset(), **overrides) -> Llama:
    model = default_model(0, **overrides).eval()
    return Llama(model, Vocab(model.vocab_size, frozenset(stop_tokens)))  # type: ignore[arg-type]


PROMPTS = [[1, 17, 300, 42, 9, 5], [1, 250], [1, 7, 7, 7]]


@pytest.mark.parametrize("kv_caching", [True, False])
def test_greedy_generation_is_the_argmax_of_a_full_forward_at_every_step(kv_caching):
    llm = _llm()
    out, logprobs = llm.generate(PROMPTS, max_gen_len=5, temperature=0.0, logprobs=True, kv_caching=kv_caching)
    for prompt, toks, lps in zip(PROMPTS, out, logprobs):
        assert len(toks) == len(lps) == 5
        seq = prompt + toks
        with torch.no_grad():
            logits = llm.model(torch.tensor([seq]), 0)[0]  # one cached call from position 0, fresh rows
        log_probs = F.log_softmax(logits, dim=-1)
        for j, tok in enumerate(toks):
            pos = len(prompt) + j  # predicted from position pos - 1
            assert tok == int(logits[pos - 1].argmax())
            assert abs(lps[j] - float(log_probs[pos - 1, tok])) <= tolerance(torch.float32).bound(10.0)


def test_echo_returns_prompt_and_its_logprobs():
    llm = _llm()
    out, lps = llm.generate(PROMPTS, max_gen_len=3, temperature=0.0, logprobs=True, echo=True)
    plain, _ = llm.generate(PROMPTS, max_gen_len=3, temperature=0.0)
    for prompt, toks, lp, gen in zip(PROMPTS, out, lps, plain):
        assert toks == prompt + gen and len(lp) == len(toks)
        assert lp[0] == 0.0  # nothing predicts the first token


def test_generation_stops_at_the_first_stop_token_per_row():
    free, _ = _llm().generate(PROMPTS, max_gen_len=8, temperature=0.0)
    stop = free[0][2]  # a token the first row produces at its third step
    out, _ = _llm(stop_tokens={stop}).generate(PROMPTS, max_gen_len=8, temperature=0.0)
    for row, toks in zip(free, out):
        cut = row.index(stop) if stop in row else len(row)
        assert toks == row[:cut]


def test_prompt_filling_the_context_is_scored_not_extended():
    llm = _llm(max_seq_len=8)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    out, lps = llm.generate(prompt, max_gen_len=4, temperature=0.0, logprobs=True, echo=True)
    assert out == prompt
    with torch.no_grad():
        log_probs = F.log_softmax(llm.model(torch.tensor(prompt), 0)[0], dim=-1)
    expected = [0.0] + [float(log_probs[i - 1, prompt[0][i]]) for i in range(1, 8)]
    torch.testing.assert_close(torch.tensor(lps[0]), torch.tensor(expected))


def test_zero_new_tokens_gives_empty_generations():
    out, _ = _llm().generate(PROMPTS, max_gen_len=0, temperature=0.0)
    assert out == [[], [], []]


def test_generate_restores_the_kv_caching_setting():
    llm = _llm()
    llm.generate(PROMPTS, max_gen_len=2, kv_caching=False, temperature=0.0)
    assert llm.model.kv_caching


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1]] * 9, {}, "9 prompts exceed max_batch_size=8"),
    ([], {}, "no prompts given"),
    ([[1], []], {}, "prompt 1 is empty"),
    ([[1] * 257], {}, "prompt 0 has 257 tokens, more than max_seq_len=256"),
    ([[1, 512]], {}, r"prompt 0 holds token id\(s\) \[512\] outside \[0, 512\)"),
    ([[1]], dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
    ([[1]], dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    ([[1]], dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    ([[1]], dict(max_gen_len=-1), "max_gen_len must be >= 0, got -1"),
])
def test_bad_generate_input_is_a_clear_error(prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _llm().generate(prompts, **{"max_gen_len": 4, **kwargs})


def test_tokenizer_and_model_vocabularies_must_agree():
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the model's vocab_size is 100"):
        Llama(init_weights(Transformer(ModelArgs.preset("tiny", vocab_size=100)), 0), default_tokenizer())


@given(seed=seeds(), top_p=st.floats(0.05, 1.0), vocab=st.integers(2, 50))
def test_top_p_samples_only_from_the_nucleus(seed, top_p, vocab):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(3, vocab, generator=g) * 3, dim=-1)
    picked = sample_top_p(probs, top_p, g)[:, 0]
    for row, tok in zip(probs, picked.tolist()):
        order = row.argsort(descending=True).tolist()
        mass_before = row[order[:order.index(tok)]].sum()
        assert mass_before <= top_p + 1e-6  # the token is inside the smallest set reaching top_p


def test_seeded_sampling_is_reproducible_and_cache_independent():
    llm = _llm()
    runs = [llm.generate(PROMPTS, 6, temperature=0.8, top_p=0.9, kv_caching=kv,
                         generator=torch.Generator().manual_seed(11))[0] for kv in (True, False, True)]
    assert runs[0] == runs[1] == runs[2]


def test_text_completion_on_the_embedded_default():
    llm = Llama.build_default()
    out = llm.text_completion(list(SEED_PROMPTS), max_gen_len=6, temperature=0.0, logprobs=True)
    assert len(out) == 4
    for pred in out:
        assert isinstance(pred["generation"], str) and len(pred["tokens"]) == len(pred["logprobs"]) <= 6


def test_build_from_a_meta_checkpoint_directory_generates_like_the_model_in_memory(tmp_path):
    model = default_model(0).eval()
    save_checkpoint(model, tmp_path)
    built = Llama.build(tmp_path, default_tokenizer_path(), max_seq_len=64, max_batch_size=2)
    assert built.model.params.max_seq_len == 64 and built.model.params.max_batch_size == 2
    prompts = [[1, 5, 9], [1, 80]]
    expected, _ = Llama(model, default_tokenizer()).generate(prompts, 8, temperature=0.0)
    assert built.generate(prompts, 8, temperature=0.0)[0] == expected
