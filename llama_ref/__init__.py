"""A compact, trainable reference Llama (Meta's architecture, checkpoint format and generation algorithm)."""
from .args import PRESETS, ModelArgs
from .checkpoint import CheckpointError, load_model, load_params, save_checkpoint
from .generation import Llama
from .model import Transformer, init_weights
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "Llama", "ModelArgs", "PRESETS", "Tokenizer", "Transformer", "init_weights",
           "load_model", "load_params", "save_checkpoint"]
