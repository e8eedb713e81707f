"""What a check needs of the implementation under test: a *target*, offering the few operations of each property.

A check takes a target (or a model, which :func:`verify.targets.spec.as_target` adapts), never a concrete model
class. The adapters: :mod:`verify.targets.llama_ref` (this project's ``Transformer``, the only module of ``verify/``
checks reach ``llama_ref`` through) and :mod:`verify.targets.meta_style` (any ``nn.Module`` with Meta's
``forward(tokens, start_pos)`` and per-layer ``cache_k``/``cache_v``).

A target that cannot be asked a property says why (:meth:`Target.not_applicable`); the check then reports
"not applicable" with that reason, never PASS.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class Limits:
    """What inputs the model takes: ids below ``vocab_size``, at most ``max_batch_size`` rows (its KV cache's) and
    ``max_seq_len`` positions; the dtype and device of its weights."""

    vocab_size: int
    max_batch_size: int
    max_seq_len: int
    dtype: torch.dtype
    device: torch.device


@runtime_checkable
class KVCacheTarget(Protocol):
    """Property 1 (the KV cache changes nothing)."""

    @property
    def limits(self) -> Limits: ...

    def kv_session(self) -> ContextManager[None]:
        """Eval mode and an empty cache (of the implementation's own class) for the length of the block; on exit the
        model is as it was: mode, cache setting, cache contents."""
        ...

    def logits(self, tokens: torch.Tensor, start_pos: int, *, kv_caching: bool) -> torch.Tensor:
        """Logits (B, T, V) of ``tokens`` (B, T) at positions ``start_pos …``, without gradient. Cached: through the
        cache, which the call extends. Uncached: ``start_pos`` is 0 and the cache is neither read nor written."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], max_gen_len: int, *, kv_caching: bool
                 ) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy generation of ``max_gen_len`` tokens after each (ragged) prompt, no stop tokens: the new tokens
        and the log-probability of each, per row."""
        ...


@runtime_checkable
class LoRALayer(Protocol):
    """One adapted Linear, read live (:class:`verify.targets.lora.LoRALayerView` for loralib's shape)."""

    name: str
    weight: torch.Tensor  # the base weight (out, in); W + scaling·B·A while merged
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    rank: int
    alpha: float
    use_rslora: bool
    dropout: float  # on the adapter's input; inactive in eval mode
    merged: bool
    merges_on_eval: Optional[bool]  # eval() merges and train() unmerges; None: the mode does not merge

    def set_merges_on_eval(self, on: bool) -> None: ...
    def merge(self) -> None: ...
    def unmerge(self) -> None: ...


@runtime_checkable
class LoRATarget(Protocol):
    """Property 3 (merging LoRA changes nothing): a fresh copy of the model with its adapters, which the check may
    change at will (:class:`verify.targets.lora.LoralibTarget`); a target makes one with ``lora_target(...)``."""

    description: str
    layers: Sequence[LoRALayer]
    no_gradient: Optional[str]  # why a backward cannot reach the parameters; None where it can

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Uncached logits (B, L, V) in the current mode; with autograd where the forward allows it."""
        ...

    def base_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model without adapters, eval mode, no gradient."""
        ...

    def train(self, mode: bool = True) -> None:
        """The model's own mode switch."""
        ...

    def merge(self) -> None: ...
    def unmerge(self) -> None: ...

    def to_float64(self) -> "LoRATarget":
        """The model converted to float64 in place, for the exact answer (its last use)."""
        ...

    def lora_parameter_names(self) -> list[str]:
        """The names (as ``named_parameters`` gives them) of every layer's ``lora_A`` and ``lora_B``."""
        ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...
    def zero_grad(self) -> None: ...


@runtime_checkable
class CheckpointingTarget(Protocol):
    """Property 4 (gradient checkpointing changes no gradient). The check runs fresh copies (``fresh_model``) and
    counts each block's forwards with hooks on ``blocks(model)``; every operation takes the copy it acts on."""

    description: str
    policies: Optional[tuple[str, ...]]  # the checkpointing policies it can be set to; None: any

    @property
    def limits(self) -> Limits: ...

    def fresh_model(self) -> torch.nn.Module:
        """A fresh copy of the model for one run: cache off, parameters as the model has them."""
        ...

    def fresh_lora_model(self, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                         generator: torch.Generator) -> Optional[torch.nn.Module]:
        """A fresh copy with LoRA on a frozen base (where the target can apply it, on ``targets``; a model that comes
        adapted keeps its own adapters), or None where there is none."""
        ...

    def blocks(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The transformer blocks of ``model``, in order: what a policy selects and the check counts."""
        ...

    def set_checkpointing(self, model: torch.nn.Module, policy: Optional[str]) -> None:
        """Checkpoint the blocks ``policy`` selects (None: none)."""
        ...

    def checkpointed_blocks(self, model: torch.nn.Module) -> Optional[frozenset[int]]:
        """The blocks the implementation says it checkpoints; None where it does not say."""
        ...

    def train_logits(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Uncached logits (B, L, V) of ``tokens`` from position 0, with autograd, in the model's current mode."""
        ...


Batch = dict[str, torch.Tensor]  # "input_ids", "labels": (B, L) int64, right-padded; labels -100 where ignored


@dataclass(frozen=True)
class Reported:
    """What a training step said of one window; None where it says nothing."""

    loss: float  # the loss it logs for the window
    n_tokens: Optional[int] = None
    grad_norm: Optional[float] = None  # before clipping
    lr: Optional[float] = None


@runtime_checkable
class TrainStep(Protocol):
    """The user's training step, for property 2: ``step(model, optimizer, window, max_norm) -> loss``.

    ``window`` is the micro-batches of one optimizer step, each ``{"input_ids", "labels"}`` (B, L), labels aligned
    with the inputs as transformers has them (position t's logits predict ``labels[:, t + 1]``; -100 ignored). The
    step accumulates their gradients, clips the total norm of the trainable gradients to ``max_norm`` (None: no
    clipping), calls ``optimizer.step()`` once, leaves the gradients zeroed for the next window, and returns the
    loss it logs for the window. The learning rate is set on ``optimizer`` by the caller; the step leaves it alone.
    """

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Sequence[Batch],
                 max_norm: Optional[float]) -> float: ...


@runtime_checkable
class StepDriver(Protocol):
    """A training loop the GA check drives: how it groups micro-batches into windows, and one step per window."""

    def windows(self, micro: Sequence[Batch], ga: int) -> list[list[Batch]]: ...

    def step(self, window: Sequence[Batch], lr: float) -> Reported:
        """One window: accumulate, clip, step once. ``lr``: the schedule's rate for it, where the loop does not
        keep a schedule of its own."""
        ...


def copy_sharing_weights(module: torch.nn.Module, which: Optional[set[int]] = None) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters (those whose ``id`` is in ``which``; all when None) are new
    ``Parameter`` objects on the *same storage*: their flags are the copy's own, their values cost no memory. For a
    base the checks only read (a frozen LoRA base): a write to it would reach the original."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                            for p in module.parameters() if which is None or id(p) in which}
    return copy.deepcopy(module, memo)


class Target:
    """Base of the adapters: a description and, per property, whether it can be asked."""

    description = "a model"

    def not_applicable(self, prop: str) -> Optional[str]:
        """None if property ``prop`` (a check name) can be checked on this target, else why not."""
        return f"{self.description} offers no operations for {prop}"

    def lora_target(self, *, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float, use_rslora: bool,
                    layer_cls: Optional[type] = None, generator: Optional[torch.Generator] = None) -> LoRATarget:
        """A fresh copy with LoRA adapters, for the merge check: where the target can apply them, those asked for
        (``layer_cls`` the layer under test); a model that comes adapted keeps its own and ignores the request."""
        raise NotImplementedError(f"{self.description} offers no LoRA operations")

    def __str__(self) -> str:
        return self.description
