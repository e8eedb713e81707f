"""Putting LoRA into a Llama and taking it out: replace target Linears, freeze the base, merge, unmerge, unload."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..model import Transformer
from .layer import ATTENTION_TARGETS, ALL_TARGETS, MODEL_TARGETS, LoRALayer, LoRALinear
from .tied import LoRAEmbedding, TiedEmbedding, TiedHead, plain_copy_of


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
                        layer_cls: type[LoRALinear] = LoRALinear, generator: Optional[torch.Generator] = None,
                        keep_tied: bool = False) -> tuple[Transformer, tuple[int, int, float]]:
    """Replace the ``targets`` Linears of every block with ``LoRALinear`` (in place, reusing the base weights) and
    freeze everything else. Returns ``(model, (trainable, total, percent))``.

    ``targets`` ⊆ {wq, wk, wv, wo, w1, w2, w3} (each block's) ∪ {tok_embeddings, output} (the model's vocabulary
    matrices: ``LoRAEmbedding``, ``LoRALinear``); ``lora_dtype`` (default: each weight's) is the adapters' dtype, e.g.
    fp32 adapters on a bf16 base; ``layer_cls`` the adapter class (a ``LoRALinear`` subclass: the seam through which
    a check is given another implementation of the layer); ``generator`` draws every ``A`` (the global RNG when
    None). On a tied model an adapter on one vocabulary matrix changes that module only, and merges into a tensor of
    its own; ``keep_tied`` makes the update the shared matrix's instead (the other module follows it; one of the two
    targeted): :mod:`llama_ref.lora.tied`. Raises ValueError for an unknown target, bad hyper-parameters, or a model
    that already has LoRA layers.
    """
    targets = tuple(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in ALL_TARGETS + MODEL_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or targets!r}; choose from "
                         f"{list(ALL_TARGETS + MODEL_TARGETS)}")
    if any(isinstance(m, (LoRALayer, TiedEmbedding, TiedHead)) for m in model.modules()):
        raise ValueError("the model already has LoRA layers: apply_lora_to_llama was applied twice")
    vocab = [t for t in targets if t in MODEL_TARGETS]
    tied = model.output.weight is model.tok_embeddings.weight
    if keep_tied and (not tied or len(vocab) != 1):
        raise ValueError("keep_tied: the model must be tied (tie_embeddings) and exactly one of tok_embeddings, "
                         f"output targeted; got tied={tied}, targets {list(targets)}")
    LoRALayer(rank, alpha, dropout, merge_weights)  # validate once, before touching the model
    for block in model.layers:
        for target in targets:
            if target in MODEL_TARGETS:
                continue
            parent = _target_parent(block, target)
            setattr(parent, target, layer_cls.from_linear(getattr(parent, target), rank, alpha, dropout,
                                                          merge_weights, use_rslora, lora_dtype, generator))
    if "output" in vocab:
        model.output = layer_cls.from_linear(model.output, rank, alpha, dropout, merge_weights, use_rslora,
                                             lora_dtype, generator)
    if "tok_embeddings" in vocab:
        model.tok_embeddings = LoRAEmbedding.from_embedding(model.tok_embeddings, rank, alpha, dropout, merge_weights,
                                                            use_rslora, lora_dtype, generator)
    for layer in (model.output, model.tok_embeddings):
        if tied and isinstance(layer, LoRALayer):
            layer.untie_on_merge = not keep_tied
    if keep_tied and "output" in vocab:
        model.tok_embeddings = TiedEmbedding(model.output.weight, model.output)
    elif keep_tied:
        model.output = TiedHead(model.tok_embeddings.weight, model.tok_embeddings)
    mark_only_lora_as_trainable(model)
    return model, count_parameters(model)


def merge_lora(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, LoRALayer):
            layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, LoRALayer):
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
    adapted = (LoRALayer, TiedEmbedding, TiedHead)
    if isinstance(model.output, adapted) or isinstance(model.tok_embeddings, adapted):
        model.output, model.tok_embeddings = plain_copy_of(model.output), plain_copy_of(model.tok_embeddings)
        # an untied merge gave the adapted matrix a tensor of its own: the configuration says so from now on
        model.params.tie_embeddings = model.output.weight is model.tok_embeddings.weight
    for param in model.parameters():
        param.requires_grad = True
    return model
