"""Property checks on torchtune's own Llama 3 (0.6.1) — its builders, its LoRA, its activation checkpointing, a
token-mean step in its calling convention — through the input_pos adapter. torchtune is not in the test extra (its
pins conflict): `tox -e torchtune` installs it and runs these; elsewhere they skip, saying so."""
from __future__ import annotations

import pytest

pytest.importorskip("torchtune", reason="torchtune is not installed here: tox -e torchtune runs these")

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper  # noqa: E402
from torchtune.training import set_activation_checkpointing  # noqa: E402

from verify.checks.grad_accum import check_grad_accumulation  # noqa: E402
from verify.checks.gradient_checkpointing import check_gradient_checkpointing  # noqa: E402
from verify.checks.kv_cache import check_kv_cache  # noqa: E402
from verify.checks.lora_merge import check_lora_merge  # noqa: E402
from verify.checks.mixed_precision import check_mixed_precision  # noqa: E402
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
