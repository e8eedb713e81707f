"""Putting LoRA into a Llama and taking it out: replace target Linears, freeze the base, merge, unmerge, unload."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..model import Transformer
from .layer import ATTENTION_TARGETS, ALL_TARGETS, LoRALayer, LoRALinear


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze every parameter but the adapters' ``lora_A`` / ``lora_B``."""
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name.rsplit(".", 1)[-1]


def count_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable percent); a tied tensor counts once."""
    params = list(model.parameters())  # named_parameters de-duplicates shared tensors
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return trainable, total, 100.0 * trainable / total if total else 0.0


def _target_parent(block: nn.Module, target: str) -> nn.Module:
    return block.attention if target in ATTENTION_TARGETS else block.feed_forward


def apply_lora_to_llama(model: Transformer, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
                        targets: Iterable[str] = ("wq", "wv"), *, merge_weights: bool = True,
                        use_rslora: bool = False, lora_dtype: Optional[torch.dtype] = None,
                        layer_cls: type[LoRALinear] = LoRALinear, generator: Optional[torch.Generator] = None
                        ) -> tuple[Transformer, tuple[int, int, float]]:
    """Replace the ``targets`` Linears of every block with ``LoRALinear`` (in place, reusing the base weights) and
    freeze everything else. Returns ``(model, (trainable, total, percent))``.

    ``targets`` ⊆ {wq, wk, wv, wo, w1, w2, w3}; ``lora_dtype`` (default: each weight's) is the adapters' dtype, e.g.
    fp32 adapters on a bf16 base; ``layer_cls`` the adapter class (a ``LoRALinear`` subclass: the seam through which
    a check is given another implementation of the layer); ``generator`` draws every ``A`` (the global RNG when
    None). Raises ValueError for an unknown target, bad hyper-parameters, or a model that already has LoRA layers.
    """
    targets = tuple(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or targets!r}; choose from {list(ALL_TARGETS)}")
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already has LoRA layers: apply_lora_to_llama was applied twice")
    LoRALayer(rank, alpha, dropout, merge_weights)  # validate once, before touching the model
    for block in model.layers:
        for target in targets:
            parent = _target_parent(block, target)
            setattr(parent, target, layer_cls.from_linear(getattr(parent, target), rank, alpha, dropout,
                                                          merge_weights, use_rslora, lora_dtype, generator))
    mark_only_lora_as_trainable(model)
    return model, count_parameters(model)


def merge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back (in place): the result is an
    ordinary Transformer whose state_dict is a Meta checkpoint. Parameters come back trainable."""
    for block in model.layers:
        for target in ALL_TARGETS:
            parent = _target_parent(block, target)
            layer = getattr(parent, target)
            if isinstance(layer, LoRALinear):
                layer.merge()
                with torch.device("meta"):
                    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                plain.weight = layer.weight
                if layer.bias is not None:
                    plain.bias = layer.bias
                plain.train(layer.training)
                setattr(parent, target, plain)
    for param in model.parameters():
        param.requires_grad = True
    return model
