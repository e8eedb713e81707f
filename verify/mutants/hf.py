"""The bug zoo against the transformers + PEFT target: wrong caches, a wrong merge, reentrant checkpointing under a
frozen base, the accumulation of transformers before its October 2024 fix and of the fix's first releases, a patched
forward that drops num_items_in_batch.

Not in :data:`verify.mutants.MUTANTS` (whose mutants are parts of llama_ref): each is applied to a
:class:`verify.targets.hf.HFTarget` — its ``components`` are the target's keyword arguments (``cache_cls``,
``trainer_cls``, ``input_require_grads``), its patches replace a PEFT method for the length of a ``with`` block.
:func:`hf_target` builds the target with a mutant's components; ``Mutant.applied()`` puts its patches in place.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Mutant

HF_ZOO: list[Mutant] = []


def _add(name: str, prop: str, description: str, origin: str, *, patches=list, **components: Any) -> None:
    HF_ZOO.append(Mutant(name, prop, description, origin, patches, components=components))


def hf_target(model: Any, mutant: Mutant):
    """``model`` as an :class:`~verify.targets.hf.HFTarget` with ``mutant``'s components in place."""
    from ..targets.hf import HFTarget
    return HFTarget(model, **resolved(mutant))


def _cache(kind: str) -> type:
    from transformers import DynamicCache

    class Wrong(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
            held = self.get_seq_length(layer_idx) if kind == "prepend" else 0
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if kind == "batch_blind":  # every row reads row 0's keys and values
                return keys[:1].expand_as(keys), values[:1].expand_as(values)
            if held:  # the new entries in front of the cached ones
                n = key_states.shape[-2]
                return (torch.cat([keys[..., -n:, :], keys[..., :-n, :]], dim=-2),
                        torch.cat([values[..., -n:, :], values[..., :-n, :]], dim=-2))
            return keys, values
    Wrong.__name__ = Wrong.__qualname__ = {"batch_blind": "BatchBlindCache", "prepend": "PrependingCache"}[kind]
    return Wrong


class _LazyCache:
    """The cache class, made on first use (transformers is imported only then)."""

    def __init__(self, kind: str):
        self.kind, self._cls = kind, None

    def __call__(self, *args: Any, **kwargs: Any):
        if self._cls is None:
            self._cls = _cache(self.kind)
        return self._cls(*args, **kwargs)


def _merge_without_scaling():
    from peft.tuners.lora import layer

    original = layer.Linear.get_delta_weight

    def delta(self, adapter):  # B·A, the alpha/r factor dropped
        return original(self, adapter) / self.scaling[adapter]
    return [(layer.Linear, "get_delta_weight", delta)]


def _trainer(kind: str) -> type:
    import transformers

    class Wrong(transformers.Trainer):
        if kind == "mean_of_means":
            def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
                # without num_items_in_batch the model's loss is its micro-batch's mean and the Trainer divides it
                # by the accumulation steps: transformers' loop before 4.46
                return super().training_step(model, inputs, None, *args, **kwargs)
        else:
            def _get_num_items_in_batch(self, batch_samples, device):
                # every label that is not -100, position 0's included, which the shifted loss never predicts
                return sum(b["labels"].ne(-100).sum() for b in batch_samples).to(device)
    Wrong.__name__ = Wrong.__qualname__ = {"mean_of_means": "MeanOfMeansTrainer",
                                           "unshifted": "UnshiftedCountTrainer"}[kind]
    return Wrong


class _LazyTrainer:
    """A Trainer subclass made on first use, behaving as the class (``trainer_cls(...)`` and subclassing)."""

    def __init__(self, kind: str):
        self.kind, self._cls = kind, None

    def resolve(self) -> type:
        if self._cls is None:
            self._cls = _trainer(self.kind)
        return self._cls


_add("hf_cache_batch_blind", "kv_cache",
     "a DynamicCache whose update hands every row row 0's keys and values (a cache that ignores the batch index)",
     "cached and uncached generate disagreeing on batched prompts: transformers#36536, #27040",
     cache_cls=_LazyCache("batch_blind"))
_add("hf_cache_prepends", "kv_cache",
     "a DynamicCache that puts each chunk's keys in front of the cached ones (it ignores their positions): one "
     "token at a time this is invisible, a chunk meets a causal mask that no longer lines up",
     "cache position bookkeeping under chunked prefill: transformers#36536",
     cache_cls=_LazyCache("prepend"))
_add("hf_merge_without_scaling", "lora_merge",
     "PEFT's lora.Linear.get_delta_weight without the alpha/r factor: merge_adapter adds B·A, the forward adds "
     "(alpha/r)·B·A",
     "merged LoRA models answering differently from unmerged ones: PEFT#1035, #2502", patches=_merge_without_scaling)
_add("hf_reentrant_frozen_base", "gradient_checkpointing",
     "use_reentrant=True under a frozen embedding without enable_input_require_grads (undone after "
     "gradient_checkpointing_enable): no block input requires grad, so the reentrant checkpoint loses the LoRA "
     "gradients",
     "LoRA weights getting no gradient under reentrant checkpointing: transformers#26221", input_require_grads=False)
_add("hf_ga_mean_of_micro_means", "grad_accum",
     "Trainer.training_step without num_items_in_batch: each micro-batch's own token mean, divided by the "
     "accumulation steps (a mean of micro-batch means)",
     "transformers before 4.46 (the October 2024 fix, transformers#34191)", trainer_cls=_LazyTrainer("mean_of_means"))
_add("hf_ga_counts_unshifted_labels", "grad_accum",
     "num_items_in_batch counting every label that is not -100 (position 0's included, which the shifted causal "
     "loss never predicts): the window loss divided by too many tokens",
     "the count transformers' Trainer made of labels[...] instead of labels[..., 1:] in releases after the 4.46 fix",
     trainer_cls=_LazyTrainer("unshifted"))


def _forward_drops_num_items():
    from transformers import LlamaForCausalLM
    original = LlamaForCausalLM.forward

    def forward(self, *args, num_items_in_batch=None, **kwargs):  # taken, and not passed on to the loss
        return original(self, *args, **kwargs)
    return [(LlamaForCausalLM, "forward", forward)]


_add("hf_forward_drops_num_items_in_batch", "loss_kernel",
     "a patched LlamaForCausalLM.forward that takes num_items_in_batch and does not pass it to its loss: the loss "
     "is each micro-batch's own mean (the window's loss x the accumulation steps under the Trainer)",
     "linkedin/Liger-Kernel#802: the fused-loss patch of the forward ignored num_items_in_batch",
     patches=_forward_drops_num_items)


def resolved(mutant: Mutant) -> dict[str, Any]:
    """``mutant``'s components with the lazily made classes made."""
    return {k: (v.resolve() if isinstance(v, _LazyTrainer) else v) for k, v in mutant.components.items()}
