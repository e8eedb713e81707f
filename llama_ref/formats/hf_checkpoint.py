"""transformers' checkpoint format for our model: ``config.json`` (``LlamaConfig``'s keys) and ``model.safetensors``
(transformers' names, rotate-half rows for ``q_proj``/``k_proj``), written and read without transformers installed.

The configuration and the weights agree about tying: a tied model (``tie_embeddings``) is written with
``"tie_word_embeddings": true`` and no ``lm_head.weight`` (transformers ties it on load), an untied one with
``false`` and both matrices — so a head that an untying merge gave a tensor of its own is never lost to a reload
(huggingface/transformers#45127). Reading, a configuration that says tied beside an ``lm_head.weight`` that differs
from the embedding, or one that says untied without an ``lm_head.weight``, is an error naming both.

The FFN width is stored as ``intermediate_size``; read back, ``multiple_of`` and ``ffn_dim_multiplier`` are chosen to
give exactly that width (the same model; ``params.json`` written from it may then name other factors).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..args import ModelArgs
from ..model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, Transformer
from .atomic import atomic_write_files
from .hf import from_hf_state_dict, to_hf_state_dict
from .meta import CheckpointError, materialize_buffers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config_dict(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` for ``args`` (the legacy ``rope_theta``/``rope_scaling`` keys, which
    transformers 4.x reads and 5.x converts)."""
    scaling = None
    if args.use_scaled_rope:
        scaling = {"rope_type": "llama3", "factor": float(args.rope_scale_factor),
                   "low_freq_factor": float(ROPE_LOW_FREQ_FACTOR), "high_freq_factor": float(ROPE_HIGH_FREQ_FACTOR),
                   "original_max_position_embeddings": int(ROPE_ORIGINAL_CONTEXT)}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab_size,
            "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "hidden_act": "silu", "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
            "rope_theta": float(args.rope_theta), "rope_scaling": scaling,
            "tie_word_embeddings": bool(args.tie_embeddings), "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "torch_dtype": str(dtype).removeprefix("torch.")}


def save_hf_checkpoint(model: Transformer, out_dir: str | Path, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` (a plain Transformer: merge and unload adapters first) as a transformers checkpoint into
    ``out_dir`` (weights first, ``config.json`` last, each atomically); floating tensors cast to ``dtype`` if given.
    ``lm_head.weight`` is written exactly when the model is untied."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = model.output.weight is model.tok_embeddings.weight
    if tied != model.params.tie_embeddings:
        raise ValueError(f"the model's head {'is' if tied else 'is not'} its embedding but params.tie_embeddings is "
                         f"{model.params.tie_embeddings}: the configuration would not say what the weights are")
    state = to_hf_state_dict(model, model.params)
    if tied:
        del state["lm_head.weight"]
    weights = {k: v.to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else None).contiguous()
               for k, v in state.items()}
    stored = dtype or model.tok_embeddings.weight.dtype
    config = json.dumps(hf_config_dict(model.params, stored), indent=2) + "\n"
    # {"format": "pt"}: transformers 4.x refuses a safetensors file without it
    atomic_write_files(out_dir, {WEIGHTS_FILE: safetensors_bytes(weights, metadata={"format": "pt"}),
                                 CONFIG_FILE: config})
    return out_dir


def args_from_hf_config(config: dict[str, Any], *, source: str = CONFIG_FILE, **overrides: Any) -> ModelArgs:
    """``ModelArgs`` of a ``LlamaConfig`` dict; CheckpointError naming a key whose value our model cannot take."""
    def need(key: str) -> Any:
        if key not in config:
            raise CheckpointError(f"{source}: no {key!r}")
        return config[key]

    if config.get("model_type") != "llama":
        raise CheckpointError(f"{source}: model_type {config.get('model_type')!r}, expected 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{source}: {key} is true; Llama's projections have no bias here")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r}, expected 'silu'")
    dim, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if config.get("head_dim") not in (None, dim // heads):
        raise CheckpointError(f"{source}: head_dim {config['head_dim']} is not hidden_size / num_attention_heads")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(f"{source}: rope type {kind!r}; this model has the default and Llama 3.1's 'llama3'")
    if kind == "llama3":
        for key, ours in (("low_freq_factor", ROPE_LOW_FREQ_FACTOR), ("high_freq_factor", ROPE_HIGH_FREQ_FACTOR),
                          ("original_max_position_embeddings", ROPE_ORIGINAL_CONTEXT)):
            if float(rope.get(key, ours)) != float(ours):
                raise CheckpointError(f"{source}: rope {key} {rope[key]}, this model's is {ours}")
    width = int(need("intermediate_size"))
    base = int(2 * (4 * dim) / 3)  # ModelArgs.ffn_hidden_dim before its multiplier and rounding
    params = dict(dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=heads,
                  n_kv_heads=int(config.get("num_key_value_heads") or heads), vocab_size=int(need("vocab_size")),
                  multiple_of=width, ffn_dim_multiplier=None if base <= width else width / base,
                  norm_eps=float(config.get("rms_norm_eps", 1e-5)), rope_theta=theta,
                  use_scaled_rope=kind == "llama3", rope_scale_factor=float(rope.get("factor", 8.0)),
                  max_seq_len=int(config.get("max_position_embeddings", 2048)),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    args = ModelArgs(**{**params, **overrides})
    if args.ffn_hidden_dim != width:
        raise CheckpointError(f"{source}: intermediate_size {width} cannot be expressed (got {args.ffn_hidden_dim})")
    return args


def load_hf_checkpoint(directory: str | Path, *, device: Optional[torch.device | str] = None,
                       dtype: Optional[torch.dtype] = None, **overrides: Any) -> Transformer:
    """A transformers Llama checkpoint (``config.json`` + ``model.safetensors``) → a Transformer on ``device`` in
    ``dtype`` (default: the file's); ``overrides`` go to ``ModelArgs`` (``max_seq_len``, ``max_batch_size``).
    Tied where the configuration says so; CheckpointError where the configuration and the weights disagree."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    args = args_from_hf_config(config, source=str(directory / CONFIG_FILE), **overrides)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (sharded checkpoints are not read here)")
    hf_state = load_file(str(path))
    head, emb = hf_state.get("lm_head.weight"), hf_state.get("model.embed_tokens.weight")
    if args.tie_embeddings and head is not None and emb is not None and not torch.equal(head, emb):
        raise CheckpointError(f"{path}: tie_word_embeddings is true in {CONFIG_FILE} but lm_head.weight differs from "
                              "model.embed_tokens.weight: a trained head the tie would overwrite")
    if not args.tie_embeddings and head is None:
        raise CheckpointError(f"{path}: tie_word_embeddings is false in {CONFIG_FILE} but there is no lm_head.weight")
    if args.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    target = torch.device(device) if device is not None else torch.device("cpu")
    state = {k: v.to(device=target, dtype=dtype if dtype is not None and v.is_floating_point() else None)
             for k, v in from_hf_state_dict(hf_state, args).items()}
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    materialize_buffers(model, target, state["tok_embeddings.weight"].dtype)  # the KV caches, still meta
    return model
