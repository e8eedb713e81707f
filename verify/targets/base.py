"""What a check needs of the implementation under test: a *target*, offering the few operations of each property.

A check takes a target (or a model, which :func:`verify.targets.spec.as_target` adapts), never a concrete model
class. The adapters: :mod:`verify.targets.llama_ref` (this project's ``Transformer``, the only module of ``verify/``
checks reach ``llama_ref`` through) and :mod:`verify.targets.meta_style` (any ``nn.Module`` with Meta's
``forward(tokens, start_pos)`` and per-layer ``cache_k``/``cache_v``).

What each property reads of a target is declared in :mod:`verify.targets.protocols`; :class:`Target` gives every
optional member a default, and :func:`why_not` is asked before a check runs. A target that cannot be asked a
property says why (a member it lacks, or :meth:`Target.not_applicable`); the check then reports "not applicable"
with that reason, never PASS.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch

from .protocols import LoRALayer, StepDriver, TrainStep, missing_members


# The attributes through which torch's wrappers hold the module they wrap: CheckpointWrapper (torchtune's
# set_activation_checkpointing, Lightning's), torch.compile's OptimizedModule, FSDP1's FullyShardedDataParallel.
# Each renames every parameter below it (``layers.0._checkpoint_wrapped_module.attention.wq.weight``).
WRAPPER_ATTRS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module that really runs inside any torch wrappers around ``module`` (``module`` itself if none)."""
    while True:
        inner = next((getattr(module, a) for a in WRAPPER_ATTRS if isinstance(getattr(module, a, None),
                                                                               torch.nn.Module)), None)
        if inner is None:
            return module
        module = inner


def recompute_probe(block: torch.nn.Module) -> torch.nn.Module:
    """Where a block's recomputation shows: see :meth:`Target.recompute_probes`."""
    block = unwrapped(block)
    if "forward" not in vars(block):  # the class's forward: calls of the module are calls of it
        return block
    child = parametrised_child(block)
    return block if child is None else child


def parametrised_child(block: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The first child of ``block`` holding parameters (None: none): a recomputation of the block calls it again."""
    return next((c for c in block.children() if any(True for _ in c.parameters())), None)


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers' segments: the same parameter wrapped or not has one name."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_ATTRS)


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """Each parameter of ``model`` by identity → its :func:`canonical_name`: taken before a switch wraps or
    unwraps blocks, it names the same parameter the same way on both sides of a comparison."""
    return {id(p): canonical_name(n) for n, p in model.named_parameters()}


_COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}


def cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its floating-point parameters and buffers cast to ``dtype`` (in place, as ``.half()`` does) and
    its complex ones to the complex dtype of that precision (kept as they are for a half dtype, which has none):
    ``module.to(dtype)`` casts a complex buffer — a RoPE table of ``cis`` values, as torchtitan registers one — to a
    real one, dropping its imaginary part."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(dtype)
        return t.to(_COMPLEX[dtype]) if t.is_complex() and dtype in _COMPLEX else t
    return module._apply(cast)


def copy_sharing_weights(module: torch.nn.Module, which: Optional[set[int]] = None) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters (those whose ``id`` is in ``which``; all when None) are new
    ``Parameter`` objects on the *same storage*: their flags are the copy's own, their values cost no memory. For a
    base the checks only read (a frozen LoRA base): a write to it would reach the original."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                            for p in module.parameters() if which is None or id(p) in which}
    return copy.deepcopy(module, memo)


def summed_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T, unshifted, -100 where
    ignored): row position t predicts label t + 1, computed in at least fp32."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).to(torch.promote_types(logits.dtype, torch.float32)),
        labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100, reduction="sum")


class Target:
    """Base of the adapters: a description, per property whether it can be asked, and a documented default for
    every optional member of the protocols (:mod:`verify.targets.protocols`). A target of one's own subclasses it
    and implements the members of the properties it offers; the others are reported not applicable, naming what is
    missing."""

    description = "a model"
    policies: Optional[tuple[str, ...]] = None  # CheckpointingTarget: its switch takes any policy
    gc_modes: tuple[Optional[str], ...] = (None,)  # CheckpointingTarget: one way of checkpointing
    cache_caveat: Optional[str] = None  # KVCacheTarget: the check can ask its cache everything
    checkpoints_in_eval: Optional[bool] = None  # CheckpointingTarget: not declared (train-mode-only is a note)
    own_train_loop = False  # TrainingTarget: no loop of its own (the GA check needs the user's step)
    mp_step_label = "its own step"  # MixedPrecisionTarget

    def not_applicable(self, prop: str) -> Optional[str]:
        """None if property ``prop`` (a check name) can be checked on this target, else why not. The default: every
        property whose protocol the target implements (the check validates the members before it runs)."""
        return None

    def lora_layers(self, model: torch.nn.Module) -> Sequence[LoRALayer]:
        """TrainingCopies: the loralib-shaped layers of ``model`` (``weight``, ``lora_A``, ``lora_B``, ``r``,
        ``lora_alpha``, ``merged``, ``merge``/``unmerge``)."""
        from .lora import layer_views
        return layer_views(model)

    def recompute_probes(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """CheckpointingTarget: a block's forwards are counted on the module that really runs again when it is
        recomputed: the block itself; the module it wraps, where a switch wrapped it (torch's ``CheckpointWrapper`` is
        called once, what it wraps again on recomputation); its first child holding parameters, where a switch
        patched the block's ``forward`` (the recomputation calls that function, not the module)."""
        return [recompute_probe(b) for b in self.blocks(model)]  # type: ignore[attr-defined]

    def step_driver(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, clip: Optional[float],
                    schedule: str, total_steps: int, warmup: int) -> Optional[StepDriver]:
        """TrainingTarget: no loop of its own."""
        return None

    def mp_step(self, precision: str) -> Optional[TrainStep]:
        """MixedPrecisionTarget: no mixed-precision step of its own."""
        return None

    def loss_kernels(self) -> dict[str, Any]:
        """LossKernelTarget: no loss kernel of its own (a user's is checked with ``--loss-fn``)."""
        return {}

    def output_weight(self) -> torch.Tensor:
        """LossKernelTarget: the weight of the model's vocabulary projection — its ``output`` (Meta's name) or
        ``lm_head`` (transformers'), else its last Linear whose output is the vocabulary."""
        model = getattr(self, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise NotImplementedError("the target holds no model whose output projection could be found")
        for name in ("output", "lm_head"):
            head = getattr(unwrapped(model), name, None)
            if isinstance(head, torch.nn.Linear):
                return head.weight
        vocab = self.limits.vocab_size  # type: ignore[attr-defined]
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == vocab]
        if not heads:
            raise NotImplementedError(f"no Linear of {vocab} outputs (the vocabulary) in the model")
        return heads[-1].weight

    def kernel_model_loss(self, tokens: torch.Tensor, labels: torch.Tensor, kernel: Optional[Any], *,
                          float64: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LossKernelTarget: the model takes no loss kernel in place of its loss (claim 6 is then not checked)."""
        raise NotImplementedError("the model has no seam to put a loss kernel in place of its loss "
                                  "(llama_ref's forward(labels=, loss_kernel=) has one)")

    def adapter_grads(self, model: Any, tokens: torch.Tensor, *, reference: bool = False, float64: bool = False
                      ) -> dict[str, torch.Tensor]:
        """TiedEmbeddingsTarget: a kept-tied adapter's gradient is not asked of this target."""
        raise NotImplementedError("the target does not give a kept-tied adapter's gradients (adapter_grads)")

    def __str__(self) -> str:
        return self.description


def why_not(target: Any, prop: str, protocols: Sequence[type]) -> Optional[str]:
    """Why property ``prop`` cannot be asked of ``target``: the members of ``protocols`` it lacks, else its own
    ``not_applicable`` answer; None when it can be asked."""
    missing = missing_members(target, protocols)
    if missing:
        return (f"the target does not offer {', '.join(missing)} (verify.targets.protocols), which {prop} reads"
                if len(missing) <= 4 else f"the target does not offer {', '.join(missing[:4])} and "
                                          f"{len(missing) - 4} more (verify.targets.protocols), which {prop} reads")
    return target.not_applicable(prop)
