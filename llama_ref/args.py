"""Model hyper-parameters: Meta's ``params.json`` fields plus the runtime sizes of the KV cache."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional

AttnImpl = Literal["math", "sdpa", "flex"]


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama 2 / 3.x model.

    The first ten fields are the keys of Meta's ``params.json``. ``rope_scale_factor`` is the Llama 3.1/3.2
    frequency-scaling factor: Meta's reference code hard-codes 8 (right for Llama 3.1) while the published
    Llama 3.2 configurations use 32, so it is a field here — 8 where a ``params.json`` says
    ``use_scaled_rope`` without a factor (as Meta's loader behaves), 32 in the Llama 3.2 presets.
    ``max_batch_size`` and ``max_seq_len`` size the KV cache; ``kv_caching`` says whether a new model starts with
    it on (``Transformer.kv_caching`` switches it later).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: taken from the tokenizer (Llama 2's params.json says -1)
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 2's params.json omits it (Meta's Llama 2 code uses 10000); Llama 3 states it
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    kv_caching: bool = True
    tie_embeddings: bool = False  # output.weight shares tok_embeddings.weight
    attn_impl: AttnImpl = "math"  # "sdpa": F.scaled_dot_product_attention; "flex": flex_attention (llama_ref.flex)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or (
            self.vocab_size <= 0 and self.vocab_size != -1
        ):
            raise ValueError(f"ModelArgs.vocab_size must be a positive int (or -1: set from the tokenizer), "
                             f"got {self.vocab_size!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        for name in ("norm_eps", "rope_theta", "rope_scale_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive finite number, got {value!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"ModelArgs.ffn_dim_multiplier must be positive or None, got {self.ffn_dim_multiplier!r}")
        if self.attn_impl not in ("math", "sdpa", "flex"):
            raise ValueError(f"ModelArgs.attn_impl must be 'math', 'sdpa' or 'flex', got {self.attn_impl!r}")
        if self.attn_impl == "flex":
            from .flex import flex_available
            why = flex_available()
            if why:
                raise ValueError(f"ModelArgs.attn_impl: {why}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's FFN size: 2/3 of 4·dim, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes: Any) -> "ModelArgs":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_params_json(self) -> dict[str, Any]:
        """The ``params.json`` dict: Meta's keys, plus our own only where they differ from Meta's behaviour."""
        out: dict[str, Any] = {k: getattr(self, k) for k in META_KEYS if getattr(self, k) is not None}
        if self.use_scaled_rope and self.rope_scale_factor != 8.0:
            out["rope_scale_factor"] = self.rope_scale_factor
        if self.tie_embeddings:
            out["tie_embeddings"] = True
        return out

    @classmethod
    def from_dict(cls, params: dict[str, Any], *, source: str = "params", **overrides: Any) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"expected some of {sorted(known)}")
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown ModelArgs override(s) {bad}")
        return cls(**{**params, **overrides})

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "ModelArgs":
        """Read Meta's ``params.json``; an unknown key is an error that names it."""
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(params).__name__}")
        return cls.from_dict(params, source=str(path), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name], source=f"preset {name!r}", **overrides)


META_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope")

_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)

# Published shapes (Meta's params.json), plus small models that run on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: its vocabulary is the bundled SentencePiece model's (512 pieces).
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                 rope_theta=10000.0, max_batch_size=8, max_seq_len=256),
    # The embedded default's shape with the head tied to the embedding, as the small published models are
    "tiny-tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                      rope_theta=10000.0, max_batch_size=8, max_seq_len=256, tie_embeddings=True),
    # The default bench model: big enough that matmuls, not Python, dominate a step.
    "bench": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64,
                  rope_theta=10000.0, max_batch_size=8, max_seq_len=1024),
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                       rope_theta=10000.0, max_seq_len=4096, max_batch_size=1),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                         rope_scale_factor=32.0, max_seq_len=2048, max_batch_size=1, **_LLAMA3),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
                         rope_scale_factor=32.0, max_seq_len=2048, max_batch_size=1, **_LLAMA3),
    # Published with tie_word_embeddings: the output head is the input embedding (1,235,814,400 and 3,212,749,824
    # parameters; the seed report counted the 1B untied: 1,498,482,688)
    "llama-3.2-1b-tied": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                              ffn_dim_multiplier=1.5, rope_scale_factor=32.0, max_seq_len=2048, max_batch_size=1,
                              tie_embeddings=True, **_LLAMA3),
    "llama-3.2-3b-tied": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
                              ffn_dim_multiplier=1.0, rope_scale_factor=32.0, max_seq_len=2048, max_batch_size=1,
                              tie_embeddings=True, **_LLAMA3),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
                         rope_scale_factor=8.0, max_seq_len=2048, max_batch_size=1, **_LLAMA3),
}
