"""Tests for llama_ref/tokenizer.py: the shipped SentencePiece model, a SentencePiece model trained here, a small
tiktoken BPE file written here, and bad inputs."""

from __future__ import annotations

import base64
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import tiktoken  # part of the test extras: the Llama 3 path must be tested, not skipped
from hypothesis import given
from hypothesis import strategies as st

from llama_ref.tokenizer import (
    LLAMA3_PAT_STR,
    MAX_NO_WHITESPACES_CHARS,
    TIKTOKEN_MAX_ENCODE_CHARS,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    default_tokenizer_path,
    split_long_runs,
)

REPO = Path(__file__).resolve().parents[2]

# The four prompts of Meta's example_text_completion.py, in the shipped corpus's vocabulary.
PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    "A brief message congratulating the team on the launch:\n\nHi everyone,\n\nI just ",
    "Translate English to French:\n\nsea otter => loutre de mer\npeppermint => menthe poivrée\n"
    "plush girafe => girafe peluche\ncheese =>",
]

# SentencePiece writes a space as U+2581 "▁", so that character cannot survive a round trip; everything else does.
SP_ROUND_TRIP_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\u2581"))


@pytest.fixture(scope="module")
def default_tok() -> Tokenizer:
    return Tokenizer(default_tokenizer_path())


# --- the shipped default model ---------------------------------------------------------------------------------


def test_default_model_metadata(default_tok):
    assert isinstance(default_tok, Tokenizer)
    assert isinstance(default_tok, SentencePieceTokenizer)
    assert default_tok.kind == "sentencepiece"
    assert (default_tok.n_words, default_tok.bos_id, default_tok.eos_id, default_tok.pad_id) == (512, 1, 2, -1)
    assert default_tok.stop_tokens == {2}
    assert default_tok.model_path == default_tokenizer_path()
    assert default_tokenizer_path().stat().st_size < 300_000


@pytest.mark.parametrize("prompt", PROMPTS, ids=["life", "relativity", "rocket", "french"])
def test_default_model_round_trips_prompts(default_tok, prompt):
    ids = default_tok.encode(prompt, bos=True, eos=True)
    assert ids[0] == default_tok.bos_id and ids[-1] == default_tok.eos_id
    assert 0 not in ids, "a prompt character fell back to <unk>"
    assert default_tok.decode(ids) == prompt
    assert default_tok.encode(prompt, bos=False, eos=False) == ids[1:-1]


@given(SP_ROUND_TRIP_TEXT)
def test_default_model_round_trips_any_text(default_tok, s):
    ids = default_tok.encode(s, bos=False, eos=False)
    assert all(0 <= i < default_tok.n_words for i in ids)
    assert 0 not in ids  # byte fallback: nothing is unknown
    assert default_tok.decode(ids) == s


def test_default_model_space_marker_decodes_as_space(default_tok):
    # The one documented exception to the round trip: U+2581 is SentencePiece's own space symbol.
    assert default_tok.decode(default_tok.encode("a\u2581b", bos=False, eos=False)) == "a b"


def _load_make_tokenizer():
    spec = importlib.util.spec_from_file_location("make_tokenizer", REPO / "scripts" / "make_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_model_matches_a_fresh_training():
    make_tokenizer = _load_make_tokenizer()
    if spm.__version__ != make_tokenizer.SENTENCEPIECE_VERSION:
        pytest.skip(f"the shipped model was trained with sentencepiece {make_tokenizer.SENTENCEPIECE_VERSION}, "
                    f"this is {spm.__version__}: another version may train a different, equally valid model")
    assert make_tokenizer.train() == default_tokenizer_path().read_bytes(), (
        "llama_ref/assets/tokenizer.model is stale: run python scripts/make_tokenizer.py"
    )


# --- a SentencePiece model trained here ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> Path:
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7} times." for i in range(200)]
    path = tmp_path_factory.mktemp("sp") / "small.model"
    with path.open("wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, model_type="bpe", vocab_size=300, byte_fallback=True,
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, normalization_rule_name="identity",
            remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
        )
    return path


@pytest.fixture(scope="module")
def sp_tok(sp_path) -> Tokenizer:
    return Tokenizer(sp_path)


def test_trained_sentencepiece_metadata(sp_tok, sp_path):
    assert type(sp_tok) is SentencePieceTokenizer
    assert (sp_tok.kind, sp_tok.n_words, sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == ("sentencepiece", 300, 1, 2, 3)
    assert sp_tok.stop_tokens == {2}
    assert repr(sp_tok) == f"SentencePieceTokenizer({str(sp_path)!r}, n_words=300)"
    assert Tokenizer(str(sp_path)).model_path == sp_path  # a str path works too
    # direct construction gives the same tokenizer as the factory
    direct = SentencePieceTokenizer(sp_path)
    assert direct.encode("the lazy dog", bos=True, eos=False) == sp_tok.encode("the lazy dog", bos=True, eos=False)


@given(SP_ROUND_TRIP_TEXT)
def test_trained_sentencepiece_round_trips(sp_tok, s):
    assert sp_tok.decode(sp_tok.encode(s, bos=False, eos=False)) == s


# --- a tiktoken BPE file written here --------------------------------------------------------------------------

# Merges in rank order; each token's parts have lower ranks, as BPE requires.
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ng", b"ing", b" a", b"er", b"\n\n"]


def _ranks(merges: list[bytes]) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for token in merges:
        ranks[token] = len(ranks)
    return ranks


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


@pytest.fixture(scope="module")
def tt_path(tmp_path_factory) -> Path:
    return _write_ranks(tmp_path_factory.mktemp("tiktoken") / "tokenizer.model", _ranks(MERGES))


@pytest.fixture(scope="module")
def tt_tok(tt_path) -> Tokenizer:
    return Tokenizer(tt_path)


N_RANKS = 256 + len(MERGES)


def test_tiktoken_metadata(tt_tok):
    assert isinstance(tt_tok, Tokenizer)
    assert type(tt_tok) is TiktokenTokenizer
    assert tt_tok.kind == "tiktoken"
    assert tt_tok.n_words == N_RANKS + 256
    assert (tt_tok.bos_id, tt_tok.eos_id, tt_tok.pad_id) == (N_RANKS, N_RANKS + 1, N_RANKS + 4)
    assert tt_tok.stop_tokens == {N_RANKS + 1, N_RANKS + 8, N_RANKS + 9}  # end_of_text, eom, eot
    assert (tt_tok.eom_id, tt_tok.eot_id) == (N_RANKS + 8, N_RANKS + 9)


def test_tiktoken_special_token_ids(tt_tok):
    specials = tt_tok.special_tokens
    assert sorted(specials.values()) == list(range(N_RANKS, N_RANKS + 256))
    assert specials["<|start_header_id|>"] == N_RANKS + 6
    assert specials["<|end_header_id|>"] == N_RANKS + 7
    assert specials["<|python_tag|>"] == N_RANKS + 10
    assert specials["<|reserved_special_token_2|>"] == N_RANKS + 11
    assert specials["<|reserved_special_token_246|>"] == N_RANKS + 255


def test_tiktoken_encode_applies_merges_and_bos_eos(tt_tok):
    ranks = _ranks(MERGES)
    assert tt_tok.encode(" the", bos=False, eos=False) == [ranks[b" the"]]
    assert tt_tok.encode("thing", bos=False, eos=False) == [ranks[b"th"], ranks[b"ing"]]
    ids = tt_tok.encode("the end", bos=True, eos=True)
    assert ids[0] == tt_tok.bos_id and ids[-1] == tt_tok.eos_id
    assert tt_tok.decode(ids[1:-1]) == "the end"


@given(st.text())
def test_tiktoken_round_trips_any_text(tt_tok, s):
    ids = tt_tok.encode(s, bos=False, eos=False)
    assert all(0 <= i < N_RANKS for i in ids)
    assert tt_tok.decode(ids) == s


@pytest.mark.parametrize("special", ["<|eot_id|>", "<|begin_of_text|>", "<|reserved_special_token_7|>"])
def test_tiktoken_special_token_text_is_plain_text(tt_tok, special):
    ids = tt_tok.encode(f"say {special} now", bos=False, eos=False)
    assert all(i < N_RANKS for i in ids), "special-token text was encoded as the special token"
    assert tt_tok.decode(ids) == f"say {special} now"
    assert tt_tok.decode([tt_tok.special_tokens[special]]) == special


def test_tiktoken_long_runs_round_trip(tt_tok):
    s = "a" * (2 * MAX_NO_WHITESPACES_CHARS + 3) + " " * (MAX_NO_WHITESPACES_CHARS + 1) + "the end"
    assert tt_tok.decode(tt_tok.encode(s, bos=False, eos=False)) == s


class _RecordingEncoding:
    def __init__(self, encoding):
        self.encoding, self.pieces = encoding, []

    def encode(self, text, **kwargs):
        self.pieces.append(text)
        return self.encoding.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.encoding, name)


def test_tiktoken_encodes_long_inputs_in_bounded_pieces(tt_path):
    tok = Tokenizer(tt_path)
    tok.model = recorder = _RecordingEncoding(tok.model)
    s = "x" * (MAX_NO_WHITESPACES_CHARS + 1) + " ab" * (TIKTOKEN_MAX_ENCODE_CHARS // 3) + " end"
    ids = tok.encode(s, bos=False, eos=False)
    assert "".join(recorder.pieces) == s
    assert max(map(len, recorder.pieces)) <= TIKTOKEN_MAX_ENCODE_CHARS
    assert "x" * (MAX_NO_WHITESPACES_CHARS + 1) not in "|".join(recorder.pieces)
    assert tok.decode(ids) == s


@given(st.text(alphabet=st.sampled_from("ab \n\t")), st.integers(1, 5))
def test_split_long_runs_bounds_runs_and_keeps_text(s, max_run):
    pieces = list(split_long_runs(s, max_run))
    assert "".join(pieces) == s
    assert all(pieces)
    for piece in pieces:
        run = 1
        for prev, ch in zip(piece, piece[1:]):
            run = run + 1 if prev.isspace() == ch.isspace() else 1
            assert run <= max_run, (piece, max_run)


def test_tiktoken_file_rewritten_at_same_path_is_reloaded(tmp_path):
    # tiktoken.load.load_tiktoken_bpe caches by path; the tokenizer must read the file as it is now.
    path = _write_ranks(tmp_path / "tokenizer.model", _ranks(MERGES[:2]))
    assert Tokenizer(path).n_words == 258 + 256
    _write_ranks(path, _ranks(MERGES))
    assert Tokenizer(path).n_words == N_RANKS + 256


def test_tiktoken_missing_package_names_the_extra(tt_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` raise ImportError
    with pytest.raises(ImportError, match=r"pip install llama-verify\[llama3\]"):
        Tokenizer(tt_path)


def test_tiktoken_rejects_inconsistent_ranks(tmp_path):
    gap = _ranks(MERGES)
    gap[b"er"] = 10_000
    with pytest.raises(ValueError, match="ranks must be"):
        Tokenizer(_write_ranks(tmp_path / "gap.model", gap))
    no_byte = {t: r for t, r in _ranks(MERGES).items() if t != b"\xff"}
    no_byte = {t: i for i, t in enumerate(no_byte)}
    with pytest.raises(ValueError, match="single bytes have no rank"):
        Tokenizer(_write_ranks(tmp_path / "nobyte.model", no_byte))


def test_encoding_is_the_same_as_tiktoken_itself(tt_tok):
    plain = tiktoken.Encoding(name="plain", pat_str=LLAMA3_PAT_STR, mergeable_ranks=_ranks(MERGES),
                              special_tokens={})
    text = "the thing, in the end: 3 + 4 = 7\n\nsea otter => loutre de mer"
    assert tt_tok.encode(text, bos=False, eos=False) == plain.encode(text)


# --- bad inputs ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        Tokenizer(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Tokenizer(tmp_path)  # a directory is not a model file either


@pytest.mark.parametrize(
    "content",
    [b"\x00\xffgarbage\x13\x37" * 20, b"hello world\nthis is not a tokenizer\n", b"", b"\n\n"],
    ids=["binary", "text", "empty", "blank-lines"],
)
def test_file_in_neither_format(tmp_path, content):
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a tiktoken BPE file") as info:
        Tokenizer(path)
    assert str(path) in str(info.value)


def test_subclass_given_the_other_format(sp_path, tt_path):
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(tt_path)
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        TiktokenTokenizer(sp_path)


@pytest.mark.parametrize("fixture", ["default_tok", "tt_tok"])
def test_encode_rejects_non_str(request, fixture):
    tok = request.getfixturevalue(fixture)
    with pytest.raises(TypeError, match="got bytes"):
        tok.encode(b"hello", bos=False, eos=False)
    with pytest.raises(TypeError, match="got NoneType"):
        tok.encode(None, bos=True, eos=False)
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        tok.encode("a\ud800b", bos=False, eos=False)


@pytest.mark.parametrize("fixture", ["default_tok", "tt_tok"])
def test_decode_rejects_ids_outside_vocabulary(request, fixture):
    tok = request.getfixturevalue(fixture)
    assert tok.decode(tuple(tok.encode("the end", bos=False, eos=False))) == "the end"  # any int sequence works
    for bad in (-1, tok.n_words):
        with pytest.raises(ValueError, match=f"token id {bad} at position 1"):
            tok.decode([5, bad])
