"""The bug zoo of property 3 (LoRA merge): scalings, merges, unmerges, dropout and initialisations that real
adapters got wrong."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import llama_ref.lora as L
import llama_ref.lora.apply as LA

from .base import Mutant, Patch, collector

PROP = "lora_merge"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)


@mutant("lora_scaling_r_over_alpha", "scaling = r / alpha (invisible when alpha == r)",
        "LoRA ports that invert loralib's `lora_alpha / r`", component="lora_layer_cls")
class _ScalingInverted(L.LoRALinear):
    @property
    def scaling(self) -> float:
        return self.r / self.lora_alpha


@mutant("lora_scaling_alpha_only", "scaling = alpha (the division by r forgotten)",
        "adapters whose update is multiplied by lora_alpha alone", component="lora_layer_cls")
class _ScalingAlphaOnly(L.LoRALinear):
    @property
    def scaling(self) -> float:
        return float(self.lora_alpha)


@mutant("lora_merge_without_scaling", "merge adds B·A, the forward adds scaling·B·A",
        "merge code that forgets the scaling the forward applies", component="lora_layer_cls")
class _MergeUnscaled(L.LoRALinear):
    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype))
        self.merged = True


@mutant("lora_merge_transposed", "merge adds (B·A)ᵀ (right only for square targets, if at all)",
        "loralib's `fan_in_fan_out` transpose applied to a layer that does not need it", component="lora_layer_cls")
class _MergeTransposed(L.LoRALinear):
    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        delta = self.delta_weight().T.reshape(self.weight.shape)
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.merged = True


@mutant("lora_unmerge_noop", "unmerge clears the flag without subtracting",
        "train() after eval() leaving the update merged (and adding it again on the next eval)",
        component="lora_layer_cls")
class _UnmergeNoop(L.LoRALinear):
    def unmerge(self):
        self.merged = False


@mutant("lora_unmerge_twice", "unmerge subtracts the update twice",
        "unmerge written as `W -= 2 * delta` / run from both train() and an explicit call", component="lora_layer_cls")
class _UnmergeTwice(L.LoRALinear):
    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - 2 * self.delta_weight()).to(self.weight.dtype))
        self.merged = False


@mutant("lora_dropout_in_eval", "LoRA dropout applied whatever the mode",
        "`F.dropout(x, p)` (training=True by default) in the LoRA branch", component="lora_layer_cls")
class _DropoutInEval(L.LoRALinear):
    def forward(self, x):
        p = getattr(self.lora_dropout, "p", 0.0)
        if self.merged:
            return F.dropout(super().forward(x), p, training=True)
        return super().forward(F.dropout(x, p, training=True))  # base path gets it too: unmerged ≠ merged


@mutant("lora_merge_every_eval", "eval() merges again even when already merged",
        "merge without the `merged` guard: every eval() adds the update once more", component="lora_layer_cls")
class _MergeUnguarded(L.LoRALinear):
    @torch.no_grad()
    def merge(self):
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True


@mutant("lora_base_trainable", "base weights left trainable",
        "mark_only_lora_as_trainable not called, or matching on a name that never occurs")
def _lora_base_trainable() -> list[Patch]:
    def mark_only_lora_as_trainable(model):
        return None
    return [(LA, "mark_only_lora_as_trainable", mark_only_lora_as_trainable)]


@mutant("lora_b_not_zero_init", "lora_B initialised like lora_A: a fresh adapter changes the model",
        "A/B initialisations swapped or both random", component="lora_layer_cls")
class _BRandom(L.LoRALinear):
    def reset_lora_parameters(self, generator=None):
        super().reset_lora_parameters(generator)
        if not self.lora_B.is_meta:
            with torch.no_grad():
                bound = 1.0 / math.sqrt(self.r)
                self.lora_B.uniform_(-bound, bound, generator=generator)
