"""The bug zoo of property 9 (tied embeddings): the ways real fine-tuning stacks broke a tie — a head adapter merged
into the shared matrix, a configuration left tied after an untying merge, the trained head dropped at save, fresh
storage for the head after ``to_empty``, a gradient from one use only (of the matrix, of an adapter kept tied), the
tied matrix counted twice. Each runs on
the embedded default built tied (``tie_embeddings=True``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import llama_ref.formats.meta as meta_format
import llama_ref.lora.apply as lora_apply
import llama_ref.model as LM
from llama_ref.lora.layer import LoRALinear
from llama_ref.lora.tied import TiedEmbedding

from .base import Mutant, collector

PROP = "tied_embeddings"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)
TIED = {"tie_embeddings": True}

_MERGE, _UNLOAD, _SAVE, _COUNT = LoRALinear.merge, lora_apply.merge_and_unload, meta_format.save_checkpoint, \
    lora_apply.count_parameters


@torch.no_grad()
def _merge_in_place(self) -> None:
    if self.merged:
        return
    self.weight.copy_((self.weight.to(self._accumulation_dtype()) + self.delta_weight()).to(self.weight.dtype))
    self.merged = True


@mutant("tied_head_adapter_merged_into_embedding", "a LoRA adapter on the head of a tied model merged in place "
        "into the shared matrix: the input embedding changes too",
        "huggingface/peft#2018: a lm_head adapter merged into the tied embed_tokens as well", **TIED)
def _merged_into_shared():
    return [(LoRALinear, "merge", _merge_in_place)]


def _unload_keeping_config(model):
    tied = model.params.tie_embeddings
    out = _UNLOAD(model)
    out.params.tie_embeddings = tied  # the configuration as it was before the untying merge
    return out


@mutant("tied_config_left_tied_after_untying_merge", "merge_and_unload gives the adapted head a tensor of its own "
        "but leaves the configuration saying tied: a save then records a tie the weights no longer have",
        "huggingface/transformers#45127, huggingface/peft#2972: after merge and save the config still said tied, "
        "so the reload overwrote the trained head with the embedding", **TIED)
def _config_left_tied():
    return [(lora_apply, "merge_and_unload", _unload_keeping_config)]


def _save_without_head(model, ckpt_dir, *, dtype=None):
    out = _SAVE(model, ckpt_dir, dtype=dtype)
    for shard in sorted(Path(out).glob("consolidated.*.pth")):
        state = torch.load(shard, weights_only=True)
        state.pop("output.weight", None)  # "the embedding is the head": not written
        torch.save(state, shard)
    return out


@mutant("tied_head_dropped_at_save", "the checkpoint writer leaves output.weight out as if the head were always the "
        "embedding: an untied, trained head is lost and reloads as the embedding",
        "unslothai/unsloth#9331 (the trained head discarded at merge), hiyouga/LlamaFactory#10832", **TIED)
def _head_dropped():
    return [(meta_format, "save_checkpoint", _save_without_head)]


@mutant("tied_fresh_storage_after_to_empty", "tie_weights does nothing: a model materialised from the meta device "
        "(to_empty) or loaded with assign=True keeps a head of its own storage while configured tied",
        "verl-project/verl#7834: FSDP2's to_empty gave the head fresh storage, so the embedding received only the "
        "input-side half of its gradient", **TIED)
def _fresh_storage():
    return [(LM.Transformer, "tie_weights", lambda self: None)]


class DetachedHead(nn.Linear):
    """A head that projects with the shared weight detached: its use contributes no gradient to the tied tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.detach())


mutant("tied_gradient_from_one_use", "the head projects with the tied weight detached: the tied tensor's gradient is "
       "the embedding's use alone", "verl-project/verl#7834 (its symptom: the tied weight trained by one of its two "
       "uses)", component="head_cls", **TIED)(DetachedHead)


def _follower_detached(self, tokens: torch.Tensor) -> torch.Tensor:
    out = F.embedding(tokens, self.weight)
    if self.leader.merged:
        return out
    leader = self.leader
    return out + (F.embedding(tokens, leader.lora_B.detach()) @ leader.lora_A.detach() * leader.scaling).to(out.dtype)


@mutant("tied_kept_adapter_trained_by_one_use", "the embedding that follows a head adapter kept tied reads the "
        "adapter detached: the shared update is used twice and trained by the head's use alone",
        "unslothai/unsloth#3711: tied adapter copies whose storage was broken, each trained by its own use", **TIED)
def _kept_adapter_one_use():
    return [(TiedEmbedding, "forward", _follower_detached)]


def _count_every_name(model):
    names = list(model.named_parameters(remove_duplicate=False))
    total = sum(p.numel() for _, p in names)
    trainable = sum(p.numel() for _, p in names if p.requires_grad)
    return trainable, total, 100.0 * trainable / total if total else 0.0


@mutant("tied_counted_twice", "the parameter count walks every module's parameters by name, so the tied matrix is "
        "counted under output.weight and tok_embeddings.weight", "the seed report's 1,498,482,688 for Llama 3.2 1B, "
        "published tied at 1,235,814,400 (the head's 262,668,288 counted twice)", **TIED)
def _counted_twice():
    return [(lora_apply, "count_parameters", _count_every_name)]
