"""transformers' names and RoPE row order for our weights: the key mapping Meta ↔ ``LlamaForCausalLM`` and the
row permutation of ``wq``/``wk`` between Meta's interleaved RoPE and transformers' rotate-half RoPE.

Pure tensor and string work (transformers is not imported), shared by ``verify.oracle_hf`` (whole models) and
``llama_ref.lora.adapter`` (PEFT adapters, whose ``lora_B`` on ``wq``/``wk`` needs the same row permutation: the update
``B·A`` has the rows of ``W``, so permuting ``B``'s rows permutes ``B·A``'s rows, and ``A`` stays as it is).

Notation used for tensor shapes: H query heads, Hkv key/value heads, Dh head_dim, D dim.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from ..args import ModelArgs

__all__ = ["META_TO_HF_TOP_LEVEL", "META_TO_HF_PER_LAYER", "HF_TO_META_TOP_LEVEL", "HF_TO_META_PER_LAYER",
           "meta_to_hf_key", "hf_to_meta_key", "meta_to_hf_module", "hf_to_meta_module", "rotary_heads",
           "permute_rotary", "unpermute_rotary", "to_hf_state_dict", "from_hf_state_dict"]

# Meta key → transformers key. Per-layer entries are suffixes after "layers.{i}." / "model.layers.{i}.".
META_TO_HF_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
META_TO_HF_PER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TO_META_TOP_LEVEL = {v: k for k, v in META_TO_HF_TOP_LEVEL.items()}
HF_TO_META_PER_LAYER = {v: k for k, v in META_TO_HF_PER_LAYER.items()}

# The same maps on module names (the keys without ".weight"): what a LoRA adapter's keys are built from.
_META_TO_HF_TOP_MODULE = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in META_TO_HF_TOP_LEVEL.items()}
_META_TO_HF_LAYER_MODULE = {k.removesuffix(".weight"): v.removesuffix(".weight")
                            for k, v in META_TO_HF_PER_LAYER.items()}
_HF_TO_META_TOP_MODULE = {v: k for k, v in _META_TO_HF_TOP_MODULE.items()}
_HF_TO_META_LAYER_MODULE = {v: k for k, v in _META_TO_HF_LAYER_MODULE.items()}

_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_ROTARY = re.compile(r"(?:.*\.)?attention\.(wq|wk)(?:\..*)?")
# Old transformers versions stored the RoPE table in the state dict; it is derived, never a weight.
_HF_DERIVED = re.compile(r".*rotary_emb\.inv_freq")


def _map(name: str, top: Mapping[str, str], per_layer: Mapping[str, str], layer_re: re.Pattern, prefix: str,
         what: str, layer_form: str) -> str:
    if name in top:
        return top[name]
    m = layer_re.fullmatch(name)
    if m is None or m.group(2) not in per_layer:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(top)} or {layer_form!r} + one of "
                         f"{sorted(per_layer)}")
    return f"{prefix}{m.group(1)}.{per_layer[m.group(2)]}"


def meta_to_hf_key(key: str) -> str:
    """``layers.3.attention.wq.weight`` → ``model.layers.3.self_attn.q_proj.weight``; ValueError naming an
    unknown key."""
    return _map(key, META_TO_HF_TOP_LEVEL, META_TO_HF_PER_LAYER, _META_LAYER, "model.layers.", "Meta key",
                "layers.<i>.")


def hf_to_meta_key(key: str) -> str:
    """The inverse of :func:`meta_to_hf_key`; ValueError naming an unknown key."""
    return _map(key, HF_TO_META_TOP_LEVEL, HF_TO_META_PER_LAYER, _HF_LAYER, "layers.", "transformers key",
                "model.layers.<i>.")


def meta_to_hf_module(name: str) -> str:
    """A module path: ``layers.3.attention.wq`` → ``model.layers.3.self_attn.q_proj``; ValueError if unknown."""
    return _map(name, _META_TO_HF_TOP_MODULE, _META_TO_HF_LAYER_MODULE, _META_LAYER, "model.layers.",
                "Meta module", "layers.<i>.")


def hf_to_meta_module(name: str) -> str:
    """The inverse of :func:`meta_to_hf_module`; ValueError naming an unknown module path."""
    return _map(name, _HF_TO_META_TOP_MODULE, _HF_TO_META_LAYER_MODULE, _HF_LAYER, "layers.",
                "transformers module", "model.layers.<i>.")


def rotary_heads(meta_name: str, args: ModelArgs) -> Optional[int]:
    """How many heads the RoPE row permutation of ``meta_name`` (a key or module path in Meta's names) runs over:
    ``args.n_heads`` for ``wq``, ``args.n_kv_heads`` for ``wk`` (and their LoRA tensors), None for the rest."""
    m = _ROTARY.fullmatch(meta_name)
    if m is None:
        return None
    return args.n_heads if m.group(1) == "wq" else args.n_kv_heads


def _check_rows(w: torch.Tensor, n_heads: int) -> int:
    if w.dim() < 1 or n_heads <= 0 or w.shape[0] % n_heads:
        raise ValueError(f"rotary permutation: {tuple(w.shape[:1])} rows are not a multiple of n_heads={n_heads}")
    head_dim = w.shape[0] // n_heads
    if head_dim % 2:
        raise ValueError(f"rotary permutation: head_dim {head_dim} (= {w.shape[0]} rows / {n_heads} heads) is odd")
    return head_dim


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a query/key projection (H·Dh, ...) from Meta's interleaved RoPE layout to the
    rotate-half layout of transformers: within each head, row ``2k`` goes to ``k`` and ``2k+1`` to ``k + Dh/2``.

    Pass ``n_heads`` for ``wq`` and ``n_kv_heads`` for ``wk``. Any trailing shape is kept (a LoRA ``B`` works too).
    """
    head_dim = _check_rows(w, n_heads)
    rest = w.shape[1:]
    # (H, Dh/2 pairs, 2 members) → (H, 2 members, Dh/2 pairs): first members of every pair, then second ones.
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rotary`: rotate-half rows (H·Dh, ...) back to Meta's interleaved order."""
    head_dim = _check_rows(w, n_heads)
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def _state_dict_of(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    return model_or_state_dict


def to_hf_state_dict(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], args: ModelArgs
                     ) -> dict[str, torch.Tensor]:
    """Meta keys → transformers keys, with ``wq``/``wk`` rows permuted for rotate-half RoPE.

    Partial state dicts are converted key by key (missing keys stay missing); an unknown key is a ``ValueError``.
    Unpermuted tensors are detached but share storage with the input.
    """
    return _convert(_state_dict_of(model_or_state_dict), args, "to_hf_state_dict", meta_to_hf_key, permute_rotary,
                    meta_key_of=lambda key, _: key)


def from_hf_state_dict(hf_sd: Union[nn.Module, Mapping[str, torch.Tensor]], args: ModelArgs
                       ) -> dict[str, torch.Tensor]:
    """transformers keys → Meta keys, ``q_proj``/``k_proj`` rows back to interleaved order (inverse of
    :func:`to_hf_state_dict`). Derived RoPE buffers (``rotary_emb.inv_freq``) are dropped; other unknown keys
    are a ``ValueError``."""
    state = {k: v for k, v in _state_dict_of(hf_sd).items() if not _HF_DERIVED.fullmatch(k)}
    return _convert(state, args, "from_hf_state_dict", hf_to_meta_key, unpermute_rotary,
                    meta_key_of=lambda _, new_key: new_key)


def _convert(state: Mapping[str, torch.Tensor], args: ModelArgs, caller: str, rename: Callable[[str], str],
             reorder: Callable[[torch.Tensor, int], torch.Tensor], meta_key_of: Callable[[str, str], str]
             ) -> dict[str, torch.Tensor]:
    """Each tensor under its ``rename``d key, detached; the rotary rows of ``wq``/``wk`` (found by their Meta key)
    ``reorder``ed. An unknown key is a ValueError naming ``caller``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        try:
            new_key = rename(key)
        except ValueError as e:
            raise ValueError(f"{caller}: {e}") from None
        heads = rotary_heads(meta_key_of(key, new_key), args)
        value = value.detach()
        out[new_key] = value if heads is None else reorder(value, heads)
    return out
