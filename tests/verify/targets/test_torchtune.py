"""Property checks on torchtune's own Llama 3 (0.6.1) — its builders, its LoRA, its activation checkpointing, a
token-mean step in its calling convention — through the input_pos adapter. torchtune is not in the test extra (its
pins conflict): `tox -e torchtune` installs it and runs these; elsewhere they skip, saying so."""
from __future__ import annotations

import pytest

pytest.importorskip("torchtune", reason="torchtune is not installed here: tox -e torchtune runs these")

import torch  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper  # noqa: E402
from torchtune.training import set_activation_checkpointing  # noqa: E402

from verify.checks.grad_accum import check_grad_accumulation  # noqa: E402
from verify.checks.gradient_checkpointing import check_gradient_checkpointing  # noqa: E402
from verify.checks.kv_cache import check_kv_cache  # noqa: E402
from verify.checks.lora_merge import check_lora_merge  # noqa: E402
from verify.checks.mixed_precision import check_mixed_precision  # noqa: E402
from verify.checks.packing import check_packing, documents  # noqa: E402
from verify.targets.base import unwrapped  # noqa: E402
from verify.targets.input_pos import InputPosTarget  # noqa: E402
from verify.targets.spec import as_target  # noqa: E402

from . import frameworks, train_steps as TS  # noqa: E402

SIZES = frameworks.TORCHTUNE_SIZES


make = frameworks.torchtune_model


def test_the_model_is_recognised_and_its_kv_cache_passes():
    target = as_target(make())
    assert isinstance(target, InputPosTarget) and target.style == "torchtune"
    result = check_kv_cache(target)
    assert result.verdict == "PASS", str(result)


def _wrapping(impl):
    """A switch wrapping exactly the chosen layers (and unwrapping the others), as set_activation_checkpointing
    does for every layer of a type."""
    def switch(model, blocks):
        for i, layer in enumerate(model.layers):
            layer = unwrapped(layer)
            model.layers[i] = checkpoint_wrapper(layer, checkpoint_impl=impl) if i in blocks else layer
    return switch


def test_its_checkpoint_wrapper_passes_and_a_reentrant_one_under_lora_fails():
    assert check_gradient_checkpointing(as_target(make(lora=True))).verdict == "PASS"
    own = InputPosTarget(make(lora=True), gc_switch=_wrapping(CheckpointImpl.NO_REENTRANT))
    assert check_gradient_checkpointing(own).verdict == "PASS"
    reentrant = InputPosTarget(make(lora=True), gc_switch=_wrapping(CheckpointImpl.REENTRANT))
    result = check_gradient_checkpointing(reentrant, full_finetune=False)
    assert not result.ok and any("gradient is None" in d for d in result.details), str(result)


def test_set_activation_checkpointing_itself_checkpoints_every_layer():
    model = make()
    set_activation_checkpointing(model, auto_wrap_policy={type(model.layers[0])})
    target = InputPosTarget(model)
    assert target.checkpointed_blocks(model) == frozenset(range(SIZES["num_layers"]))


def test_accumulation_and_mixed_precision_pass_with_a_token_mean_step():
    ga = check_grad_accumulation(as_target(make()), train_step=TS.through(TS.token_mean_step), lora=(False,))
    assert ga.verdict == "PASS", str(ga)
    mp = check_mixed_precision(as_target(make(lora=True)), train_step=TS.through(TS.bf16_step), full=False)
    assert mp.verdict == "PASS", str(mp)


def test_its_state_dict_merge_passes_and_a_wrong_one_fails(monkeypatch):
    # torchtune merges a LoRA checkpoint (get_merged_lora_ckpt) and has no unmerge: the merge claims run on its own
    # function, the unmerge claims are said not checked.
    result = check_lora_merge(as_target(make(lora=True)))
    assert result.verdict == "PASS", str(result)
    assert any("unmerge claims not checked: torchtune merges a LoRA checkpoint" in d for d in result.details)
    import torchtune.modules.peft as peft
    right = peft.get_merged_lora_ckpt
    monkeypatch.setattr(peft, "get_merged_lora_ckpt", lambda sd, rank, alpha: right(sd, rank=rank, alpha=rank))
    assert not check_lora_merge(as_target(make(lora=True))).ok  # merged without its alpha / rank


def test_its_recipe_loop_counts_targets_before_the_shift_and_fails_accumulation():
    # lora_finetune_single_device: each micro-batch's mean times its target count taken on the unshifted labels. A
    # sequence whose first label is not ignored adds a target the loss never predicts: micro-batches are weighted
    # otherwise than by their targets (exact only where every first label is ignored).
    result = check_grad_accumulation(as_target(make()), train_step=TS.torchtune_recipe_step, lora=(False,))
    assert not result.ok
    assert any("not a multiple of the large batch's" in d for d in result.details if " grads: " in d), result.details[:3]


# ---- property 7: torchtune's PackedDataset + padded_collate_packed, its block-causal mask and input_pos --------------

def test_its_packer_labels_each_documents_first_token_and_fails_claim_0():
    # PackedDataset concatenates the samples' labels as they come and the recipes shift them by one
    # (full_finetune_single_device._loss_step): the last token of a document is trained to predict the next
    # document's first token wherever that label is not -100. Its chat tokenizers mask BOS, so their samples escape
    # this; a sample learned from its first token (text completion: labels = tokens) does not.
    # Documents 1, 3 and 5 are learned from their first token; 5 starts a row, where the label is never predicted.
    result = check_packing(as_target(make()))
    docs = documents(SIZES["vocab_size"], 0)
    failures = [d for d in result.details if not d.startswith("note: ")]
    assert result.verdict == "FAIL", str(result)
    assert failures == [f"document {d}: labels differ from its own — its first token is labelled "
                        f"({int(docs[d]['labels'][0])}): predicted from the document before it" for d in (1, 3)], \
        str(result)


def test_its_block_causal_mask_and_input_pos_pass_once_the_first_labels_are_ignored():
    target = as_target(make())
    result = check_packing(target, packer=frameworks.first_labels_ignored(target))
    assert result.verdict == "PASS", str(result)
    assert "3 rows of at most 24 (asked: 24) over 2 micro-batches float32, 3 shared rows" in result.case
    assert any("training loop on packed micro-batches not checked: torchtune's training loop is a recipe" in d
               for d in result.details), str(result)


def test_a_causal_mask_or_positions_by_column_fail():
    target = as_target(make())
    fixed = frameworks.first_labels_ignored(target)

    def causal(docs, row_len, n_micro):  # torchtune's packs with a plain causal mask: documents see their row
        window = fixed(docs, row_len, n_micro)
        for b in window:
            b["mask"] = torch.ones(row_len, row_len, dtype=torch.bool).tril().expand(len(b["input_ids"]), -1, -1)
        return window

    def by_column(docs, row_len, n_micro):  # input_pos counted by column and no document ids: no boundaries at all
        window = fixed(docs, row_len, n_micro)
        for b in window:
            b["positions"] = torch.arange(row_len).expand_as(b["input_ids"])
            del b["document_ids"]
        return window

    leak = check_packing(target, packer=causal)
    assert not leak.ok
    assert any(d.startswith("document 1 logits (micro-batch 0, row 0): TOO FAR") for d in leak.details), str(leak)
    assert any(d.startswith("isolation: document 1's logits with document 0's tokens changed") for d in leak.details)
    flat = check_packing(target, packer=by_column)
    assert not flat.ok and any("not one of the documents" in d for d in flat.details), str(flat)
