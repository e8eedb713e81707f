"""The target for the input_pos family: Llama models called as ``forward(idx, input_pos=…)`` whose KV caches are
modules that a method of the model sets up — gpt-fast's ``setup_caches(max_batch_size, max_seq_length)``, litgpt's
``set_kv_cache(batch_size, max_seq_length=…)``, torchtune's ``setup_caches(batch_size, dtype,
decoder_max_seq_len=…)`` (a fixed batch size, a cache that keeps its own position: ``reset_caches()``; with caches,
``forward`` takes the ``mask`` (B, T, S) and ``input_pos`` (B, T) its caller builds).

Recognised by what such a model is: an ``nn.Module`` whose ``forward`` takes ``input_pos`` and which has one of
those methods. The caches are set up on copies sharing the model's weights, the caller's own caches taken out of the
copies (the caller's model is never changed); the cached path is ``forward(tokens, input_pos=positions)``; the
uncached path never touches the session's cache (:meth:`InputPosTarget._plain`: litgpt, ``input_pos`` left out;
torchtune, caches disabled and a causal mask given; gpt-fast, which has no path without its cache, one pass from
position 0 on a copy of its own with an empty cache), and a cache buffer written or replaced during it is an error,
not a comparison. gpt-fast's and torchtune's caches have a fixed batch size: each batch size gets its own
(``cache_caveat`` says what that leaves unexamined). gpt-fast's model does not train: properties 2, 4, 5 are N/A.

Gradient checkpointing is switched the way torchtune's ``set_activation_checkpointing`` and Lightning do: each
selected block wrapped in torch's ``CheckpointWrapper`` (non-reentrant; ``gc_switch(model, blocks)`` for another
way); the blocks are the model's longest ``nn.ModuleList``. LoRA: the adapters the model comes with
(:mod:`verify.targets.lora`): loralib-shaped layers; torchtune's, merged as a checkpoint by its
``get_merged_lora_ckpt``; litgpt's, which merge in place (their fused query/key/value adapter included) and cannot
unmerge. Properties 2 and 5 run the user's training step; property 7, torchtune's packed path
(:mod:`verify.targets.input_pos_packing`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..oracles import policy_layers
from .base import Target, copy_sharing_weights, unwrapped
from .decode import greedy_generate
from .input_pos_packing import TorchtunePacking
from .lora import LoralibTarget, StateDictMergeTarget, loralib_layers, merge_only_layers, state_dict_lora_layers
from .protocols import Limits

GCSwitch = Callable[[nn.Module, frozenset[int]], None]
_SETUP = ("set_kv_cache", "setup_caches")
_CACHE_BUFFERS = (("k_cache", "v_cache"), ("k", "v"))
_NEEDS_GRADIENTS = ("grad_accum", "mixed_precision", "gradient_checkpointing")


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def input_pos_problems(obj: Any) -> list[str]:
    """What ``obj`` lacks to be adapted as an input_pos-family model (empty: it can be)."""
    if not isinstance(obj, nn.Module):
        return [f"an nn.Module (got {type(obj).__qualname__})"]
    problems = []
    if not _takes(obj.forward, "input_pos"):
        problems.append("a forward taking input_pos")
    if not any(callable(getattr(obj, m, None)) for m in _SETUP):
        problems.append("setup_caches(…) or set_kv_cache(…)")
    return problems


def cache_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Every KV-cache buffer of ``model`` (``k_cache``/``v_cache`` or ``k``/``v`` pairs of 4-D tensors)."""
    found = []
    for m in model.modules():
        for k, v in _CACHE_BUFFERS:
            pair = (getattr(m, k, None), getattr(m, v, None))
            if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in pair):
                found += pair
    return found


class InputPosTarget(TorchtunePacking, Target):
    """A model of the input_pos family (see the module's doc); ``max_batch_size`` / ``max_seq_len`` size the cache the
    KV check sets up (``max_seq_len`` defaults to the model's ``config.block_size`` / ``max_seq_len``, capped at 64:
    the check needs a few dozen positions, not the model's whole context)."""

    own_train_loop = False  # properties 2 and 5 need the user's training step

    def __init__(self, model: nn.Module, *, max_batch_size: int = 4, max_seq_len: Optional[int] = None,
                 vocab_size: Optional[int] = None, gc_switch: Optional[GCSwitch] = None,
                 checkpoints_in_eval: Optional[bool] = None):
        problems = input_pos_problems(model)
        if problems:
            raise TypeError(f"{type(model).__qualname__} is not an input_pos-family model: it lacks "
                            + "; ".join(problems))
        self.model = model
        self.style = ("litgpt" if callable(getattr(model, "set_kv_cache", None)) else
                      "torchtune" if _takes(model.setup_caches, "dtype") else "gpt-fast")
        self._max_batch_size, self._max_seq_len, self._vocab_size = max_batch_size, max_seq_len, vocab_size
        self._gc_switch = gc_switch
        self.checkpoints_in_eval = checkpoints_in_eval
        self._live: Optional[nn.Module] = None  # the session's copy, caches set up
        self.description = f"input_pos-family {type(model).__qualname__} ({self.style}-style caches)"

    # ---- what it is ----------------------------------------------------------------------------------------------

    def _config(self, *names: str) -> Optional[int]:
        """The first positive int among ``names`` in the model's config, params, or the model (gpt-fast keeps -1 in
        ``max_seq_length`` until its caches are set up)."""
        for holder in (getattr(self.model, "config", None), getattr(self.model, "params", None), self.model):
            for n in names:
                v = getattr(holder, n, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
        return None

    @property
    def limits(self) -> Limits:
        vocab = self._vocab_size or self._config("vocab_size", "padded_vocab_size")
        if vocab is None:
            emb = next((m for m in self.model.modules() if isinstance(m, nn.Embedding)), None)
            vocab = emb.num_embeddings if emb is not None else None
        if vocab is None:
            raise TypeError(f"{self.description}: its vocabulary size is unknown (no config.vocab_size, no "
                            "nn.Embedding); give the target vocab_size")
        length = self._max_seq_len or min(64, self._config("block_size", "max_seq_len", "max_seq_length") or 64)
        weight = next(p for p in self.model.parameters() if p.is_floating_point())
        return Limits(vocab, self._max_batch_size, length, weight.dtype, weight.device)

    @property
    def cache_caveat(self) -> Optional[str]:
        """What the KV check cannot ask of this cache (KVCacheTarget.cache_caveat)."""
        if self.style == "litgpt":
            return None
        return (f"{self.style}'s cache has a fixed batch size: each batch size gets a cache of its own, set up empty "
                "on its own copy" + (", emptied for each new sequence" if self.style == "torchtune" else "")
                + ", so rows left by a larger batch and the poisoning data are not examined")

    def not_applicable(self, prop: str) -> Optional[str]:
        try:
            self.limits
        except TypeError as e:
            return str(e)
        if (prop == "lora_merge" and not loralib_layers(self.model) and not self._state_dict_merge()
                and not merge_only_layers(self.model)):
            other = next((m for m in self.model.modules() if any(hasattr(m, a) for a in ("lora_a", "lora_A"))), None)
            if other is not None:  # torchtune's (lora_a/lora_b, merged into a state dict), litgpt's (merge() only)
                lacks = [a for a in ("merge", "unmerge", "merged") if not hasattr(other, a)]
                return (f"its LoRA layers ({type(other).__qualname__}) have no {', '.join(lacks)}: the merge check "
                        "takes the library's merge and unmerge, or its state-dict merge (torchtune's, where torchtune "
                        "is installed); not checked")
            return ("no LoRA layers of loralib's shape (modules with weight, lora_A, lora_B, r, lora_alpha, merged, "
                    "merge(), unmerge()): let the factory return the model with its adapters applied")
        if prop == "packing":
            return self._why_no_packing()
        if prop in _NEEDS_GRADIENTS and self.style == "gpt-fast":
            return (f"gpt-fast's forward runs only with its caches set up (an inference model, no training path): "
                    f"{prop} needs a trainable forward")
        if prop in _NEEDS_GRADIENTS and any(p.requires_grad for p in self.model.parameters()):
            try:
                with torch.enable_grad():
                    out = self.train_logits(self.fresh_model(),
                                            torch.zeros((1, 1), dtype=torch.long, device=self.limits.device))
            except Exception:  # not judged here: the check that runs the forward reports what it raised
                return None
            if torch.is_inference(out) or not out.requires_grad:
                return f"the forward lets no gradient through (inference_mode or no_grad), and {prop} needs one"
        return None

    # ---- property 1 ----------------------------------------------------------------------------------------------

    def _copy(self) -> nn.Module:
        """A copy sharing the model's weights, with no cache set up (whatever the caller's model holds)."""
        return self._without_caches(copy_sharing_weights(self.model))

    def _without_caches(self, model: nn.Module) -> nn.Module:
        """``model`` (one of this target's copies) with its cache modules taken out, in place, so that a
        ``setup_caches`` sets up new ones: torchtune's and gpt-fast's skip what is set up already (gpt-fast's also
        returns early where its recorded sizes suffice)."""
        for m in list(model.modules()):
            if isinstance(getattr(m, "kv_cache", None), nn.Module):
                m.kv_cache = None
        if self.style == "gpt-fast":
            for attr in ("max_batch_size", "max_seq_length"):
                if isinstance(getattr(model, attr, None), int):
                    setattr(model, attr, -1)
        return model

    def _setup(self, model: nn.Module, batch: int) -> None:
        lim = self.limits
        if self.style == "litgpt":
            model.set_kv_cache(batch, max_seq_length=lim.max_seq_len, device=lim.device, dtype=lim.dtype)
        elif self.style == "torchtune":
            model.setup_caches(batch, lim.dtype, decoder_max_seq_len=lim.max_seq_len)
        else:
            model.setup_caches(batch, lim.max_seq_len)

    def _cached_copy(self, batch: int) -> nn.Module:
        model = self._copy().eval()
        self._setup(model, batch)
        return model

    @contextlib.contextmanager
    def kv_session(self) -> Iterator[None]:
        # the caller's model keeps its mode and its caches; gpt-fast's uncached reference is a copy of its own
        self._live, self._rows, self._next = self._cached_copy(self._max_batch_size), self._max_batch_size, 0
        self._reference = self._copy().eval() if self.style == "gpt-fast" else None
        try:
            yield
        finally:
            self._live = self._reference = None

    def logits(self, tokens: torch.Tensor, start_pos: int, *, kv_caching: bool) -> torch.Tensor:
        live = getattr(self, "_live", None)
        if live is None:
            raise RuntimeError("logits asked outside kv_session(): no cache is set up")
        bsz, seqlen = tokens.shape
        with torch.no_grad():
            if not kv_caching:
                if start_pos != 0:
                    raise ValueError(f"uncached logits start at position 0, not {start_pos}")
                return self._uncached(tokens)
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
            if self.style == "litgpt":
                return live(tokens, input_pos=positions)
            # gpt-fast's and torchtune's caches: a fixed batch; torchtune's also keeps its own position
            if start_pos == 0 and bsz != self._rows:
                self._live = live = self._cached_copy(bsz)
                self._rows = bsz
            elif start_pos == 0 and self.style == "torchtune":
                live.reset_caches()
            if self.style == "gpt-fast":
                return live(tokens, input_pos=positions)
            if start_pos not in (0, self._next):
                raise ValueError(f"the cache holds {self._next} positions; a call at {start_pos} cannot follow")
            self._next = start_pos + seqlen
            slots = torch.arange(self.limits.max_seq_len, device=tokens.device)
            mask = (slots[None, None, :] <= positions[None, :, None]).expand(bsz, seqlen, -1)
            return live(tokens, mask=mask, input_pos=positions[None].expand(bsz, seqlen))

    def _uncached(self, tokens: torch.Tensor) -> torch.Tensor:
        """The session's cache neither read nor written: litgpt, the model without ``input_pos``; torchtune, its
        caches disabled and a causal mask given (with caches set up, its attention is causal only if masked);
        gpt-fast, which has no path without its cache, one pass from position 0 on a copy of its own whose cache is
        set up empty for the call."""
        before = [(id(b), b._version) for b in cache_buffers(self._live)]
        out = self._plain(self._reference if self.style == "gpt-fast" else self._live, tokens)
        if [(id(b), b._version) for b in cache_buffers(self._live)] != before:
            raise RuntimeError("a KV-cache buffer was written or replaced during the forward without caches: the "
                               "cached and uncached paths cannot be compared")
        return out

    @contextlib.contextmanager
    def _caches_off(self, model: nn.Module) -> Iterator[None]:
        """torchtune: every ``cache_enabled`` flag off for the block."""
        saved = [m for m in model.modules() if getattr(m, "cache_enabled", None) is True]
        for m in saved:
            m.cache_enabled = False
        try:
            yield
        finally:
            for m in saved:
                m.cache_enabled = True

    def generate(self, prompts: Sequence[Sequence[int]], max_gen_len: int, *, kv_caching: bool
                 ) -> tuple[list[list[int]], list[list[float]]]:
        lim = self.limits
        return greedy_generate(self.logits, prompts, max_gen_len, lim.max_seq_len, lim.device, kv_caching=kv_caching)

    # ---- property 3 ----------------------------------------------------------------------------------------------

    def lora_target(self, *, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                    use_rslora: bool, layer_cls: Optional[type] = None, generator: Optional[torch.Generator] = None
                    ) -> LoralibTarget:
        if layer_cls is not None:
            raise ValueError("layer_cls is swapped into llama_ref's model; this model comes with its own LoRA layers")
        no_gradient = "gpt-fast's forward runs through its caches (an inference model)" \
            if self.style == "gpt-fast" else None
        merge_fn = self._state_dict_merge() if not loralib_layers(self.model) else None
        if merge_fn is not None:
            return StateDictMergeTarget(self._without_caches(copy.deepcopy(self.model)), self._plain, merge_fn,
                                        description=self.description, no_gradient=no_gradient,
                                        unmerge_missing="torchtune merges a LoRA checkpoint (get_merged_lora_ckpt): "
                                                        "there is no unmerge")
        model = self._without_caches(copy.deepcopy(self.model))
        if not loralib_layers(model) and merge_only_layers(model):  # litgpt's: merge() and no unmerge
            kind = ", ".join(dict.fromkeys(type(m).__qualname__ for m in merge_only_layers(model).values()))
            return LoralibTarget(model, self._plain, no_gradient=no_gradient, description=self.description,
                                 find_layers=merge_only_layers,
                                 unmerge_missing=f"its LoRA layers ({kind}) merge in place and have no unmerge")
        return LoralibTarget(model, self._plain, no_gradient=no_gradient, description=self.description)

    def _state_dict_merge(self) -> Optional[Callable[..., dict]]:
        """torchtune's ``get_merged_lora_ckpt`` where the model's adapters are torchtune's and it imports; else None."""
        if not state_dict_lora_layers(self.model):
            return None
        try:
            from torchtune.modules.peft import get_merged_lora_ckpt
        except ImportError:
            return None
        return get_merged_lora_ckpt

    # ---- properties 2, 4, 5 --------------------------------------------------------------------------------------

    def fresh_model(self) -> nn.Module:
        return self._without_caches(copy.deepcopy(self.model))

    def fresh_lora_model(self, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                         generator: torch.Generator) -> Optional[nn.Module]:
        """The model as it comes, adapted (some parameters frozen, some trainable: its own LoRA, of any shape), its
        frozen base shared; None where nothing is frozen."""
        frozen = {id(p) for p in self.model.parameters() if not p.requires_grad}
        if not frozen or len(frozen) == sum(1 for _ in self.model.parameters()):
            return None
        return self._without_caches(copy_sharing_weights(self.model, frozen))

    def train_logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The plain forward from position 0 (a training copy has no cache set up)."""
        return self._plain(model, tokens)

    def _plain(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from position 0 in one pass, no cache read: litgpt, the model without ``input_pos``; torchtune,
        with any caches disabled and a causal mask given (with caches set up its attention is causal only if
        masked); gpt-fast, which has no path without its cache, on ``model`` with an empty cache set up for the
        call (``model`` is one of this target's copies)."""
        bsz, seqlen = tokens.shape
        if self.style == "gpt-fast":
            self._setup(self._without_caches(model), bsz)
            return model(tokens, input_pos=torch.arange(seqlen, device=tokens.device))
        if self.style == "torchtune" and any(getattr(m, "cache_enabled", None) is True for m in model.modules()):
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=tokens.device).tril()
            with self._caches_off(model):
                return model(tokens, mask=causal.expand(bsz, seqlen, seqlen))
        return model(tokens)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        return list(max(lists, key=len)) if lists else []

    def set_checkpointing(self, model: nn.Module, policy: Optional[str], mode: Optional[str] = None) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
        blocks = self.blocks(model)
        chosen = policy_layers(policy, len(blocks)) if policy else frozenset()
        if self._gc_switch is not None:
            self._gc_switch(model, chosen)
            return
        holder = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
        for i, block in enumerate(holder):
            block = unwrapped(block)
            holder[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT) if i in chosen else block

    def checkpointed_blocks(self, model: nn.Module) -> Optional[frozenset[int]]:
        if self._gc_switch is not None:
            return None  # the user's switch does not say; the check counts the recomputations
        return frozenset(i for i, b in enumerate(self.blocks(model)) if unwrapped(b) is not b)
