"""The embedded default: the ``tiny`` preset with seeded weights and the bundled SentencePiece tokenizer.

Nothing is downloaded: the weights come from a fixed seed, the tokenizer ships in ``llama_ref/assets``
(made by ``scripts/make_tokenizer.py`` from the bundled ``corpus.txt``).
"""
from __future__ import annotations

from typing import Any

from .args import ModelArgs
from .model import Transformer, init_weights
from .tokenizer import Tokenizer, default_tokenizer_path

DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0


def default_args(**overrides: Any) -> ModelArgs:
    return ModelArgs.preset(DEFAULT_PRESET, **overrides)


def default_model(seed: int = DEFAULT_SEED, **overrides: Any) -> Transformer:
    """A fresh ``tiny`` Transformer with weights drawn from ``seed`` (fp32, CPU, train mode)."""
    return init_weights(Transformer(default_args(**overrides)), seed)


def default_tokenizer() -> Tokenizer:
    return Tokenizer(default_tokenizer_path())
