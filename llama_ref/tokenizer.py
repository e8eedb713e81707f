"""One tokenizer interface over Meta's two formats: SentencePiece (Llama 2) and tiktoken BPE (Llama 3.x).

    tok = Tokenizer(path)    # detects the format: a SentencePieceTokenizer or a TiktokenTokenizer
    ids = tok.encode("Hello", bos=True, eos=False)
    text = tok.decode(ids)

`Tokenizer(default_tokenizer_path())` loads the small SentencePiece model shipped with this package
(trained by scripts/make_tokenizer.py on llama_ref/assets/corpus.txt).
"""

from __future__ import annotations

import abc
import base64
import binascii
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import sentencepiece as spm

__all__ = ["Tokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "default_tokenizer_path", "split_long_runs"]

# Meta Llama 3 pre-tokenizer pattern.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# Llama 3.1/3.2 named special tokens, numbered from len(ranks) on; reserved ones fill the rest up to 256.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call pending), Llama 3.1
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
)
# tiktoken's BPE is quadratic in the length of one pre-tokenized piece; Meta cuts the input to bound it.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def default_tokenizer_path() -> Path:
    """Path of the SentencePiece model shipped in llama_ref/assets (512 pieces, byte fallback)."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer.model"


class _Dispatch(abc.ABCMeta):
    # `Tokenizer(path)` is a factory: it returns an instance of the subclass that matches the file's format.
    # Subclasses are constructed normally: `SentencePieceTokenizer(path)`.
    def __call__(cls, model_path: str | os.PathLike[str], *args, **kwargs):
        if cls is Tokenizer:
            return _load(model_path, *args, **kwargs)
        return super().__call__(model_path, *args, **kwargs)


class Tokenizer(metaclass=_Dispatch):
    """A tokenizer loaded from `model_path`: a SentencePiece model or a tiktoken BPE ranks file.

    Attributes: `kind` ("sentencepiece" or "tiktoken"), `model_path`, `n_words` (vocabulary size, special
    tokens included), `bos_id`, `eos_id`, `pad_id` (-1 where the model has none), `stop_tokens` (ids that end
    generation). Raises FileNotFoundError for a missing file and ValueError for a file in neither format.
    """

    kind: ClassVar[str]
    model_path: Path
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_tokens: frozenset[int]

    @abc.abstractmethod
    def _encode(self, s: str) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, t: list[int]) -> str: ...

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `s`, with `bos_id` prepended and/or `eos_id` appended.

        Raises TypeError if `s` is not a str, UnicodeEncodeError (a ValueError) if it holds a lone surrogate.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        s.encode("utf-8")  # names the position of a lone surrogate; tokenizers fail obscurely or replace it
        t = self._encode(s)
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Text of the ids `t` (any sequence of ints, e.g. a list or a 1-D tensor).

        Raises ValueError for an id outside [0, n_words), such as a pad_id of -1 left in the sequence.
        """
        ids = [int(i) for i in t]
        for position, i in enumerate(ids):
            if not 0 <= i < self.n_words:
                raise ValueError(f"token id {i} at position {position} is outside the vocabulary [0, {self.n_words})")
        return self._decode(ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.model_path)!r}, n_words={self.n_words})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Meta Llama 2 format). `stop_tokens` is {eos_id}.

    With Llama 2's training options (identity normalisation, whitespace kept, byte fallback), which the shipped
    model uses, `decode(encode(s)) == s` for every str except that U+2581 (the "▁" SentencePiece uses for a
    space) decodes as a space. A model trained with NFKC normalisation or whitespace collapsing changes more.
    The unknown piece (id 0) decodes as " ⁇ "; bos and eos decode as "".
    """

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike[str]):
        sp_model = _parse_sentencepiece(_read(model_path))
        if sp_model is None:
            raise ValueError(f"{str(model_path)!r} is not a SentencePiece model")
        self._setup(Path(model_path), sp_model)

    def _setup(self, path: Path, sp_model: spm.SentencePieceProcessor) -> None:
        self.model_path = path
        self.sp_model = sp_model
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.pad_id()
        self.stop_tokens = frozenset({self.eos_id} - {-1})

    def _encode(self, s: str) -> list[int]:
        return self.sp_model.encode(s)

    def _decode(self, t: list[int]) -> str:
        return self.sp_model.decode(t)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE ranks file (Meta Llama 3.x format) with the Llama 3.1/3.2 special tokens.

    Ids: the ranks 0..len(ranks)-1, then 256 special tokens (`special_tokens`), so `n_words = len(ranks) + 256`.
    `bos_id` is <|begin_of_text|>, `eos_id` <|end_of_text|>, `pad_id` <|finetune_right_pad_id|> (as in Llama 3.1),
    and `stop_tokens` = {<|end_of_text|>, <|eom_id|>, <|eot_id|>}. As in Meta's default, `encode` treats special
    token text such as "<|eot_id|>" in the input as plain text; build prompts with `special_tokens[...]` ids.
    `decode(encode(s)) == s` for every str. Needs the optional `tiktoken` package.
    """

    kind = "tiktoken"

    def __init__(self, model_path: str | os.PathLike[str]):
        ranks = _parse_tiktoken_ranks(_read(model_path))
        if ranks is None:
            raise ValueError(f"{str(model_path)!r} is not a tiktoken BPE file (lines of `base64token rank`)")
        self._setup(Path(model_path), ranks)

    def _setup(self, path: Path, ranks: dict[bytes, int]) -> None:
        # Ranks are parsed here, not with tiktoken.load.load_tiktoken_bpe: that function caches files by path in
        # $TMPDIR/data-gym-cache, so a file rewritten at the same path would load stale ranks.
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError(f"{str(path)!r} is a tiktoken BPE file, which needs tiktoken: "
                              "pip install llama-verify[llama3]") from e
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"tiktoken BPE file {str(path)!r}: ranks must be 0..{len(ranks) - 1}, each once")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"tiktoken BPE file {str(path)!r}: {len(missing)} single bytes have no rank "
                             f"(first: {missing[0]:#04x}); every byte needs one so that any text encodes")
        names = LLAMA3_SPECIAL_TOKENS + tuple(
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_SPECIAL_TOKENS))
        )
        self.model_path = path
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = len(ranks) + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.stop_tokens = frozenset({self.eos_id, self.eom_id, self.eot_id})

    def _encode(self, s: str) -> list[int]:
        t: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                t.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        return t

    def _decode(self, t: list[int]) -> str:
        return self.model.decode(t)


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` into consecutive pieces (joining back to `s`) so that no piece holds a run of more than `max_run`
    whitespace or more than `max_run` non-whitespace characters. Cuts happen only inside longer runs."""
    if max_run < 1:
        raise ValueError(f"max_run must be >= 1, got {max_run}")
    start = 0
    run = 0
    in_space = s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != in_space:
            in_space = not in_space
            run = 1
        elif run == max_run:
            yield s[start:i]
            start = i
            run = 1
        else:
            run += 1
    if start < len(s):
        yield s[start:]


def _read(model_path: str | os.PathLike[str]) -> bytes:
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist or is not a file")
    return path.read_bytes()


def _parse_tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """The ranks of a tiktoken BPE file (non-empty lines of `base64token rank`), or None if `data` is not one."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    ranks: dict[bytes, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            return None
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error:
            return None
        ranks[token] = int(fields[1])
    return ranks or None


def _parse_sentencepiece(data: bytes) -> spm.SentencePieceProcessor | None:
    """A processor for the serialized SentencePiece ModelProto `data`, or None if `data` is not one."""
    if not data:  # sentencepiece treats an empty proto as "no model given"
        return None
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError):
        return None


def _load(model_path: str | os.PathLike[str]) -> Tokenizer:
    path = Path(model_path)
    data = _read(path)
    ranks = _parse_tiktoken_ranks(data)
    if ranks is not None:
        tok = TiktokenTokenizer.__new__(TiktokenTokenizer)
        tok._setup(path, ranks)
        return tok
    sp_model = _parse_sentencepiece(data)
    if sp_model is not None:
        tok = SentencePieceTokenizer.__new__(SentencePieceTokenizer)
        tok._setup(path, sp_model)
        return tok
    raise ValueError(f"{str(path)!r} is neither a SentencePiece model nor a tiktoken BPE file "
                     "(lines of `base64token rank`)")
