"""The properties, one record each: the registry everything else reads.

A :class:`Property` says what is claimed (``statement``), which function checks it (``check``), what a target must
offer for that (``protocols``, validated before the check runs), which known-wrong implementations it must catch
(``mutants``, a module of the bug zoo with its ``ZOO``), how ``llama-verify`` and the pytest plugin call it
(``run``), which parts of the implementation it takes as components (``parts``) and its assertion helper's name in
:mod:`verify.testing`. ``llama-verify``'s table and ``--check``, the plugin's tests, :mod:`verify.testing`, the
mutant registry and the kill matrix are all derived from :data:`PROPERTIES`: adding a property is a check module, a
zoo module, one record here, tests and docs.

The records are listed in :data:`RECORDS`, in the order the table shows them; :func:`registered` adds one for the
length of a block (a property of a user's own, or a test's).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from llama_ref.model import Transformer

from .checks.distributed import check_distributed
from .checks.gradient_checkpointing import check_gradient_checkpointing
from .checks.grad_accum import check_grad_accumulation
from .checks.kv_cache import check_kv_cache
from .checks.lora_merge import check_lora_merge
from .checks.loss_kernel import check_loss_kernel
from .checks.packing import check_packing
from .checks.tied_embeddings import check_tied_embeddings
from .checks.mixed_precision import autocast_dtype, check_mixed_precision
from .mutants import distributed as distributed_mutants
from .mutants import grad_accum as grad_accum_mutants
from .mutants import gradient_checkpointing as gradient_checkpointing_mutants
from .mutants import kv_cache as kv_cache_mutants
from .mutants import lora_merge as lora_merge_mutants
from .mutants import loss_kernel as loss_kernel_mutants
from .mutants import packing as packing_mutants
from .mutants import tied_embeddings as tied_embeddings_mutants
from .mutants import mixed_precision as mixed_precision_mutants
from .result import CheckResult
from .checks import (distributed, gradient_checkpointing, grad_accum, kv_cache, lora_merge, loss_kernel,
                     mixed_precision, packing, tied_embeddings)


@dataclass(frozen=True)
class Inputs:
    """What a run of the checks shares: a seed for random inputs and, where a tokenizer is known, real prompts."""

    seed: int = 0
    prompts: Optional[Sequence[Sequence[int]]] = None
    fail_fast: bool = False  # the checks that can stop at their first failing case do (a verdict, not a report)
    train_step: Optional[Callable[..., float]] = None  # the user's training step, for GA (verify.targets.base.TrainStep)
    mp_train_step: Optional[Callable[..., float]] = None  # the user's mixed-precision step (its autocast), for MP
    loss_fn: Optional[Any] = None  # the user's loss kernel (verify.targets.loss_kernel.LossKernel), for property 8
    packed_forward: Optional[Callable[..., Any]] = None  # the user's packed forward, for property 7


# Above this many parameters a model is "real-size": GA and checkpointing check LoRA on a frozen base only, and MP
# checks llama_ref's Trainer as a step on LoRA only (a full fine-tune's gradients, optimizer state and float64 copy
# need several times the model's memory; docs/verification.md has each check's measured peak on llama-3.2-1b).
LARGE_MODEL_PARAMS = 200_000_000


def is_large(model: Any) -> bool:
    """More than :data:`LARGE_MODEL_PARAMS` parameters (a model, or a target holding one as ``model``)."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    return isinstance(module, torch.nn.Module) and sum(p.numel() for p in module.parameters()) > LARGE_MODEL_PARAMS


# run(model_or_target, inputs, **components) -> a CheckResult, or one per case of a property that checks several
# implementations of one model (property 8: each of its loss kernels) — see :func:`results_of`
Run = Callable[..., Union[CheckResult, list[CheckResult]]]


def results_of(outcome: Union[CheckResult, list[CheckResult]]) -> list[CheckResult]:
    """A property run's results as a list."""
    return outcome if isinstance(outcome, list) else [outcome]


def worst_of(outcome: Union[CheckResult, list[CheckResult]]) -> CheckResult:
    """One result for a property run: its first failure, else its first pass, else its first (N/A)."""
    results = results_of(outcome)
    return next((r for r in results if not r.ok), next((r for r in results if not r.not_applicable), results[0]))


@dataclass(frozen=True)
class Property:
    """One property: what is claimed, what checks it, what it needs of a target, and the zoo that proves it."""

    name: str  # the check's name: CheckResult.name, --check NAME, the plugin's test id
    title: str  # a few words for tables and docs
    statement: str  # the claim, in one line
    check: Callable[..., CheckResult]  # check(model_or_target, **keywords) -> CheckResult
    protocols: tuple[type, ...] = ()  # what a target must offer (verify.targets.base); () for none
    mutants: Optional[ModuleType] = None  # its zoo module (a ``ZOO`` list of verify.mutants.base.Mutant)
    assertion: str = ""  # its helper's name in verify.testing (default: assert_<name>)
    run: Optional[Run] = None  # how a run of the checks calls it (default: check(model, seed=inputs.seed, **parts))
    parts: frozenset[str] = field(default_factory=frozenset)  # keyword arguments naming replaceable components
    opt_in: Optional[str] = None  # not in the default run: the flag that asks for it (property 6: --distributed)
    per_attn_impl: bool = True  # run once per attention path (False: the path changes nothing it checks)

    def __post_init__(self) -> None:
        params = inspect.signature(self.check).parameters
        missing = sorted(p for p in self.parts if p not in params or params[p].kind != inspect.Parameter.KEYWORD_ONLY)
        if missing:
            raise TypeError(f"property {self.name!r}: parts {missing} are not keyword-only arguments of "
                            f"{self.check.__qualname__}")
        if not self.assertion:
            object.__setattr__(self, "assertion", f"assert_{self.name}")

    @property
    def zoo(self) -> list:
        """Its mutants (empty without a zoo module)."""
        return list(getattr(self.mutants, "ZOO", ())) if self.mutants is not None else []

    def __call__(self, model: Any, inputs: Inputs, **components: Any) -> Union[CheckResult, list[CheckResult]]:
        """The check as a run of the checks calls it, with ``components`` (a mutant's parts) in place."""
        unknown = sorted(set(components) - self.parts)
        if unknown:
            raise TypeError(f"property {self.name!r} takes no components {unknown}; its parts: {sorted(self.parts)}")
        if self.run is not None:
            return self.run(model, inputs, **components)
        return self.check(model, seed=inputs.seed, **components)


def _kv_cache(model: Any, inputs: Inputs, **parts: Any) -> CheckResult:
    return check_kv_cache(model, prompts=inputs.prompts, seed=inputs.seed, **parts)


def _grad_accum(model: Any, inputs: Inputs, **parts: Any) -> CheckResult:
    return check_grad_accumulation(model, seed=inputs.seed, fail_fast=inputs.fail_fast, train_step=inputs.train_step,
                                   lora=(True,) if is_large(model) else (False, True), **parts)


def _mixed_precision(model: Any, inputs: Inputs, **parts: Any) -> CheckResult:
    return check_mixed_precision(model, dtype=autocast_dtype(model), train_step=inputs.mp_train_step,
                                 seed=inputs.seed, fail_fast=inputs.fail_fast,
                                 full=not is_large(model) or bool(parts), **parts)


def _gradient_checkpointing(model: Any, inputs: Inputs, **parts: Any) -> CheckResult:
    return check_gradient_checkpointing(model, seed=inputs.seed, full_finetune=not is_large(model), **parts)


def _loss_kernel(model: Any, inputs: Inputs, **parts: Any) -> Union[CheckResult, list[CheckResult]]:
    """Each of the target's loss kernels (and the user's ``--loss-fn``), a result each; a component (a zoo mutant's
    kernel) alone."""
    if parts:
        return check_loss_kernel(model, seed=inputs.seed, **parts)
    from .targets.spec import as_target
    target = as_target(model)
    kernels = getattr(target, "loss_kernels", None)
    names = list(kernels()) if callable(kernels) else [None]  # without: the check says why it is not applicable
    if inputs.loss_fn is not None and callable(kernels):
        return [check_loss_kernel(target, kernel=name, seed=inputs.seed) for name in names] + [
            check_loss_kernel(target, loss_kernel=inputs.loss_fn, seed=inputs.seed)]
    return [check_loss_kernel(target, kernel=name, seed=inputs.seed) for name in names or [None]]


def _packing(model: Any, inputs: Inputs, **parts: Any) -> Union[CheckResult, list[CheckResult]]:
    """The target's own packed path and, with ``--packed-forward``, the user's forward on the same model (a
    result each); a component (a zoo mutant's packer or Trainer) on the target's path alone."""
    own = check_packing(model, seed=inputs.seed, **parts)
    if parts or inputs.packed_forward is None:
        return own
    from .targets.packed_forward import PackedForwardTarget
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        return [own, CheckResult.na("packing", f"{type(model).__qualname__} holds no model for the packed forward",
                                    str(model))]
    forward = inputs.packed_forward
    name = getattr(forward, "spec", None) or getattr(forward, "__qualname__", "the packed forward")
    theirs = check_packing(PackedForwardTarget(module, forward, name=name), seed=inputs.seed)
    return [own, dataclasses.replace(theirs, case=f"{name}: {theirs.case}")]


def _distributed(model: Any, inputs: Inputs, **parts: Any) -> CheckResult:
    model = model if isinstance(model, torch.nn.Module) else model.model
    if not isinstance(model, Transformer):
        return CheckResult.na("distributed", f"{type(model).__qualname__} is not llama_ref's Transformer, the only "
                                             "model DistributedTrainer trains", type(model).__qualname__)
    return check_distributed(model, seed=inputs.seed, **parts)


RECORDS: tuple[Property, ...] = (
    Property("kv_cache", "KV cache",
             "uncached logits = cached logits over any chunking and batch size, after earlier calls; cached and "
             "uncached greedy generation agree (a divergence excused only at a genuine top-2 tie)",
             check_kv_cache, kv_cache.PROTOCOLS, kv_cache_mutants, "assert_kv_cache_equivalent", _kv_cache,
             frozenset({"cache_cls", "generator_cls"})),
    Property("grad_accum", "gradient accumulation",
             "any split of a window into micro-batches gives the gradients, loss and post-step parameters of one "
             "batch whose loss is the mean over all its target tokens",
             check_grad_accumulation, grad_accum.PROTOCOLS, grad_accum_mutants, "assert_grad_accumulation_equivalent",
             _grad_accum, frozenset({"trainer_cls"})),
    Property("lora_merge", "LoRA merge",
             "merged weight = W + (alpha/r)·B·A, merged logits = unmerged, merging twice is a no-op, unmerge restores "
             "W, a fresh adapter is the base model, only LoRA parameters get gradients",
             check_lora_merge, lora_merge.PROTOCOLS, lora_merge_mutants, "assert_lora_merge_equivalent",
             parts=frozenset({"lora_layer_cls"})),
    Property("mixed_precision", "mixed precision",
             "matmuls really in the half dtype, reductions and master weights fp32, loss and gradients calibrated "
             "against float64, GradScaler skips inf/NaN steps untouched and unscales before clipping",
             check_mixed_precision, mixed_precision.PROTOCOLS, mixed_precision_mutants, "assert_mixed_precision_right",
             _mixed_precision, frozenset({"trainer_cls", "half_base"})),
    Property("gradient_checkpointing", "gradient checkpointing",
             "every policy gives the plain run's loss, logits and gradients (a None gradient is a failure), and the "
             "checkpointed blocks really were recomputed",
             check_gradient_checkpointing, gradient_checkpointing.PROTOCOLS, gradient_checkpointing_mutants,
             "assert_gradient_checkpointing_equivalent", _gradient_checkpointing, frozenset({"block_runner"})),
    Property("packing", "packed batches",
             "packed rows (positions restarting, attention inside each document) give each document's logits, the "
             "summed loss, the target count and the gradients of padded rows; a document's tokens never reach "
             "another's logits; the training loop on packed micro-batches steps as on the padded batch",
             check_packing, packing.PROTOCOLS, packing_mutants, "assert_packing_equivalent", _packing,
             frozenset({"packer", "trainer_cls"})),
    Property("loss_kernel", "chunked / fused loss",
             "a chunked or fused cross-entropy gives the plain loss and gradients (hidden states, output weight, "
             "bias) for every reduction, chunking and softcap, under accumulation with the window's count, and in "
             "the model in place of its loss",
             check_loss_kernel, loss_kernel.PROTOCOLS, loss_kernel_mutants, "assert_loss_kernel_equivalent",
             _loss_kernel, frozenset({"loss_kernel"}), per_attn_impl=False),
    Property("tied_embeddings", "tied embeddings",
             "a tied model's head and embedding stay one tensor (or are configured untied) through LoRA, merge, "
             "save/load, materialisation and resize; logits unchanged; the tied gradient is the sum of its two uses; "
             "an adapter on one matrix leaves the other alone unless kept tied; the tied matrix counted once",
             check_tied_embeddings, tied_embeddings.PROTOCOLS, tied_embeddings_mutants, "assert_tied_embeddings_right",
             parts=frozenset({"head_cls"}), per_attn_impl=False),
    Property("distributed", "DDP / FSDP2",
             "on N ranks the gradients each rank steps with, the loss, the pre-clip norm and the parameters after "
             "every step equal one process accumulating the same micro-batches",
             check_distributed, distributed.PROTOCOLS, distributed_mutants, "assert_distributed_equivalent",
             _distributed, frozenset({"trainer_cls"}), opt_in="--distributed"),
)

PROPERTIES: dict[str, Property] = {p.name: p for p in RECORDS}


def default_names() -> list[str]:
    """The properties a plain run checks, in order (those no flag has to ask for)."""
    return [name for name, p in PROPERTIES.items() if p.opt_in is None]


def get(name: str) -> Property:
    """The record of property ``name``; KeyError naming the known ones."""
    try:
        return PROPERTIES[name]
    except KeyError:
        raise KeyError(f"unknown property {name!r}; known: {sorted(PROPERTIES)}") from None


@contextlib.contextmanager
def registered(prop: Property) -> Iterator[Property]:
    """``prop`` in the registry for the length of the block (after the others); a name taken is a ValueError."""
    if prop.name in PROPERTIES:
        raise ValueError(f"property {prop.name!r} is registered already")
    PROPERTIES[prop.name] = prop
    try:
        yield prop
    finally:
        del PROPERTIES[prop.name]
