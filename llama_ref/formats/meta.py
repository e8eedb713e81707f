"""Meta's checkpoint format: a directory with ``params.json`` and ``consolidated.00.pth`` (``.01.pth``, … when the
model was saved model-parallel), loaded strictly and safely, saved atomically.

* **Safe.** Every shard is read with ``torch.load(weights_only=True)``: a file whose pickle would build anything but
  tensors and plain containers (e.g. run code through ``__reduce__``) is refused with a :class:`CheckpointError`.
* **Strict.** Keys and shapes are checked against :func:`expected_shapes`; one error lists every missing key,
  every unexpected key and every shape mismatch. Llama 2's ``rope.freqs`` (a derived buffer) is dropped silently.
* **Shards** are merged as Meta's model-parallel layers split them: column-parallel weights (wq, wk, wv, w1, w3,
  output) on dim 0, row-parallel ones (wo, w2) on dim 1, norms replicated (shard 0, the others checked equal).
  ``tok_embeddings`` is split on dim 1 in Llama 2 (ParallelEmbedding) and on dim 0 in Llama 3
  (VocabParallelEmbedding); the dim whose concatenation gives ``(vocab, dim)`` is chosen.
* **Tied output.** A checkpoint without ``output.weight`` loads as a tied model (``output.weight`` *is*
  ``tok_embeddings.weight``) unless the caller passes ``tie_embeddings=False``, which starts the output as a copy.
  A tied ``params.json`` with an ``output.weight`` in the file requires the two to be equal. When saving a tied
  model we *do* write ``output.weight`` (sharing the embedding's storage, so it costs no space): Meta's Llama 3.2
  files contain it and Meta's loader expects it; ``"tie_embeddings": true`` in ``params.json`` rebuilds the tie.
* **Atomic save.** Both files are written to temporary files in the target directory, fsynced, then moved into
  place with ``os.replace``; a failure leaves the previous files untouched and no temporary file behind.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..args import ModelArgs
from ..model import Transformer
from .atomic import atomic_write_files

PARAMS_FILE = "params.json"
SHARD_FORMAT = "consolidated.{:02d}.pth"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
_DERIVED_KEYS = ("rope.freqs",)  # buffers Meta's older checkpoints carry; recomputed here, never loaded
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be loaded as the model its ``params.json`` describes."""


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Key → shape of every tensor of a checkpoint for ``args``, ``output.weight`` included (also when tied:
    see the module docstring). Raises ValueError while ``args.vocab_size`` is still -1."""
    if args.vocab_size <= 0:
        raise ValueError(f"ModelArgs.vocab_size is {args.vocab_size}: set it from the tokenizer first")
    d, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (hidden, d),
            p + "feed_forward.w2.weight": (d, hidden),
            p + "feed_forward.w3.weight": (hidden, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def load_params(ckpt_dir: str | Path, *, tokenizer: Any = None, **overrides: Any) -> ModelArgs:
    """``ckpt_dir/params.json`` as ModelArgs, with ``overrides`` (``max_seq_len``, ``max_batch_size``, and
    ``vocab_size``) applied; a ``vocab_size`` of -1 (Llama 2's files) still left is the ``tokenizer``'s
    ``n_words`` when one is given — the one place that fix-up is made. FileNotFoundError when the file is
    missing."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no {PARAMS_FILE}; a Meta checkpoint directory holds {PARAMS_FILE} and "
                                f"{SHARD_FORMAT.format(0)} (then {SHARD_FORMAT.format(1)}, … when model-parallel)")
    args = ModelArgs.from_json(path, **overrides)
    if args.vocab_size == -1 and tokenizer is not None:
        args = args.replace(vocab_size=tokenizer.n_words)
    return args


def load_state_dict(ckpt_dir: str | Path, args: ModelArgs, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Every ``consolidated.NN.pth`` of ``ckpt_dir``, merged and validated against ``args``.

    The result has exactly the keys of :func:`expected_shapes`; where the file has no ``output.weight`` the entry
    is the ``tok_embeddings.weight`` tensor itself (a tied output). Tensors stay in the file's dtype, on the CPU,
    memory-mapped where ``mmap`` and the file format allow (legacy non-zip files are read whole).
    Raises CheckpointError (a ValueError) for anything that does not match, FileNotFoundError for no shards.
    """
    ckpt_dir = Path(ckpt_dir)
    state = _read_merged(ckpt_dir, args.dim, mmap=mmap)
    return _validate(state, args, ckpt_dir)


def load_model(ckpt_dir: str | Path, *, device: Optional[torch.device | str] = None,
               dtype: Optional[torch.dtype] = None, tokenizer: Any = None, **overrides: Any) -> Transformer:
    """``params.json`` (with ``overrides``) and weights → a Transformer on ``device`` (default CPU) in ``dtype``
    (default: the checkpoint's own, e.g. bf16 for Meta's files; only floating tensors are cast).

    The model is built on the meta device and takes the loaded tensors over (``assign=True``), so its weights are
    allocated once (on the CPU in the file's dtype they stay memory-mapped, copy-on-write: replace a checkpoint
    with :func:`save_checkpoint`, never rewrite it in place). ``vocab_size`` -1 (Llama 2) is the ``tokenizer``'s
    (see :func:`load_params`), or without one the embedding's rows. Without ``output.weight`` in
    the file the model is tied, unless ``tie_embeddings=False`` is passed (then the output starts as a copy); so
    is one whose ``output.weight`` equals ``tok_embeddings.weight`` exactly where ``params.json`` does not say
    ``tie_embeddings`` either way (Meta's Llama 3.2 1B and 3B files: tied models saved with both keys).
    """
    ckpt_dir = Path(ckpt_dir)
    args = load_params(ckpt_dir, tokenizer=tokenizer, **overrides)
    state = _read_merged(ckpt_dir, args.dim, mmap=True)
    emb = state.get("tok_embeddings.weight")
    if args.vocab_size == -1 and emb is not None and emb.dim() == 2:
        args = args.replace(vocab_size=emb.shape[0])
    if "output.weight" not in state and overrides.get("tie_embeddings", True):
        args = args.replace(tie_embeddings=True)
    elif (not args.tie_embeddings and "tie_embeddings" not in overrides and not _says_tied(ckpt_dir)
          and _equal(state.get("output.weight"), emb)):
        args = args.replace(tie_embeddings=True)  # Meta's Llama 3.2 1B/3B files: the head saved, equal, no key
    state = _validate(state, args, ckpt_dir)
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    elif state["output.weight"] is state["tok_embeddings.weight"]:
        state["output.weight"] = state["tok_embeddings.weight"].clone()

    device = torch.device(device) if device is not None else torch.device("cpu")
    cast: dict[int, torch.Tensor] = {}  # by id: a tensor shared by two keys stays shared after the cast
    for key, t in state.items():
        if id(t) not in cast:
            cast[id(t)] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        state[key] = cast[id(t)]

    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave each module its own Parameter
    materialize_buffers(model, device, state["tok_embeddings.weight"].dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{ckpt_dir}: still on the meta device after loading: {left}")
    return model


def materialize_buffers(model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
    """Zeros on ``device`` for every buffer still on the meta device (the non-persistent KV caches of a model built
    there and given its weights with ``assign=True``): floating ones in ``dtype``."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, device=device,
                                                  dtype=dtype if buf.is_floating_point() else buf.dtype))


def _says_tied(ckpt_dir: Path) -> bool:
    """Whether ``params.json`` states ``tie_embeddings`` at all (true or false: either way it is not inferred)."""
    try:
        return "tie_embeddings" in json.loads((ckpt_dir / "params.json").read_text())
    except (OSError, ValueError):
        return False


def _equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def save_checkpoint(model: Transformer, ckpt_dir: str | Path, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``params.json`` and ``consolidated.00.pth`` (CPU tensors, floating ones cast to ``dtype`` if given)
    into ``ckpt_dir`` atomically; return ``ckpt_dir``. A model whose state_dict is not a plain Llama (e.g. unmerged
    LoRA layers) is refused, as is a directory holding other shards that would be merged with the new one."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in _shard_paths(ckpt_dir) if p.name != SHARD_FORMAT.format(0)]
    if stale:
        raise FileExistsError(f"{ckpt_dir}: holds other shards {stale} that would be merged with the new "
                              f"{SHARD_FORMAT.format(0)}; remove them or choose another directory")

    state: dict[str, torch.Tensor] = {}
    cast: dict[tuple, torch.Tensor] = {}  # tied weights share a storage in the file, as in the model
    for key, t in model.state_dict().items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident not in cast:
            cast[ident] = t.to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else None,
                               copy=False).contiguous()
        state[key] = cast[ident]
    _check_keys_and_shapes(state, model.params, f"model to save into {ckpt_dir}")
    tied = model.output.weight is model.tok_embeddings.weight
    if model.params.tie_embeddings and not tied:
        raise ValueError(f"model to save into {ckpt_dir}: params.tie_embeddings is set but its head is a tensor of "
                         "its own: the file would be refused on load (merge_and_unload records an untying merge)")
    params_json = model.params.to_params_json()
    if not tied and torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        params_json["tie_embeddings"] = False  # else an equal head reads as Meta's tied files: untied on purpose
    params = json.dumps(params_json, indent=2) + "\n"

    # The weights first, params.json (what makes the directory a checkpoint) last.
    atomic_write_files(ckpt_dir, {SHARD_FORMAT.format(0): lambda f: torch.save(state, f),
                                  PARAMS_FILE: params})
    return ckpt_dir


# --- reading --------------------------------------------------------------------------------------------------

def _shard_paths(ckpt_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("consolidated.*.pth") if (m := _SHARD_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _load_file(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    # mmap needs torch's zip format; legacy (pre-1.6) files are read whole.
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{path}: refused — the file contains non-tensor objects that torch.load("
                                  f"weights_only=True) will not build (a pickle that could run code); "
                                  f"only load it with weights_only=False if you trust its source") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({type(e).__name__}: {e})") from None
    except Exception as e:  # garbage bytes surface as KeyError, EOFError, RuntimeError, … depending on the format
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is a {type(key).__name__}, expected str")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} holds a {type(value).__name__}, expected a tensor")
        if key not in _DERIVED_KEYS:
            state[key] = value.detach()
    return state


def _read_merged(ckpt_dir: Path, dim: int, *, mmap: bool) -> dict[str, torch.Tensor]:
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory (expected {PARAMS_FILE} and "
                                f"{SHARD_FORMAT.format(0)}, …)")
    paths = _shard_paths(ckpt_dir)
    if not paths:
        raise FileNotFoundError(f"{ckpt_dir}: no weight files; expected {SHARD_FORMAT.format(0)} (then "
                                f"{SHARD_FORMAT.format(1)}, … when model-parallel)")
    names = [p.name for p in paths]
    gaps = [SHARD_FORMAT.format(i) for i in range(len(paths)) if SHARD_FORMAT.format(i) not in names]
    if gaps:
        raise CheckpointError(f"{ckpt_dir}: shards {names} are not numbered 00…{len(paths) - 1:02d}; "
                              f"missing {gaps}")
    shards = [_load_file(p, mmap) for p in paths]
    return shards[0] if len(shards) == 1 else _merge_shards(shards, names, dim, ckpt_dir)


def _merge_shards(shards: Sequence[dict[str, torch.Tensor]], names: Sequence[str], dim: int, ckpt_dir: Path
                  ) -> dict[str, torch.Tensor]:
    problems: list[str] = []
    keys = list(dict.fromkeys(k for s in shards for k in s))
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        absent = [n for n, s in zip(names, shards) if key not in s]
        if absent:
            problems.append(f"{key!r} absent from {absent}")
            continue
        parts = [s[key] for s in shards]
        shapes = [tuple(t.shape) for t in parts]
        if key.endswith("norm.weight"):
            differ = [n for n, t in zip(names[1:], parts[1:])
                      if t.shape != parts[0].shape or not torch.equal(t, parts[0])]
            if differ:
                problems.append(f"{key!r} is replicated but differs from {names[0]} in {differ}")
            merged[key] = parts[0]
            continue
        if key.endswith(_COLUMN_PARALLEL):
            cat_dim: Optional[int] = 0
        elif key.endswith(_ROW_PARALLEL):
            cat_dim = 1
        elif key == "tok_embeddings.weight":
            if all(len(s) == 2 and s[1] == dim for s in shapes):
                cat_dim = 0  # Llama 3: VocabParallelEmbedding
            elif all(len(s) == 2 for s in shapes) and sum(s[1] for s in shapes) == dim:
                cat_dim = 1  # Llama 2: ParallelEmbedding
            else:
                problems.append(f"{key!r}: shard shapes {shapes} concatenate to (vocab, {dim}) on neither dim")
                continue
        else:
            cat_dim = None  # not a Llama key: reported as unexpected by the validation
        if cat_dim is None:
            merged[key] = parts[0]
            continue
        try:
            merged[key] = torch.cat(parts, dim=cat_dim)
        except (RuntimeError, IndexError):
            problems.append(f"{key!r}: shard shapes {shapes} do not concatenate on dim {cat_dim}")
    if problems:
        raise CheckpointError(f"{ckpt_dir}: cannot merge shards {list(names)}: {listing(problems)}")
    return merged


# --- validation -----------------------------------------------------------------------------------------------

def listing(items: Sequence[str]) -> str:
    """``items`` joined by commas, the first few only, then how many more (an error message's list of keys)."""
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def key_problems(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], *,
                 optional: Sequence[str] = (), strict: bool = True) -> list[str]:
    """One line per kind of mismatch between ``tensors`` and the ``expected`` shapes (missing and unexpected keys
    only when ``strict``; shape mismatches always), each listing the keys: what a state-dict error message says."""
    missing = [k for k in expected if k not in tensors and k not in optional]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [f"{k!r}: got {tuple(t.shape)}, expected {expected[k]}"
                  for k, t in tensors.items() if k in expected and tuple(t.shape) != tuple(expected[k])]
    lines = []
    if strict and missing:
        lines.append(f"{len(missing)} missing key(s): {listing([repr(k) for k in missing])}")
    if strict and unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): {listing([repr(k) for k in unexpected])}")
    if mismatched:
        lines.append(f"{len(mismatched)} shape mismatch(es): {listing(mismatched)}")
    return lines


def _check_keys_and_shapes(state: dict[str, torch.Tensor], args: ModelArgs, source: str,
                           optional: Sequence[str] = ()) -> None:
    lines = key_problems(state, expected_shapes(args), optional=optional)
    if lines:
        raise CheckpointError(f"{source} does not match ModelArgs(dim={args.dim}, n_layers={args.n_layers}, "
                              f"n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, vocab_size={args.vocab_size}, "
                              f"ffn_hidden_dim={args.ffn_hidden_dim}):\n  " + "\n  ".join(lines))


def _validate(state: dict[str, torch.Tensor], args: ModelArgs, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    source = f"checkpoint {ckpt_dir} ({', '.join(p.name for p in _shard_paths(ckpt_dir))})"
    _check_keys_and_shapes(state, args, source, optional=("output.weight",))
    state = dict(state)
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    elif args.tie_embeddings and not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        diff = (state["output.weight"].double() - state["tok_embeddings.weight"].double()).abs().max().item()
        raise CheckpointError(f"{source}: tie_embeddings is set but output.weight differs from "
                              f"tok_embeddings.weight (max abs difference {diff:.3g})")
    return state
