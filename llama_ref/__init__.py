"""A compact, trainable reference Llama (Meta's architecture and checkpoint format)."""
from .args import PRESETS, ModelArgs
from .model import Transformer

__all__ = ["ModelArgs", "PRESETS", "Transformer"]
