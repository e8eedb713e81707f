"""The models, tokens and files the adapter tests share (tests/llama_ref/lora/test_adapter*.py): a tiny GQA Llama,
LoRA on it with seeded non-zero factors, and edits of a saved adapter's config."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn

from llama_ref.args import ModelArgs
from llama_ref.lora import ALL_TARGETS, apply_lora_to_llama, lora_layers
from llama_ref.lora.adapter import CONFIG_FILE
from llama_ref.model import Transformer, init_weights

ARGS = ModelArgs.preset("tiny", kv_caching=False, max_seq_len=32)  # GQA: n_heads 4, n_kv_heads 2; FFN 64 → 192
exact = functools.partial(torch.testing.assert_close, rtol=0.0, atol=0.0)


def base_model(seed: int = 0, args: ModelArgs = ARGS) -> Transformer:
    """A Llama of shape ``args`` with ``init_weights``' seeded weights."""
    return init_weights(Transformer(args), seed)


# |ΔW| = scaling·|B·A| ~ 0.6·|W| at r=4, alpha=12: a large but not dominating update. Much larger updates blow up
# the residual stream, and with it every rounding error, without testing anything more.
B_STD = 0.1


@torch.no_grad()
def randomize_lora(model: Transformer, seed: int) -> Transformer:
    """Seeded non-zero A and B (B starts at zero); unmerged while they change, so a merged weight stays right."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        was_merged = layer.merged
        layer.unmerge()
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * layer.in_features ** -0.5)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * B_STD)
        if was_merged:
            layer.merge()
    return model


def vocab_adapted(base: Transformer, targets, keep_tied: bool = False) -> Transformer:
    """A copy of (tied) ``base`` with LoRA on ``targets`` (vocabulary matrices among them), every adapter parameter
    drawn N(0, 0.01) from a fixed seed (a fresh one is the base model), in train mode."""
    model = copy.deepcopy(base)
    apply_lora_to_llama(model, 4, 8, 0.0, targets, keep_tied=keep_tied, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def lora_model(seed: int = 0, r: int = 4, alpha: float = 12.0, targets=ALL_TARGETS, rslora: bool = False,
               dropout: float = 0.0, args: ModelArgs = ARGS, **kwargs) -> Transformer:
    """``base_model(seed)`` with LoRA on ``targets`` (``kwargs``: ``apply_lora_to_llama``'s), its factors seeded
    from ``seed + 1000`` (non-zero), in eval mode (merged)."""
    model, _ = apply_lora_to_llama(base_model(seed, args), r, alpha, dropout, targets, use_rslora=rslora, **kwargs)
    return randomize_lora(model, seed + 1000).eval()


def random_tokens(seed: int = 0, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    """Seeded token ids of ``ARGS``' vocabulary."""
    return torch.randint(0, ARGS.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits without autograd."""
    return model(tokens)


def lora_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Copies of the model's LoRA factors by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def edit_config(d: Path, **changes) -> None:
    """Rewrite the adapter config in ``d`` with ``changes`` applied."""
    config = json.loads((d / CONFIG_FILE).read_text())
    config.update(changes)
    (d / CONFIG_FILE).write_text(json.dumps(config))
