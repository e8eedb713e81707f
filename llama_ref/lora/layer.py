"""LoRA after loralib: low-rank adapters that replace a Linear, merge into it for inference, and unmerge exactly.

``LoRALinear`` computes ``W·x + scaling·B·(A·dropout(x))`` with ``scaling = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA); ``A`` starts Kaiming-uniform, ``B`` at zero, so a fresh adapter is the base model. ``eval()`` merges
``scaling·B·A`` into ``W`` (once: a ``merged`` flag guards it) and ``train()`` takes it out again, when
``merge_weights`` is set. The product is accumulated in fp32 and written back in the weight's dtype.

Notation used for tensor shapes: r rank, in/out the Linear's features.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
FFN_TARGETS = ("w1", "w2", "w3")
ALL_TARGETS = ATTENTION_TARGETS + FFN_TARGETS  # the blocks' Linears
MODEL_TARGETS = ("tok_embeddings", "output")  # the vocabulary matrices (llama_ref.lora.tied), once per model


class LoRALayer:
    """The adapter's hyper-parameters, shared by every LoRA layer type (loralib's mixin)."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool,
                 use_rslora: bool = False):
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {lora_alpha!r}")
        if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {lora_dropout!r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merge_weights = merge_weights
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Linear, LoRALayer):
    """A bias-free-or-not ``nn.Linear`` with a trainable low-rank update; the base ``weight`` is frozen."""

    untie_on_merge = False  # set on a tied model's head: merge into a new tensor (llama_ref.lora.tied)

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, merge_weights: bool = True, use_rslora: bool = False,
                 bias: bool = False, device=None, dtype=None, lora_dtype: Optional[torch.dtype] = None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        lora_dtype = lora_dtype or self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty((r, in_features), device=self.weight.device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r), device=self.weight.device, dtype=lora_dtype))
        self.weight.requires_grad = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    merge_weights: bool = True, use_rslora: bool = False,
                    lora_dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None
                    ) -> "LoRALinear":
        """Wrap ``linear``, reusing its weight (and bias) tensors: no second copy of the base in memory; ``A``
        drawn from ``generator`` (the global RNG when None)."""
        with torch.device("meta"):  # the base weight built here is discarded: allocate nothing
            layer = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, merge_weights,
                        use_rslora, bias=linear.bias is not None, dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad = False
        if linear.bias is not None:
            layer.bias = linear.bias
        lora_dtype = lora_dtype or linear.weight.dtype
        device = linear.weight.device
        layer.lora_A = nn.Parameter(torch.empty((r, linear.in_features), device=device, dtype=lora_dtype))
        layer.lora_B = nn.Parameter(torch.empty((linear.out_features, r), device=device, dtype=lora_dtype))
        layer.reset_lora_parameters(generator)
        layer.train(linear.training)
        return layer

    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """``A`` Kaiming-uniform (a=√5, as nn.Linear), ``B`` zeros: the update starts at exactly zero."""
        if self.lora_A.is_meta:
            return
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on fan_in = in_features
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()
        self.merged = False

    def _accumulation_dtype(self) -> torch.dtype:
        """fp32 for half weights and fp32 ones; float64 stays float64 (``.float()`` would round a float64 merge)."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """``scaling·B·A`` (out, in), accumulated in fp32 (float64 for a float64 layer)."""
        acc = self._accumulation_dtype()
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``; a second call is a no-op. With ``untie_on_merge`` (a base weight shared
        with another module: a tied model's head or embedding, :mod:`llama_ref.lora.tied`) into a new tensor, the
        shared one kept aside untouched."""
        if self.merged:
            return
        merged = (self.weight.to(self._accumulation_dtype()) + self.delta_weight()).to(self.weight.dtype)
        if self.untie_on_merge:
            self.__dict__["_shared_weight"] = self.weight  # kept aside, not registered: no second state-dict key
            self.weight = nn.Parameter(merged, requires_grad=False)
        else:
            self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight`` again; a no-op unless merged (an untied merge puts the shared weight
        back, exactly)."""
        if not self.merged:
            return
        shared = self.__dict__.pop("_shared_weight", None)
        if shared is not None:
            self.weight = shared
        else:
            self.weight.copy_((self.weight.to(self._accumulation_dtype()) - self.delta_weight())
                              .to(self.weight.dtype))
        self.merged = False

    def train(self, mode: bool = True) -> "LoRALinear":
        nn.Linear.train(self, mode)
        if self.merge_weights:
            if mode:
                self.unmerge()
            else:
                self.merge()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        if self.merged:
            return result
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(h.device.type):  # under autocast F.linear casts; a copy would only cost
            h = h.to(self.lora_A.dtype)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling  # (…, r) then (…, out)
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"merged={self.merged}")
