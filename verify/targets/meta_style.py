"""The target for Llama code in the shape of Meta's reference ``model.py`` (a fork, the seed report's, a user's own).

Recognised by what Meta's code has: an ``nn.Module`` whose ``forward`` takes ``(tokens, start_pos)`` and returns
logits, with attention modules holding their KV cache as ``cache_k`` / ``cache_v`` tensors of shape
(max_batch_size, max_seq_len, n_kv_heads, head_dim) — or (max_batch_size, n_kv_heads, max_seq_len, head_dim), told
apart by the number of KV heads (:func:`cache_extent`). Meta's own model always caches; the cache switch is taken as
the seed report wrote it (a ``kv_caching`` attribute on every attention module) or given as a callable
``kv_switch(model, on)``. Meta's ``forward`` runs under ``@torch.inference_mode()``: the KV and LoRA-merge checks
need no gradient; the others say they are not applicable.

Gradient checkpointing: the blocks are the modules holding each cached attention; the switch is the seed report's
(``params.use_gradient_checkpoint``, which checkpoints block i when ``i % 3 != 0``: the "seed" policy only) or given
as a callable ``gc_switch(model, blocks)`` checkpointing exactly the block indices it is given (any policy).

The uncached forward must leave the cache alone: if a cache tensor is written during it (or replaced), the switch
has no effect and the adapter says so instead of comparing the cache with itself.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..oracles import policy_layers
from .base import Target, copy_sharing_weights
from .protocols import Limits
from .decode import greedy_generate
from .lora import LoralibTarget, loralib_layers

KVSwitch = Callable[[nn.Module, bool], None]
GCSwitch = Callable[[nn.Module, frozenset[int]], None]  # checkpoint exactly these blocks (empty: none)
NEEDS_GRADIENTS = ("grad_accum", "mixed_precision", "gradient_checkpointing")
_NO_GRADIENT = ("the forward runs under torch.inference_mode() (Meta's decorator) or without autograd: no gradient "
                "reaches the parameters")


def _forward_parameters(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def cache_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules holding a Meta-style KV cache (``cache_k`` and ``cache_v`` tensors), in order."""
    return [m for m in module.modules()
            if isinstance(getattr(m, "cache_k", None), torch.Tensor) and isinstance(getattr(m, "cache_v", None),
                                                                                    torch.Tensor)]


_HEADS_ATTRS = ("n_local_kv_heads", "n_kv_heads", "num_key_value_heads", "n_kv_head")


def cache_extent(attention: nn.Module, params: Any = None) -> tuple[int, int]:
    """(max_batch_size, max_seq_len) of ``attention``'s cache, laid out (batch, positions, heads, head_dim) — Meta's —
    or (batch, heads, positions, head_dim) — gpt-fast's, litgpt's, torchtune's. The two are told apart by the number
    of KV heads, read from the attention module (``n_local_kv_heads``, ``n_kv_heads``, ``num_key_value_heads``) or
    the model's ``params`` (``n_kv_heads``, else ``n_heads``); where neither tells, TypeError names the shape (taking
    one axis for the other would check 2 positions and call it a pass)."""
    shape = tuple(attention.cache_k.shape)
    if len(shape) != 4:
        raise TypeError(f"cache_k of shape {shape}: expected 4 axes, (batch, positions, heads, head_dim) or "
                        "(batch, heads, positions, head_dim)")
    batch, a1, a2, _ = shape
    if a1 == a2:
        return batch, a1
    heads = next((v for v in (getattr(attention, a, None) for a in _HEADS_ATTRS) if isinstance(v, int)), None)
    if heads is None and params is not None:
        heads = getattr(params, "n_kv_heads", None) or getattr(params, "n_heads", None)
    if heads == a2:
        return batch, a1
    if heads == a1:
        return batch, a2
    raise TypeError(f"cache_k of shape {shape}: cannot tell its positions axis from its heads axis (KV heads known: "
                    f"{heads}); give the target max_seq_len=")


def meta_style_problems(obj: Any) -> list[str]:
    """What ``obj`` lacks to be adapted as a Meta-style model (empty: it can be)."""
    if not isinstance(obj, nn.Module):
        return [f"an nn.Module (got {type(obj).__qualname__})"]
    problems = []
    if _forward_parameters(obj)[:2] != ["tokens", "start_pos"]:
        problems.append(f"forward(tokens, start_pos) (its forward takes {tuple(_forward_parameters(obj))})")
    if not cache_modules(obj):
        problems.append("attention modules with cache_k / cache_v tensors")
    return problems


class MetaStyleTarget(Target):
    own_train_loop = False  # the GA check needs the user's training step
    def __init__(self, model: nn.Module, *, kv_switch: Optional[KVSwitch] = None,
                 gc_switch: Optional[GCSwitch] = None, vocab_size: Optional[int] = None,
                 checkpoints_in_eval: Optional[bool] = None, max_seq_len: Optional[int] = None):
        problems = meta_style_problems(model)
        if problems:
            raise TypeError(f"{type(model).__qualname__} is not a Meta-style model: it lacks {'; '.join(problems)}")
        self.model = model
        self.attention = cache_modules(model)
        self._kv_switch = kv_switch
        self._gc_switch = gc_switch
        self._vocab_size = vocab_size
        self._max_seq_len = max_seq_len
        self.checkpoints_in_eval = checkpoints_in_eval  # None: not declared (recomputing in train mode only: a note)
        self.description = f"Meta-style {type(model).__qualname__} ({len(self.attention)} cached attention modules)"

    # ---- what it offers ------------------------------------------------------------------------------------------

    def _switch_problem(self) -> Optional[str]:
        if self._kv_switch is not None:
            return None
        missing = [i for i, m in enumerate(self.attention) if not isinstance(getattr(m, "kv_caching", None), bool)]
        if missing:
            return ("no KV-cache switch: attention modules " + ", ".join(map(str, missing[:4]))
                    + (" …" if len(missing) > 4 else "") + " have no boolean kv_caching attribute (Meta's own code "
                    "always caches; give the target a kv_switch(model, on))")
        return None

    def not_applicable(self, prop: str) -> Optional[str]:
        try:
            self.limits  # the cache's layout recognised, or the property cannot be asked
        except TypeError as e:
            return str(e)
        if prop == "kv_cache":
            return self._switch_problem()
        if prop == "lora_merge":
            if not loralib_layers(self.model):
                return ("no LoRA layers of loralib's shape (modules with weight, lora_A, lora_B, r, lora_alpha, "
                        "merged, merge(), unmerge()): let the factory return the model with its adapters applied")
            return None
        if prop in NEEDS_GRADIENTS and self._forward_without_gradient():
            return _NO_GRADIENT + f", and {prop} needs one"
        if prop == "gradient_checkpointing":
            return self._gc_problem()
        if prop == "grad_accum":
            return None  # with the user's training step (the check says so when there is none)
        if prop == "mixed_precision":
            return None  # with the user's training step (the check says so when there is none)
        if prop == "loss_kernel":
            return None  # with the user's kernel (--loss-fn) and the model's output weight
        return f"the Meta-style adapter offers no operations for {prop}"

    def _forward_without_gradient(self) -> bool:
        """One token at position 0 through the forward in train mode (uncached where it can be; LoRA layers that
        merge on eval() are then unmerged) with autograd on: does its output have no gradient path although some
        parameter is trainable? A forward that raises is not judged here: the check that runs it reports the crash."""
        if not any(p.requires_grad for p in self.model.parameters()):
            return False  # nothing to differentiate: not the forward's doing
        tokens = torch.zeros((1, 1), dtype=torch.long, device=self.limits.device)
        switchable = self._switch_problem() is None
        with self.kv_session(), torch.enable_grad():
            self.model.train()  # kv_session restores the mode
            if switchable:
                self._set_kv_caching(False)
            try:
                out = self.model(tokens, 0)
            except Exception:
                return False
            finally:
                if switchable:
                    self._set_kv_caching(True)
        return torch.is_inference(out) or not out.requires_grad

    @property
    def limits(self) -> Limits:
        cache = self.attention[0].cache_k
        params = getattr(self.model, "params", None)
        vocab = self._vocab_size or getattr(params, "vocab_size", None)
        if vocab is None:
            emb = getattr(self.model, "tok_embeddings", None)
            vocab = getattr(emb, "num_embeddings", None)
        if not isinstance(vocab, int) or vocab < 1:
            raise TypeError(f"{self.description}: its vocabulary size is unknown (no params.vocab_size, no "
                            "tok_embeddings.num_embeddings); give the target vocab_size")
        weight = next(p for p in self.model.parameters() if p.is_floating_point())
        if self._max_seq_len is not None:
            return Limits(vocab, int(cache.shape[0]), self._max_seq_len, weight.dtype, weight.device)
        batch, positions = cache_extent(self.attention[0], params)
        return Limits(vocab, batch, positions, weight.dtype, weight.device)

    # ---- property 1 ----------------------------------------------------------------------------------------------

    def _set_kv_caching(self, on: bool, model: Optional[nn.Module] = None) -> None:
        """Switch the cache of ``model`` (this target's by default, or a copy of it)."""
        model = self.model if model is None else model
        if self._kv_switch is not None:
            self._kv_switch(model, on)
        else:
            for m in (self.attention if model is self.model else cache_modules(model)):
                m.kv_caching = on

    @contextlib.contextmanager
    def kv_session(self) -> Iterator[None]:
        model = self.model
        was_training = model.training
        saved = [(m.cache_k, m.cache_v, m.cache_k.clone(), m.cache_v.clone()) for m in self.attention]
        switches = [getattr(m, "kv_caching", None) for m in self.attention]  # restored as found
        model.eval()
        with torch.no_grad():
            for m in self.attention:
                m.cache_k.zero_()
                m.cache_v.zero_()
        try:
            yield
        finally:
            model.train(was_training)
            with torch.no_grad():
                for m, (k, v, k0, v0) in zip(self.attention, saved):
                    k.copy_(k0)
                    v.copy_(v0)
                    m.cache_k, m.cache_v = k, v
            if self._kv_switch is not None:
                self._kv_switch(self.model, True)  # a callable switch cannot be read back: Meta's default, cached
            for m, on in zip(self.attention, switches):
                if on is not None:
                    m.kv_caching = on

    def logits(self, tokens: torch.Tensor, start_pos: int, *, kv_caching: bool) -> torch.Tensor:
        if not kv_caching and start_pos != 0:
            raise ValueError(f"uncached logits start at position 0, not {start_pos}")
        before = [(m.cache_k, m.cache_k._version, m.cache_v, m.cache_v._version) for m in self.attention]
        self._set_kv_caching(kv_caching)
        try:
            with torch.no_grad():
                out = self.model(tokens, start_pos)
        finally:
            self._set_kv_caching(True)
        if not kv_caching:
            touched = [i for i, (m, (k, kv, v, vv)) in enumerate(zip(self.attention, before))
                       if m.cache_k is not k or m.cache_v is not v or k._version != kv or v._version != vv]
            if touched:
                raise RuntimeError(f"the cache of attention module(s) {touched[:4]} was written during a forward with "
                                   "the KV cache switched off: the switch has no effect, so the cached and uncached "
                                   "paths cannot be compared")
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_gen_len: int, *, kv_caching: bool
                 ) -> tuple[list[list[int]], list[list[float]]]:
        lim = self.limits
        return greedy_generate(self.logits, prompts, max_gen_len, lim.max_seq_len, lim.device, kv_caching=kv_caching)

    # ---- property 3 ----------------------------------------------------------------------------------------------

    def _uncached(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """``model(tokens, 0)``, with the cache switched off where there is a switch (a cached forward from
        position 0 over the whole sequence is the uncached one, where there is not)."""
        switchable = self._switch_problem() is None
        if switchable:
            self._set_kv_caching(False, model)
        try:
            return model(tokens, 0)
        finally:
            if switchable:
                self._set_kv_caching(True, model)

    def lora_target(self, *, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float, use_rslora: bool,
                    layer_cls: Optional[type] = None, generator: Optional[torch.Generator] = None) -> LoralibTarget:
        if layer_cls is not None:
            raise ValueError("layer_cls is swapped into llama_ref's model; a Meta-style model comes with its own "
                             "LoRA layers")
        no_gradient = _NO_GRADIENT if self._forward_without_gradient() else None
        return LoralibTarget(copy.deepcopy(self.model), self._uncached, no_gradient=no_gradient,
                             description=self.description)

    # ---- property 4 ----------------------------------------------------------------------------------------------

    def _seed_switch(self, model: nn.Module) -> bool:
        return isinstance(getattr(getattr(model, "params", None), "use_gradient_checkpoint", None), bool)

    def _gc_problem(self) -> Optional[str]:
        if self._gc_switch is not None or self._seed_switch(self.model):
            return None
        return ("no gradient-checkpointing switch: neither params.use_gradient_checkpoint (the seed report's) nor a "
                "gc_switch(model, blocks) given to the target")

    @property
    def policies(self) -> Optional[tuple[str, ...]]:
        return None if self._gc_switch is not None else ("seed",)

    def fresh_model(self) -> nn.Module:
        """A copy for training: its cache switched off where there is a switch (as a training loop does: the
        micro-batches may hold more rows than the cache)."""
        return self._uncached_copy(copy.deepcopy(self.model))

    def fresh_lora_model(self, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                         generator: torch.Generator) -> Optional[nn.Module]:
        if not loralib_layers(self.model):
            return None
        frozen = {id(p) for p in self.model.parameters() if not p.requires_grad}  # the LoRA base, only read
        return self._uncached_copy(copy_sharing_weights(self.model, frozen))

    def _uncached_copy(self, model: nn.Module) -> nn.Module:
        if self._switch_problem() is None:
            self._set_kv_caching(False, model)
        return model

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        attention = {id(m) for m in cache_modules(model)}
        return [m for m in model.modules() if any(id(c) in attention for c in m.children())]

    def set_checkpointing(self, model: nn.Module, policy: Optional[str], mode: Optional[str] = None) -> None:
        if self._gc_switch is not None:
            self._gc_switch(model, policy_layers(policy, len(self.blocks(model))))
        elif policy in (None, "seed"):
            model.params.use_gradient_checkpoint = policy is not None
        else:
            raise ValueError(f"policy {policy!r}: the seed report's switch checkpoints the 'seed' blocks only")

    def checkpointed_blocks(self, model: nn.Module) -> None:
        return None  # the user's code does not say; the check counts the recomputations

    def train_logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens, 0)  # a fresh_model copy: the cache is off where it can be
