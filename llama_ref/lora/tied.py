"""LoRA on the vocabulary matrices — the output head and the input embedding — and what it does to a tie.

A tied model's ``output.weight`` *is* ``tok_embeddings.weight``. An adapter on one of the two can be meant two ways:

- **untied** (the default): the adapter changes only the module it is on. The frozen base stays shared while
  unmerged; merging folds the update into a *new* tensor for that module (``LoRALinear.untie_on_merge``), never into
  the shared one — an in-place merge would change the other use too (huggingface/peft#2018) — and
  :func:`llama_ref.lora.apply.merge_and_unload` then records the model as untied (``params.tie_embeddings`` False),
  so that a save writes both matrices and a reload does not overwrite the trained one with the other
  (huggingface/transformers#45127).
- **kept tied** (``keep_tied=True``): the update belongs to the shared matrix. The other module becomes a
  *follower* that reads the adapter of the one targeted (:class:`TiedEmbedding`, :class:`TiedHead`); merging adds
  the update into the shared tensor in place, and the tie survives merge and unload.

``LoRAEmbedding`` is PEFT's embedding adapter: ``ΔW = scaling·(B·A)ᵀ`` (V, D) with ``A`` (r, V) zeros and ``B``
(D, r) normal at the start, so a fresh adapter is the base model and ``B`` gets a gradient from the first step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRALayer, LoRALinear


class LoRAEmbedding(nn.Embedding, LoRALayer):
    """An ``nn.Embedding`` (V, D) with a trainable low-rank update of its table; the base ``weight`` is frozen."""

    untie_on_merge = False  # set on a tied model's embedding: merge into a new tensor (see the module's doc)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                       merge_weights: bool = True, use_rslora: bool = False,
                       lora_dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None
                       ) -> "LoRAEmbedding":
        """Wrap ``embedding``, reusing its weight tensor (``lora_dropout`` is not applied to a lookup, as PEFT)."""
        with torch.device("meta"):
            layer = cls(embedding.num_embeddings, embedding.embedding_dim)
        LoRALayer.__init__(layer, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        layer.weight = embedding.weight
        layer.weight.requires_grad = False
        dtype, device = lora_dtype or embedding.weight.dtype, embedding.weight.device
        layer.lora_A = nn.Parameter(torch.zeros((r, embedding.num_embeddings), device=device, dtype=dtype))
        layer.lora_B = nn.Parameter(torch.empty((embedding.embedding_dim, r), device=device, dtype=dtype))
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator, dtype=torch.float32))
        layer.train(embedding.training)
        return layer

    def _accumulation_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """``scaling·(B·A)ᵀ`` (V, D), accumulated in fp32 (float64 for a float64 table)."""
        acc = self._accumulation_dtype()
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)).T * self.scaling

    def lookup_delta(self, tokens: torch.Tensor) -> torch.Tensor:
        """The update's rows for ``tokens``: ``scaling·Aᵀ[tokens]·Bᵀ`` (…, D)."""
        return F.embedding(tokens, self.lora_A.T) @ self.lora_B.T * self.scaling

    def project_delta(self, h: torch.Tensor) -> torch.Tensor:
        """``h·ΔWᵀ`` (…, V): the update's logits, when the head shares this table."""
        return (h.to(self.lora_B.dtype) @ self.lora_B) @ self.lora_A * self.scaling

    merge = LoRALinear.merge
    unmerge = LoRALinear.unmerge
    train = LoRALinear.train

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        return out if self.merged else out + self.lookup_delta(tokens).to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"


class _Follower(nn.Module):
    """The other use of a tied matrix whose adapter lives on the module targeted (``leader``): its own ``weight`` is
    the shared Parameter, the update is read from the leader (held outside the module tree, so that its adapter
    parameters are counted, trained and saved once, under the leader's name)."""

    def __init__(self, weight: nn.Parameter, leader: nn.Module):
        super().__init__()
        self.weight = weight
        object.__setattr__(self, "leader", leader)


class TiedEmbedding(_Follower):
    """The input embedding of a tied model whose head carries the adapter (``keep_tied=True``): looks up
    ``W + ΔW`` (``ΔW = scaling·B·A`` of the head), or ``W`` alone once the head has merged ``ΔW`` into ``W``."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        if self.leader.merged:
            return out
        delta = F.embedding(tokens, self.leader.lora_B) @ self.leader.lora_A * self.leader.scaling
        return out + delta.to(out.dtype)


class TiedHead(_Follower):
    """The output head of a tied model whose embedding carries the adapter (``keep_tied=True``): ``h·(W + ΔW)ᵀ``."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, self.weight)
        return out if self.leader.merged else out + self.leader.project_delta(h).to(out.dtype)


def plain_copy_of(module: nn.Module) -> nn.Module:
    """An ``nn.Embedding`` or ``nn.Linear`` (no bias) holding ``module``'s current ``weight`` tensor (merged first
    where it is an adapter): what merge-and-unload puts back."""
    if isinstance(module, LoRALayer):
        module.merge()
    vocab, dim = module.weight.shape
    with torch.device("meta"):
        plain = nn.Embedding(vocab, dim) if isinstance(module, (nn.Embedding, TiedEmbedding)) else \
            nn.Linear(dim, vocab, bias=False)
    plain.weight = module.weight
    plain.train(module.training)
    return plain
