# Over 350 lines: our adapter format and PEFT's are one concept (same tensors, two key schemes, one validation).
"""LoRA adapter files: only the adapters' ``lora_A``/``lora_B`` (safetensors) plus a small JSON config, in our own
format and in PEFT's.

* **Ours** (:func:`save_adapter` / :func:`load_adapter`): ``adapter.safetensors`` with Meta-named keys
  (``layers.3.attention.wq.lora_A``) and ``adapter_config.json`` holding ``format``/``version``, the
  hyper-parameters (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``targets``) and the base model's
  shape (``base``), so a mismatch is reported by name before any tensor is touched.
* **PEFT's** (:func:`export_peft_adapter` / :func:`import_peft_adapter`): ``adapter_model.safetensors`` with
  transformers' names (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``) and a PEFT
  ``adapter_config.json``; ``PeftModel.from_pretrained`` on ``verify.oracle_hf.build_hf_model(base)`` then computes
  what our LoRA model computes. ``lora_B`` of ``wq``/``wk`` gets the rotate-half row permutation of
  :mod:`llama_ref.formats.hf` (``B·A`` has ``W``'s rows); ``A`` is unchanged.

Tensors are written in their own dtype (no cast: bf16 adapters stay bf16, fp32 stay fp32), on the CPU. Both files
are written to temporary files, fsynced and renamed into place (weights first, the config last), as
:func:`llama_ref.formats.meta.save_checkpoint` does. The two formats share the name ``adapter_config.json``, so a
directory holds one adapter of one format: writing one format where the other's weights file lies is refused.

Loading never changes the model before the whole file has been checked. A model without LoRA layers gets them
(``apply_lora_to_llama`` with the file's hyper-parameters); a model with LoRA layers must match the file's rank,
alpha and rsLoRA flag (and, when ``strict``, its dropout and targets). Merged layers (eval mode with
``merge_weights``) are unmerged, loaded and merged again, so a merged model stays merged with the *new* adapter;
on a half-precision base this costs the rounding of one unmerge/merge (fp32 bases: ~1 ulp).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save as _safetensors_bytes
from torch import nn

from ..formats.atomic import atomic_write_files
from ..formats.hf import hf_to_meta_module, meta_to_hf_module, permute_rotary, rotary_heads, unpermute_rotary
from ..formats.meta import key_problems, listing
from ..model import Transformer
from .apply import apply_lora_to_llama, lora_layers
from .layer import ALL_TARGETS, ATTENTION_TARGETS, LoRALayer, LoRALinear
from .tied import TiedEmbedding, TiedHead

__all__ = ["AdapterError", "AdapterSpec", "adapter_spec", "save_adapter", "load_adapter", "export_peft_adapter",
           "import_peft_adapter", "ADAPTER_WEIGHTS", "PEFT_WEIGHTS", "CONFIG_FILE"]

ADAPTER_WEIGHTS = "adapter.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"  # both formats: PEFT fixes the name
FORMAT = "llama-verify-lora"
VERSION = 1
BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim")
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")
# PEFT options that change what the tensors mean; on import, any value but an empty one (None, false, "none", {},
# []) is refused.
_PEFT_UNSUPPORTED = ("bias", "fan_in_fan_out", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                     "modules_to_save", "lora_bias", "target_parameters", "trainable_token_indices", "use_qalora",
                     "layer_replication")
_PEFT_EMPTY = (None, False, "none", {}, [])


class AdapterError(ValueError):
    """An adapter file or directory that does not fit the model (or is not an adapter of the expected format)."""


@dataclass(frozen=True)
class AdapterSpec:
    """The hyper-parameters every LoRA layer of a model shares; ``targets`` in ``ALL_TARGETS`` order."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    targets: tuple[str, ...]


def _module_name(layer: int, target: str) -> str:
    return f"layers.{layer}.{'attention' if target in ATTENTION_TARGETS else 'feed_forward'}.{target}"


def _dropout_p(layer: LoRALinear) -> float:
    return float(layer.lora_dropout.p) if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


_VOCAB = ("tok_embeddings", "output")


def _vocab_adapted(model: Transformer) -> list[str]:
    """The vocabulary matrices carrying an adapter (or following one kept tied)."""
    return [n for n in _VOCAB if type(getattr(model, n)) not in (torch.nn.Embedding, torch.nn.Linear)]


def adapter_spec(model: Transformer, *, vocabulary: bool = False) -> Optional[AdapterSpec]:
    """The model's adapter hyper-parameters, None without LoRA layers. ValueError when the layers disagree (the
    message names the layers of each variant) or do not cover the same targets in every block; and, unless
    ``vocabulary`` (PEFT's export writes them), when the vocabulary matrices carry adapters."""
    vocab = _vocab_adapted(model)
    if vocab and not vocabulary:
        raise ValueError(f"adapters on {', '.join(vocab)} (the vocabulary matrices) are not written to our adapter "
                         "files: export_peft_adapter writes them in PEFT's format; or merge_and_unload and save the "
                         "checkpoint (save_checkpoint)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    if not layers:
        return None
    variants: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        variants.setdefault((layer.r, layer.lora_alpha, _dropout_p(layer), bool(layer.use_rslora)), []).append(name)
    if len(variants) > 1:
        lines = [f"r={r}, lora_alpha={a}, lora_dropout={d}, use_rslora={rs}: {listing(names)}"
                 for (r, a, d, rs), names in variants.items()]
        raise ValueError("LoRA layers with different hyper-parameters cannot be saved as one adapter:\n  "
                         + "\n  ".join(lines))
    targets = tuple(t for t in ALL_TARGETS if _module_name(0, t) in layers)
    expected = {_module_name(i, t) for i in range(model.params.n_layers) for t in targets}
    blocks = set(layers) - set(_VOCAB)
    missing, unexpected = sorted(expected - blocks), sorted(blocks - expected)
    if missing or unexpected:
        raise ValueError(f"LoRA layers must cover the same targets {list(targets)} in every block: "
                         + "; ".join(f"{what} {listing(names)}" for what, names in
                                     (("no LoRA on", missing), ("unexpected LoRA on", unexpected)) if names))
    (r, alpha, dropout, rslora), = variants
    return AdapterSpec(r, alpha, dropout, rslora, targets)


def _require_spec(model: Transformer, *, vocabulary: bool = False) -> tuple[AdapterSpec, dict[str, LoRALinear]]:
    """The spec and the blocks' LoRA layers by name."""
    spec = adapter_spec(model, vocabulary=vocabulary)
    if spec is None:
        raise ValueError("the model has no LoRA layers: apply_lora_to_llama first (nothing to save)")
    return spec, {n: m for n, m in lora_layers(model) if n not in _VOCAB}


# --- writing --------------------------------------------------------------------------------------------------

def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _write_files(out_dir: Path, files: dict[str, bytes], other_format: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / other_format).exists():
        raise FileExistsError(f"{out_dir}: holds {other_format}, an adapter of the other format, whose "
                              f"{CONFIG_FILE} would be replaced; choose another directory or remove it")
    return atomic_write_files(out_dir, files)  # in order: weights first, the config last


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def save_adapter(model: Transformer, out_dir: str | Path) -> Path:
    """Write ``adapter.safetensors`` (the ``lora_A``/``lora_B`` of every LoRA layer, Meta-named, own dtype) and
    ``adapter_config.json`` into ``out_dir`` atomically; return ``out_dir``. ValueError for a model without LoRA
    layers or with layers that do not share one ``r``/``lora_alpha``/``lora_dropout``/``use_rslora``."""
    spec, layers = _require_spec(model)
    tensors = {f"{name}.{part}": _cpu(getattr(layer, part)) for name, layer in layers.items()
               for part in ("lora_A", "lora_B")}
    config = {"format": FORMAT, "version": VERSION, "r": spec.r, "lora_alpha": spec.lora_alpha,
              "lora_dropout": spec.lora_dropout, "use_rslora": spec.use_rslora, "targets": list(spec.targets),
              "base": {f: getattr(model.params, f) for f in BASE_FIELDS}}
    return _write_files(Path(out_dir), {ADAPTER_WEIGHTS: _safetensors_bytes(tensors, metadata={"format": "pt"}),
                                        CONFIG_FILE: _json_bytes(config)}, other_format=PEFT_WEIGHTS)


def _peft_state(model: Transformer, *, permute_rows: bool) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    spec, layers = _require_spec(model, vocabulary=True)
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(model.output, LoRALinear):  # the head's: PEFT's lm_head adapter (no rotary rows)
        tensors[f"{_PEFT_PREFIX}lm_head.lora_A.weight"] = _cpu(model.output.lora_A)
        tensors[f"{_PEFT_PREFIX}lm_head.lora_B.weight"] = _cpu(model.output.lora_B)
    if isinstance(model.tok_embeddings, LoRALayer):  # PEFT's embedding adapter: A (r, V), B (D, r), as ours
        tensors[f"{_PEFT_PREFIX}model.embed_tokens.lora_embedding_A"] = _cpu(model.tok_embeddings.lora_A)
        tensors[f"{_PEFT_PREFIX}model.embed_tokens.lora_embedding_B"] = _cpu(model.tok_embeddings.lora_B)
    for name, layer in layers.items():
        prefix = _PEFT_PREFIX + meta_to_hf_module(name)
        b = layer.lora_B.detach()
        heads = rotary_heads(name, model.params)
        if heads is not None and permute_rows:
            b = permute_rotary(b, heads)
        tensors[f"{prefix}.lora_A.weight"] = _cpu(layer.lora_A)
        tensors[f"{prefix}.lora_B.weight"] = _cpu(b)
    return spec, tensors


def _write_peft(model: Transformer, out_dir: str | Path, *, permute_rows: bool) -> Path:
    if isinstance(model.tok_embeddings, TiedEmbedding):
        raise ValueError("an adapter on output kept tied has no PEFT form: PEFT keeps a tie from the embedding's "
                         "side only (ensure_weight_tying with embed_tokens targeted)")
    spec, tensors = _peft_state(model, permute_rows=permute_rows)
    vocab = [hf for ours, hf in (("tok_embeddings", "embed_tokens"), ("output", "lm_head"))
             if isinstance(getattr(model, ours), LoRALayer)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
              "r": spec.r, "lora_alpha": spec.lora_alpha, "lora_dropout": spec.lora_dropout,
              "target_modules": [meta_to_hf_module(_module_name(0, t)).rsplit(".", 1)[1] for t in spec.targets]
              + vocab, "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.use_rslora}
    if isinstance(model.output, TiedHead):  # the embedding's adapter kept tied: PEFT ties lm_head's to it
        config["ensure_weight_tying"] = True
    return _write_files(Path(out_dir), {PEFT_WEIGHTS: _safetensors_bytes(tensors, metadata={"format": "pt"}),
                                        CONFIG_FILE: _json_bytes(config)}, other_format=ADAPTER_WEIGHTS)


def export_peft_adapter(model: Transformer, out_dir: str | Path) -> Path:
    """Write the adapters as PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir``
    (atomically; tensors in their own dtype) so that ``PeftModel.from_pretrained(build_hf_model(base), out_dir)``
    gives our logits. ``lora_B`` rows of ``wq``/``wk`` are permuted to transformers' rotate-half order. Adapters on
    the vocabulary matrices are written as PEFT's ``lm_head`` and ``embed_tokens`` adapters (an embedding's kept tied:
    ``ensure_weight_tying``, PEFT tying ``lm_head``'s to it; a head's kept tied has no PEFT form: ValueError). Same
    ValueErrors as :func:`save_adapter` otherwise."""
    return _write_peft(model, out_dir, permute_rows=True)


# --- reading --------------------------------------------------------------------------------------------------

def _read_dir(adapter_dir: Path, weights: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory (expected {weights} and {CONFIG_FILE})")
    for name in (CONFIG_FILE, weights):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir}: no {name}; an adapter directory holds {weights} and "
                                    f"{CONFIG_FILE}")
    path = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    path = adapter_dir / weights
    try:
        tensors = _load_safetensors(path)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError, on a damaged file
        raise AdapterError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return config, tensors


def _spec_from(config: dict[str, Any], source: str, *, r_key: str, targets: Any) -> AdapterSpec:
    missing = [k for k in (r_key, "lora_alpha") if k not in config]
    if missing:
        raise AdapterError(f"{source}: missing field(s) {missing}")
    r, alpha = config[r_key], config["lora_alpha"]
    dropout, rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{source}: r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise AdapterError(f"{source}: lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{source}: lora_dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(rslora, bool):
        raise AdapterError(f"{source}: use_rslora must be true or false, got {rslora!r}")
    if not isinstance(targets, (list, tuple)) or not targets or not all(t in ALL_TARGETS for t in targets):
        raise AdapterError(f"{source}: targets {targets!r} are not a non-empty list drawn from {list(ALL_TARGETS)}")
    return AdapterSpec(r, alpha, float(dropout), rslora, tuple(t for t in ALL_TARGETS if t in targets))


def _load(model: Transformer, spec: AdapterSpec, tensors: dict[str, torch.Tensor], source: str, *, strict: bool,
          lora_dtype: Optional[torch.dtype]) -> Transformer:
    """Check everything, then (and only then) add LoRA layers if needed and copy the tensors in."""
    try:
        have = adapter_spec(model)
    except ValueError as e:
        raise AdapterError(f"cannot load {source}: the model's own LoRA layers are inconsistent: {e}") from None
    if have is not None:
        fields = [("r", "rank r"), ("lora_alpha", "lora_alpha"), ("use_rslora", "use_rslora")]
        if strict:
            fields += [("lora_dropout", "lora_dropout"), ("targets", "targets")]
        bad = [f"{label}: adapter {getattr(spec, f)!r}, model {getattr(have, f)!r}" for f, label in fields
               if getattr(spec, f) != getattr(have, f)]
        if bad:
            raise AdapterError(f"{source} does not match the model's LoRA layers: " + "; ".join(bad))
        names = [name for name, _ in lora_layers(model)]
    else:
        names = [_module_name(i, t) for i in range(model.params.n_layers) for t in spec.targets]
    modules = dict(model.named_modules())
    expected: dict[str, tuple[int, int]] = {}
    for name in names:
        linear = modules[name]
        expected[f"{name}.lora_A"] = (spec.r, linear.in_features)
        expected[f"{name}.lora_B"] = (linear.out_features, spec.r)
    lines = key_problems(tensors, expected, strict=strict)
    not_float = [f"{k!r} ({t.dtype})" for k, t in tensors.items() if k in expected and not t.is_floating_point()]
    if not_float:
        lines.append(f"{len(not_float)} non-floating tensor(s): {listing(not_float)}")
    if lines:
        raise AdapterError(f"{source} does not fit the model:\n  " + "\n  ".join(lines))

    if have is None:
        apply_lora_to_llama(model, spec.r, spec.lora_alpha, spec.lora_dropout, spec.targets,
                            use_rslora=spec.use_rslora, lora_dtype=lora_dtype)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            was_merged = layer.merged
            layer.unmerge()  # a merged weight holds the old B·A: take it out before A and B change
            for part in ("lora_A", "lora_B"):
                if f"{name}.{part}" in tensors:
                    getattr(layer, part).copy_(tensors[f"{name}.{part}"])
            if was_merged:
                layer.merge()
    return model


def load_adapter(model: Transformer, adapter_dir: str | Path, *, strict: bool = True,
                 lora_dtype: Optional[torch.dtype] = None) -> Transformer:
    """Load a :func:`save_adapter` directory into ``model`` (in place; returned). Without LoRA layers the model gets
    them from the file's config (``lora_dtype`` as in ``apply_lora_to_llama``); with them, the file's ``r``,
    ``lora_alpha`` and ``use_rslora`` must equal theirs, and when ``strict`` also ``lora_dropout`` and ``targets``.
    Tensors are copied into the existing parameters (their dtype and device stay); merged layers stay merged.

    ``strict=False`` tolerates missing keys (those layers keep their values) and unexpected ones (ignored); a base
    shape, rank, alpha, rsLoRA or tensor shape mismatch is an :class:`AdapterError` (a ValueError) either way,
    naming the field, key and shapes. FileNotFoundError names the directory and the missing file. Nothing in the
    model changes unless the whole file fits.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).exists() and (adapter_dir / PEFT_WEIGHTS).exists():
        raise AdapterError(f"{adapter_dir}: holds a PEFT adapter ({PEFT_WEIGHTS}); use import_peft_adapter")
    config, tensors = _read_dir(adapter_dir, ADAPTER_WEIGHTS)
    source = f"adapter {adapter_dir}"
    if config.get("format") != FORMAT:
        hint = " (a PEFT adapter config: use import_peft_adapter)" if "peft_type" in config else ""
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: unknown format {config.get('format')!r}, expected "
                           f"{FORMAT!r}{hint}")
    if config.get("version") != VERSION:
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: unsupported {FORMAT} version {config.get('version')!r}; "
                           f"this code reads version {VERSION}")
    spec = _spec_from(config, str(adapter_dir / CONFIG_FILE), r_key="r", targets=config.get("targets"))
    base = config.get("base")
    if not isinstance(base, dict):
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: no 'base' object with {list(BASE_FIELDS)}")
    differ = [f"{f}: adapter {base.get(f)!r}, model {getattr(model.params, f)!r}" for f in BASE_FIELDS
              if base.get(f) != getattr(model.params, f)]
    if differ:
        raise AdapterError(f"{source} was trained on another base model shape: " + "; ".join(differ))
    return _load(model, spec, tensors, source, strict=strict, lora_dtype=lora_dtype)


def import_peft_adapter(model: Transformer, peft_dir: str | Path, *, strict: bool = True,
                        lora_dtype: Optional[torch.dtype] = None) -> Transformer:
    """Load a PEFT LoRA adapter of a transformers Llama (``adapter_model.safetensors`` + ``adapter_config.json``,
    e.g. from :func:`export_peft_adapter` or ``PeftModel.save_pretrained``) into ``model``, the inverse of
    :func:`export_peft_adapter` (``lora_B`` of ``q_proj``/``k_proj`` back to interleaved rows). Otherwise as
    :func:`load_adapter`; PEFT options our LoRALinear has no equivalent for (DoRA, per-layer rank or alpha patterns,
    biases, ``layers_to_transform``, ``modules_to_save``, …) are an :class:`AdapterError` naming the option."""
    peft_dir = Path(peft_dir)
    config, tensors = _read_dir(peft_dir, PEFT_WEIGHTS)
    cfg_path = peft_dir / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    odd = [f"{k}={config[k]!r}" for k in _PEFT_UNSUPPORTED if config.get(k) not in _PEFT_EMPTY]
    if odd:
        raise AdapterError(f"{cfg_path}: PEFT option(s) {odd} have no equivalent in llama_ref's LoRALinear")
    hf_targets = config.get("target_modules")
    if not isinstance(hf_targets, list):
        raise AdapterError(f"{cfg_path}: target_modules {hf_targets!r} is not a list of module names (a regex is "
                           f"not supported)")
    by_hf = {meta_to_hf_module(_module_name(0, t)).rsplit(".", 1)[1]: t for t in ALL_TARGETS}
    unknown = [t for t in hf_targets if t not in by_hf]
    if unknown:
        raise AdapterError(f"{cfg_path}: target_modules {unknown} are not LoRA targets of llama_ref; expected some "
                           f"of {sorted(by_hf)}")
    spec = _spec_from(config, str(cfg_path), r_key="r", targets=[by_hf[t] for t in hf_targets])
    ours: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        try:
            name = hf_to_meta_module(m.group(1)) if m else None
        except ValueError:
            name = None
        if name is None:
            ours[key] = t  # reported as unexpected under its own name
            continue
        heads = rotary_heads(name, model.params)
        if m.group(2) == "lora_B" and heads is not None:
            try:
                t = unpermute_rotary(t, heads)
            except ValueError:
                pass  # rows that are no multiple of the heads: reported as a shape mismatch
        ours[f"{name}.{m.group(2)}"] = t
    return _load(model, spec, ours, f"PEFT adapter {peft_dir}", strict=strict, lora_dtype=lora_dtype)
