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
        "LoRA ports that invert loralib's `lora_alpha / r`")
def _lora_scaling_inverted() -> list[Patch]:
    return [(L.LoRALinear, "scaling", property(lambda self: self.r / self.lora_alpha))]


@mutant("lora_scaling_alpha_only", "scaling = alpha (the division by r forgotten)",
        "adapters whose update is multiplied by lora_alpha alone")
def _lora_scaling_alpha() -> list[Patch]:
    return [(L.LoRALinear, "scaling", property(lambda self: float(self.lora_alpha)))]


@mutant("lora_merge_without_scaling", "merge adds B·A, the forward adds scaling·B·A",
        "merge code that forgets the scaling the forward applies")
def _lora_merge_unscaled() -> list[Patch]:
    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype))
        self.merged = True
    return [(L.LoRALinear, "merge", merge)]


@mutant("lora_merge_transposed", "merge adds (B·A)ᵀ (right only for square targets, if at all)",
        "loralib's `fan_in_fan_out` transpose applied to a layer that does not need it")
def _lora_merge_transposed() -> list[Patch]:
    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.delta_weight().T.reshape(self.weight.shape)).to(self.weight.dtype))
        self.merged = True
    return [(L.LoRALinear, "merge", merge)]


@mutant("lora_unmerge_noop", "unmerge clears the flag without subtracting",
        "train() after eval() leaving the update merged (and adding it again on the next eval)")
def _lora_unmerge_noop() -> list[Patch]:
    def unmerge(self):
        self.merged = False
    return [(L.LoRALinear, "unmerge", unmerge)]


@mutant("lora_unmerge_twice", "unmerge subtracts the update twice",
        "unmerge written as `W -= 2 * delta` / run from both train() and an explicit call")
def _lora_unmerge_twice() -> list[Patch]:
    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - 2 * self.delta_weight()).to(self.weight.dtype))
        self.merged = False
    return [(L.LoRALinear, "unmerge", unmerge)]


@mutant("lora_dropout_in_eval", "LoRA dropout applied whatever the mode",
        "`F.dropout(x, p)` (training=True by default) in the LoRA branch")
def _lora_dropout_in_eval() -> list[Patch]:
    original = L.LoRALinear.forward

    def forward(self, x):
        p = getattr(self.lora_dropout, "p", 0.0)
        if self.merged:
            return F.dropout(original(self, x), p, training=True)
        return original(self, F.dropout(x, p, training=True))  # base path gets it too: unmerged ≠ merged
    return [(L.LoRALinear, "forward", forward)]


@mutant("lora_merge_every_eval", "eval() merges again even when already merged",
        "merge without the `merged` guard: every eval() adds the update once more")
def _lora_merge_unguarded() -> list[Patch]:
    @torch.no_grad()
    def merge(self):
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True
    return [(L.LoRALinear, "merge", merge)]


@mutant("lora_base_trainable", "base weights left trainable",
        "mark_only_lora_as_trainable not called, or matching on a name that never occurs")
def _lora_base_trainable() -> list[Patch]:
    def mark_only_lora_as_trainable(model):
        return None
    return [(LA, "mark_only_lora_as_trainable", mark_only_lora_as_trainable)]


@mutant("lora_b_not_zero_init", "lora_B initialised like lora_A: a fresh adapter changes the model",
        "A/B initialisations swapped or both random")
def _lora_b_random() -> list[Patch]:
    original = L.LoRALinear.reset_lora_parameters

    def reset_lora_parameters(self, generator=None):
        original(self, generator)
        if not self.lora_B.is_meta:
            with torch.no_grad():
                bound = 1.0 / math.sqrt(self.r)
                self.lora_B.uniform_(-bound, bound, generator=generator)
    return [(L.LoRALinear, "reset_lora_parameters", reset_lora_parameters)]


