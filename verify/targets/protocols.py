# Over 350 lines: one Protocol per property, declared together (the registry, adapters and docs table read them).
"""What each check reads of a target, declared: one ``typing.Protocol`` per property, every member documented.

A check reads a target through these members and nothing else (``tests/verify/test_protocols.py`` runs every check
on a recording proxy of each adapter and fails on any undeclared read). Before a check runs, the target is validated
against its property's protocols (:func:`missing_members`): a missing piece is "not applicable" naming the member,
or a usage error where the user asked for that property — never a FAIL of the user's model. ``Target``
(:mod:`verify.targets.base`) supplies a documented default for each optional member.

Shapes: B batch rows, L (or T) positions, V vocabulary; ``tokens`` are int64 ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Generic, Iterator, Optional, Protocol, Sequence, runtime_checkable

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


Batch = dict[str, torch.Tensor]  # "input_ids", "labels": (B, L) int64, right-padded; labels -100 where ignored


@dataclass(frozen=True)
class Reported:
    """What a training step said of one window; None where it says nothing."""

    loss: float  # the loss it logs for the window
    n_tokens: Optional[int] = None
    grad_norm: Optional[float] = None  # before clipping
    lr: Optional[float] = None


class Applicability(Protocol):
    """What every check reads first."""

    description: str
    """One line naming the model (the case column of the table)."""

    def not_applicable(self, prop: str) -> Optional[str]:
        """None if property ``prop`` (its name, e.g. ``"kv_cache"``) can be asked of this target, else why not."""
        ...


@runtime_checkable
class KVCacheTarget(Applicability, Protocol):
    """Property 1 (the KV cache changes nothing)."""

    @property
    def limits(self) -> Limits:
        """Vocabulary, cache rows and positions, weights' dtype and device."""
        ...

    cache_caveat: Optional[str]  # what the KV check cannot ask of this cache (a fixed batch size, say); None: nothing

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
    """One adapted Linear, read live (:class:`verify.targets.lora.LoRALayerView` for loralib's shape). The check
    computes the scaling itself from ``alpha``, ``rank`` and ``use_rslora``: it is what is checked."""

    name: str  # the layer's qualified name in the model (printed in failures)
    weight: torch.Tensor  # the base weight (out, in); W + scaling·B·A while merged
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    rank: int  # r
    alpha: float  # lora_alpha: the scaling is alpha / r (alpha / sqrt(r) with use_rslora)
    use_rslora: bool
    dropout: float  # on the adapter's input; inactive in eval mode
    merged: bool  # W currently holds W + scaling·B·A
    merges_on_eval: Optional[bool]  # eval() merges and train() unmerges; None: the mode does not merge

    def set_merges_on_eval(self, on: bool) -> None:
        """Turn the merge-on-``eval()`` behaviour on or off (a no-op where the layer has none)."""
        ...

    def merge(self) -> None:
        """W ← W + scaling·B·A, once: merging a merged layer changes nothing."""
        ...

    def unmerge(self) -> None:
        """W ← W − scaling·B·A where merged; else nothing."""
        ...

    def effective_update(self, absolute: bool = False) -> Optional[torch.Tensor]:
        """Optional (absent: None). None where the update is one ``scaling·B·A``; for a fused adapter (one
        ``lora_A``/``lora_B`` pair for several parts of a fused projection, litgpt's ``LoRAQKVLinear``) the (out, in)
        float64 update its unmerged forward adds, measured by running the layer — never read from its merge —
        and, with ``absolute``, the magnitude its rounding error scales with. Called on the unmerged layer."""
        ...

    __optional__ = ("effective_update",)


@runtime_checkable
class LoRATarget(Protocol):
    """A fresh copy of the model with its adapters, which the merge check may change at will
    (:class:`verify.targets.lora.LoralibTarget`); a target makes one with ``lora_target(...)``."""

    description: str  # one line naming the model
    layers: Sequence[LoRALayer]  # every adapted layer
    no_gradient: Optional[str]  # why a backward cannot reach the parameters; None where it can
    unloaded_logits: Optional[Any]  # tokens -> eval logits of the library's merge-and-unload on a copy; None: none
    # Optional (absent: None): why there is no unmerge (a state-dict merge); None: unmerge() is the library's.
    unmerge_missing: Optional[str]
    __optional__ = ("unmerge_missing",)  # members a target may leave out (missing_members skips them)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Uncached logits (B, L, V) in the current mode; with autograd where the forward allows it."""
        ...

    def base_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model without adapters, eval mode, no gradient."""
        ...

    def train(self, mode: bool = True) -> None:
        """The model's own mode switch."""
        ...

    def merge(self) -> None:
        """Merge every adapter (the library's own way)."""
        ...

    def unmerge(self) -> None:
        """Unmerge every adapter."""
        ...

    def to_float64(self) -> "LoRATarget":
        """The model converted to float64 in place, for the exact answer (its last use)."""
        ...

    def lora_parameter_names(self) -> list[str]:
        """The names (as ``named_parameters`` gives them) of every layer's ``lora_A`` and ``lora_B``."""
        ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The copy's parameters, as ``nn.Module.named_parameters``."""
        ...

    def zero_grad(self) -> None:
        """Every gradient of the copy set to None."""
        ...


@runtime_checkable
class LoRACapable(Applicability, Protocol):
    """Property 3 (merging LoRA changes nothing)."""

    @property
    def limits(self) -> Limits:
        """Vocabulary, rows and positions the check's tokens must respect; the weights' dtype and device."""
        ...

    def lora_target(self, *, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                    use_rslora: bool, layer_cls: Optional[type] = None, generator: Optional[torch.Generator] = None
                    ) -> LoRATarget:
        """A fresh copy with LoRA adapters: where the target can apply them, those asked for (``layer_cls`` the layer
        under test; ``A`` drawn from ``generator``); a model that comes adapted keeps its own."""
        ...


@runtime_checkable
class TrainingCopies(Applicability, Protocol):
    """Fresh trainable copies of the model and their logits: what the training checks (2, 4, 5) share."""

    @property
    def limits(self) -> Limits:
        """Vocabulary, rows and positions; the weights' dtype and device."""
        ...

    def fresh_model(self) -> torch.nn.Module:
        """A fresh copy of the model for one run: cache off, parameters as the model has them."""
        ...

    def fresh_lora_model(self, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                         generator: torch.Generator) -> Optional[torch.nn.Module]:
        """A fresh copy with LoRA on a frozen base (where the target can apply it, on ``targets``, ``A`` drawn from
        ``generator``; a model that comes adapted keeps its own adapters), or None where there is none."""
        ...

    def lora_layers(self, model: torch.nn.Module) -> Sequence[LoRALayer]:
        """The LoRA layers of a copy (default: loralib-shaped modules), for drawing a non-zero ``B``."""
        ...

    def train_logits(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Uncached logits (B, L, V) of a copy on ``tokens`` from position 0, with autograd, in its current mode."""
        ...


@runtime_checkable
class CheckpointingTarget(TrainingCopies, Protocol):
    """Property 4 (gradient checkpointing changes no gradient). The check runs fresh copies and counts each block's
    forwards with hooks on ``recompute_probes(model)``; every operation takes the copy it acts on."""

    policies: Optional[tuple[str, ...]]  # the checkpointing policies its switch offers; None: any
    gc_modes: tuple[Optional[str], ...]  # the switch's variants, each checked (transformers' use_reentrant); (None,)
    # True: checkpointing applies in train and eval mode alike (checked in both); False: in train mode only, by design
    # (transformers); None, not declared: a model recomputing in train mode only gets a note, never a FAIL.
    checkpoints_in_eval: Optional[bool]

    def blocks(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The transformer blocks of ``model``, in order: what a policy selects."""
        ...

    def recompute_probes(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """Per block, the module whose forward calls count the block's (default: the blocks themselves)."""
        ...

    def set_checkpointing(self, model: torch.nn.Module, policy: Optional[str], mode: Optional[str] = None) -> None:
        """Checkpoint the blocks ``policy`` selects (None: none), in ``mode`` (one of ``gc_modes``)."""
        ...

    def checkpointed_blocks(self, model: torch.nn.Module) -> Optional[frozenset[int]]:
        """The blocks the implementation says it checkpoints; None where it does not say."""
        ...


@runtime_checkable
class StepDriver(Protocol):
    """A training loop the GA check drives: how it groups micro-batches into windows, and one step per window."""

    def windows(self, micro: Sequence[Batch], ga: int) -> list[list[Batch]]:
        """``micro`` grouped into windows of ``ga`` micro-batches (the last may be shorter), in order."""
        ...

    def step(self, window: Sequence[Batch], lr: float) -> Reported:
        """One window: accumulate, clip, step once. ``lr``: the schedule's rate for it, where the loop does not
        keep a schedule of its own."""
        ...


@runtime_checkable
class TrainingTarget(TrainingCopies, Protocol):
    """Property 2 (accumulation equals the large batch): copies and, where it has one, its own training loop."""

    own_train_loop: bool  # False: the check needs the user's training step

    def step_driver(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, clip: Optional[float],
                    schedule: str, total_steps: int, warmup: int) -> Optional[StepDriver]:
        """The target's own loop over copy ``model`` and ``optimizer``: clipping to ``clip`` (None: none), LR
        ``schedule`` ("constant", "linear", "cosine") over ``total_steps`` after ``warmup``; None without a loop."""
        ...


@runtime_checkable
class TrainStep(Protocol):
    """The user's training step, for properties 2 and 5: ``step(model, optimizer, window, max_norm) -> loss``.

    ``window`` is the micro-batches of one optimizer step, each ``{"input_ids", "labels"}`` (B, L), labels aligned
    with the inputs as transformers has them (position t's logits predict ``labels[:, t + 1]``; -100 ignored). The
    step accumulates their gradients, clips the total norm of the trainable gradients to ``max_norm`` (None: no
    clipping), calls ``optimizer.step()`` once, leaves the gradients zeroed for the next window, and returns the
    loss it logs for the window. The learning rate is set on ``optimizer`` by the caller; the step leaves it alone.
    """

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Sequence[Batch],
                 max_norm: Optional[float]) -> float: ...


@runtime_checkable
class MixedPrecisionTarget(TrainingCopies, Protocol):
    """Property 5 (mixed precision really mixed and still right): the model, and its own mixed-precision step."""

    model: Any  # the model under test (llama_ref's Transformer gets the full check, driving its Trainer)
    mp_step_label: str  # how the table names its own step

    def mp_step(self, precision: str) -> Optional[TrainStep]:
        """Its own mixed-precision training step in ``precision`` ("bf16" or "fp16": its autocast and GradScaler),
        or None where it has none (then the user's step is needed)."""
        ...


@runtime_checkable
class DistributedTarget(Applicability, Protocol):
    """Property 6 (DDP / FSDP2 equal one process): llama_ref's model, trained by its ``DistributedTrainer``."""

    model: Any  # llama_ref's Transformer


@runtime_checkable
class PackingTarget(Applicability, Protocol):
    """Property 7 (packed rows equal padded ones). A batch is a dict of (B, T) tensors: ``input_ids``, ``labels``
    (unshifted, -100 where ignored) and, packed, ``positions`` (each token's position in its document) and optionally
    ``document_ids`` (its document; -1 for padding)."""

    @property
    def limits(self) -> Limits:
        """Vocabulary, weights' dtype and device."""
        ...

    def pack(self, documents: Sequence[dict[str, torch.Tensor]], row_len: int, n_micro: int
             ) -> list[dict[str, torch.Tensor]]:
        """The target's own packer: ``documents`` (each ``input_ids``, ``labels``) in rows of ``row_len`` tokens,
        dealt into at most ``n_micro`` micro-batches."""
        ...

    def batch_logits(self, batch: dict[str, torch.Tensor], *, float64: bool = False) -> torch.Tensor:
        """Logits (B, T, V) of ``batch`` (packed or padded), without gradient; ``float64``: on a float64 copy."""
        ...

    def batch_loss_and_grads(self, batch: dict[str, torch.Tensor], *, float64: bool = False
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On a fresh copy: the summed next-token loss of ``batch`` as its training loop computes it, and the
        gradients of the trainable parameters, by name."""
        ...

    def train_window(self, window: Sequence[dict[str, torch.Tensor]], *, float64: bool = False
                     ) -> tuple[float, Optional[int], dict[str, torch.Tensor]]:
        """On a fresh copy, one step of the target's own loop over ``window``: the loss it reports, the target
        tokens it counted (None where it counts none), and the gradients it stepped with (by name)."""
        ...


@runtime_checkable
class LossKernelTarget(Applicability, Protocol):
    """Property 8 (a chunked or fused loss equals the plain one)."""

    @property
    def limits(self) -> Limits:
        """Vocabulary, weights' dtype and device (the kernel-level cases are drawn in that dtype, on that device)."""
        ...

    def loss_kernels(self) -> dict[str, Any]:
        """The loss kernels this model can compute its loss with, by name (:class:`verify.targets.loss_kernel.
        LossKernel`; one that cannot run here says why in its ``unavailable``)."""
        ...

    def output_weight(self) -> torch.Tensor:
        """The output projection's weight (V, D): the kernel-level cases project with a copy of it."""
        ...

    def kernel_model_loss(self, tokens: torch.Tensor, labels: torch.Tensor, kernel: Optional[Any], *,
                          float64: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On a fresh copy of the model: its summed next-token loss of ``tokens`` (B, T) with ``labels`` (B, T,
        unshifted, -100 where ignored) and the gradients of its trainable parameters, by name — with ``kernel``
        (``kernel(hidden (N, D), weight (V, D), shifted labels (N,), reduction="sum")``) in place of its loss, or
        its plain forward where ``kernel`` is None; with ``float64``, the plain forward of a float64 copy."""
        ...


@runtime_checkable
class TiedEmbeddingsTarget(Applicability, Protocol):
    """Property 9 (tied embeddings stay tied and trained right). A model here is the target's own kind (what
    ``tied_model`` returns); a transform returns the model after it and leaves the one given as it was (a merge
    may be done in place where the adapted model cannot be copied: the check reads nothing of it afterwards)."""

    @property
    def limits(self) -> Limits:
        """Vocabulary, weights' dtype and device."""
        ...

    def tied_model(self) -> Any:
        """A fresh copy of the model, configured tied."""

    def vocab_matrices(self, model: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The input embedding's and the output head's base weights (V, D) — under an adapter, the weight it adapts —
        and whether the model's configuration says they are tied."""
        ...

    def embed(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """The input embedding's output (B, T, D) for ``tokens``, without gradient."""

    def head(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        """The output head's logits (…, V) for ``hidden`` (…, D), without gradient."""

    def tied_logits(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """The model's logits (B, T, V) as it trains (adapters unmerged, no dropout), without gradient."""

    def tied_grads(self, model: Any, tokens: torch.Tensor, *, untie: bool = False, float64: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """On a copy, every parameter trainable: the summed next-token loss of ``tokens`` backpropagated, and the
        gradients of the embedding's and the head's weights (one tensor's twice where they are one); ``untie``: a copy
        whose head has a separate copy of the weight (the reference: the sum of the two uses)."""
        ...

    def transform(self, model: Any, name: str) -> Any:
        """``model`` after transform ``name`` (:data:`verify.checks.tied_embeddings.TRANSFORMS`); NotImplementedError
        saying why where the target has none."""
        ...

    def parameter_count(self, model: Any) -> int:
        """The parameter count the target's own tools report for ``model``."""

    def adapter_grads(self, model: Any, tokens: torch.Tensor, *, reference: bool = False, float64: bool = False
                      ) -> dict[str, torch.Tensor]:
        """Optional: a kept-tied adapter's gradients, and (``reference``) those of its update used by both uses."""
        ...


def members(protocol: type) -> dict[str, str]:
    """Every member ``protocol`` declares (its bases' included) → the protocol that declares it."""
    out: dict[str, str] = {}
    for cls in reversed(protocol.__mro__):
        if cls in (object, Protocol, Generic) or not getattr(cls, "_is_protocol", False):
            continue
        names = [*cls.__dict__.get("__annotations__", {}),
                 *(n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property)))]
        out.update({n: cls.__name__ for n in names if n not in out})  # in declaration order
    return out


def missing_members(obj: Any, protocols: Sequence[type]) -> list[str]:
    """``Protocol.member`` for each member of ``protocols`` that ``obj`` lacks (but those a protocol lists in
    ``__optional__``), in order; empty when it offers them all. A member whose lookup raises anything but AttributeError counts as offered: the check that uses it reports
    what it raised."""
    out = []
    for protocol in protocols:
        optional = {n for cls in protocol.__mro__ for n in getattr(cls, "__optional__", ())}
        for name, owner in members(protocol).items():
            if name not in optional and not _offers(obj, name) and f"{owner}.{name}" not in out:
                out.append(f"{owner}.{name}")
    return out


def _offers(obj: Any, name: str) -> bool:
    try:
        getattr(obj, name)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - present, but broken: the check says how
        return True
    return True

