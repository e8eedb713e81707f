"""Our weights in transformers' ``LlamaForCausalLM``: an oracle written by other people, from other code.

The two implementations differ where bugs hide: Meta rotates interleaved pairs ``(x[2k], x[2k+1])`` with complex
numbers, transformers rotates halves ``(x[k], x[k + Dh/2])`` with cos/sin; transformers builds its own causal mask,
its own GQA expansion, its own Llama 3.1 frequency scaling. Equal logits on the same weights therefore say more
than any self-comparison. transformers is an optional dependency (``pip install llama-verify[test]``), imported
lazily; nothing here downloads anything (models are built from a config, never ``from_pretrained``).

The key mapping and the ``wq``/``wk`` row permutation live in :mod:`llama_ref.formats.hf` (re-exported here).

Notation used for tensor shapes: H query heads, Hkv key/value heads, Dh head_dim, D dim.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import TYPE_CHECKING, Any, Iterator

import torch

from llama_ref.args import ModelArgs
from llama_ref.formats.hf import from_hf_state_dict, permute_rotary, to_hf_state_dict, unpermute_rotary
from llama_ref.model import (ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, Transformer,
                             apply_scaling)

if TYPE_CHECKING:  # pragma: no cover
    import transformers

__all__ = ["hf_config", "to_hf_state_dict", "from_hf_state_dict", "permute_rotary", "unpermute_rotary",
           "build_hf_model", "hf_logits", "rope_inv_freq", "check_rope_frequencies", "default_hf_model"]

def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("verify.oracle_hf needs transformers (an optional dependency): "
                          "pip install llama-verify[test]") from e
    return transformers


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextlib.contextmanager
def _quiet_rope_validation() -> Iterator[None]:
    # Meta's scaling is defined relative to an 8192-token original context whatever max_seq_len is; transformers
    # warns when that exceeds max_position_embeddings (always, for small test models and the 2048-token presets).
    # Drop exactly that message; every other warning still shows. rope_inv_freq is compared afterwards anyway.
    logger = logging.getLogger("transformers.modeling_rope_utils")
    flt = _DropMessages("original_max_position_embeddings field must be less than")
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def hf_config(args: ModelArgs) -> "transformers.LlamaConfig":
    """The ``LlamaConfig`` of the same architecture: eager attention, float32, no bos/eos/pad ids (so that
    ``generate`` never stops early), Llama 3.1 ``llama3`` RoPE scaling when ``args.use_scaled_rope``.

    Works with transformers 4.45+ (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``).
    Raises ``ValueError`` for ``vocab_size <= 0``.
    """
    transformers = _import_transformers()
    if args.vocab_size <= 0:
        raise ValueError(f"hf_config: ModelArgs.vocab_size is {args.vocab_size}; set it from the tokenizer first")
    accepted = set(inspect.signature(transformers.LlamaConfig.__init__).parameters)
    scaling: dict[str, Any] = {}
    if args.use_scaled_rope:
        scaling = {"rope_type": "llama3", "factor": float(args.rope_scale_factor),
                   "low_freq_factor": float(ROPE_LOW_FREQ_FACTOR), "high_freq_factor": float(ROPE_HIGH_FREQ_FACTOR),
                   "original_max_position_embeddings": int(ROPE_ORIGINAL_CONTEXT)}
    kwargs: dict[str, Any] = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        hidden_act="silu", max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        pretraining_tp=1, use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="eager",
    )
    if "rope_parameters" in accepted:  # transformers >= 5: theta and scaling live together
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": float(args.rope_theta), **scaling}
    else:  # transformers 4.x
        kwargs["rope_theta"] = float(args.rope_theta)
        kwargs["rope_scaling"] = scaling or None
    kwargs["dtype" if "dtype" in accepted else "torch_dtype"] = torch.float32
    with _quiet_rope_validation():
        return transformers.LlamaConfig(**kwargs)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Our RoPE frequencies θ_k (Dh/2,), float32, computed as ``llama_ref.model.precompute_freqs_cis`` does."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    return apply_scaling(freqs, args.rope_scale_factor) if args.use_scaled_rope else freqs


def check_rope_frequencies(hf_model: "transformers.LlamaForCausalLM", args: ModelArgs) -> None:
    """Raise ``ValueError`` unless transformers' rotary ``inv_freq`` equals ours (relative 1e-6) with attention
    scaling 1: the guard against config keys that a transformers version silently ignores or renames."""
    rotary = getattr(hf_model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{type(hf_model).__name__}.model has no rotary_emb.inv_freq; this transformers version "
                         f"is not supported by verify.oracle_hf")
    theirs = rotary.inv_freq.detach().float().cpu()
    ours = rope_inv_freq(args)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=0.0):
        rel = ((theirs - ours).abs() / ours).max().item() if theirs.shape == ours.shape else float("nan")
        raise ValueError(f"transformers' RoPE inv_freq {theirs.tolist()} != ours {ours.tolist()} "
                         f"(max relative difference {rel:.3g}; rope_theta={args.rope_theta}, "
                         f"use_scaled_rope={args.use_scaled_rope}, rope_scale_factor={args.rope_scale_factor}): "
                         f"the installed transformers did not take our RoPE configuration")
    scaling = getattr(rotary, "attention_scaling", 1.0)
    if scaling != 1.0:
        raise ValueError(f"transformers' RoPE attention_scaling is {scaling}, expected 1.0 (Meta has none)")


def build_hf_model(model: Transformer, *, dtype: torch.dtype = torch.float32
                   ) -> "transformers.LlamaForCausalLM":
    """transformers' ``LlamaForCausalLM`` holding ``model``'s weights (copied), in eval mode, eager attention,
    on ``model``'s device, parameters in ``dtype``; its RoPE frequencies stay float32 (like our ``freqs_cis``).

    Raises ``ValueError`` when transformers' RoPE frequencies, attention implementation or embedding tying differ
    from ours, and ``RuntimeError`` (from ``load_state_dict``) on missing or unexpected weights.
    """
    transformers = _import_transformers()
    args = model.params
    hf = transformers.LlamaForCausalLM(hf_config(args))
    hf.load_state_dict(to_hf_state_dict(model, args), strict=True)
    impl = getattr(hf.config, "_attn_implementation", "eager")
    if impl != "eager":
        raise ValueError(f"transformers chose attention implementation {impl!r}, expected 'eager'")
    tied = hf.lm_head.weight is hf.model.embed_tokens.weight
    if tied != args.tie_embeddings:
        raise ValueError(f"lm_head tied to embed_tokens is {tied} in transformers, tie_embeddings is "
                         f"{args.tie_embeddings} in ModelArgs")
    check_rope_frequencies(hf, args)
    rotary = hf.model.rotary_emb
    fp32_tables = {name: buf.clone() for name, buf in rotary.named_buffers(recurse=False)}
    param = next(model.parameters(), None)
    hf.to(device=param.device if param is not None else None, dtype=dtype)
    for name, buf in fp32_tables.items():  # .to(dtype) cast them too; RoPE angles in bf16 would be a new error
        setattr(rotary, name, buf.to(rotary.inv_freq.device))
    return hf.eval()


@torch.no_grad()
def hf_logits(hf_model: "transformers.LlamaForCausalLM", tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits (B, T, V) as float32 for unpadded ``tokens`` (B, T) at positions 0…T-1; no cache,
    no attention mask (transformers builds its own causal mask)."""
    return hf_model(input_ids=tokens, use_cache=False).logits.float()


def default_hf_model(tie_embeddings: bool = False) -> "transformers.LlamaForCausalLM":
    """The embedded default model's weights in transformers' ``LlamaForCausalLM`` (fp32, eager attention, eval mode):
    ``llama-verify --target hf``; ``tie_embeddings``: the default built tied (``tie_word_embeddings``),
    ``llama-verify --target hf --tied``."""
    from llama_ref.default import default_model
    return build_hf_model(default_model(tie_embeddings=tie_embeddings))


def default_tied_hf_model() -> "transformers.LlamaForCausalLM":
    """:func:`default_hf_model` tied: the factory of ``llama-verify --target hf --tied``."""
    return default_hf_model(tie_embeddings=True)
