"""A compact, trainable reference Llama (Meta's architecture, checkpoint format and generation algorithm)."""
from __future__ import annotations

import importlib
from typing import Any

from .args import PRESETS, ModelArgs
from .formats.meta import CheckpointError, load_model, load_params, save_checkpoint
from .model import Transformer, init_weights

__all__ = ["CheckpointError", "Llama", "ModelArgs", "PRESETS", "Tokenizer", "Transformer", "init_weights",
           "load_model", "load_params", "save_checkpoint"]

# Imported on first use (PEP 562): the tokenizers load sentencepiece (and tiktoken), which the model does not need.
_LAZY = {"Llama": "generation", "Tokenizer": "tokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
