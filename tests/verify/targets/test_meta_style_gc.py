"""The checkpointing check on code that is not ours: the seed report's gradient checkpointing on a Meta-style model
(tests/verify/targets/seed_style.py), its blocks found around the cached attention, the recomputations counted from
outside; the checkpointing zoo's block runners injected into it, every mutant caught."""
from __future__ import annotations

import pytest
from torch.utils.checkpoint import checkpoint

from verify.checks.gradient_checkpointing import check_gradient_checkpointing
from verify.mutants import mutants_for
from verify.targets.meta_style import MetaStyleTarget

from . import seed_style

RUNNER_MUTANTS = [m for m in mutants_for("gradient_checkpointing") if "block_runner" in m.components]


def _switch(model, blocks):
    model.checkpoint_blocks = blocks


def _non_reentrant(layer, h, start_pos, table, mask, checkpointed):
    return checkpoint(layer, h, start_pos, table, mask, use_reentrant=False) if checkpointed else layer(h, start_pos,
                                                                                                       table, mask)


def _target(runner=None, lora=True, checkpoints_in_eval=None) -> MetaStyleTarget:
    model = seed_style.trainable(seed_style.make_lora() if lora else seed_style.make_fixed())
    if runner is not None:
        model.block_runner = runner
    return MetaStyleTarget(model, gc_switch=_switch, checkpoints_in_eval=checkpoints_in_eval)


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint. the use_reentrant parameter")
def test_the_seeds_own_switch_passes_on_its_one_policy_and_says_which_it_could_not_ask():
    # The seed's reentrant checkpoint under LoRA keeps its gradients only because i % 3 != 0 never checkpoints
    # block 0, whose adapters make the next block's input require grad.
    result = check_gradient_checkpointing(seed_style.trainable(seed_style.make_lora()))
    assert result.ok and "policies=seed;" in result.case, str(result)
    assert "note: policies ['all', 'every:2'] not checked: the target's switch offers ['seed']" in result.details


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint. the use_reentrant parameter")
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "blocks-only"])
def test_the_seeds_reentrant_checkpoint_loses_gradients_where_block_0_is_checkpointed(lora):
    # With any policy (a gc_switch), "every:2" checkpoints block 0, whose input (a frozen embedding's output)
    # requires no grad: the reentrant checkpoint returns an output without a graph. Without LoRA layers the check
    # trains the blocks with everything outside them frozen, which loses them the same way.
    result = check_gradient_checkpointing(_target(lora=lora))
    assert not result.ok
    assert any("policy=every:2: checkpoint silently not applied" in d for d in result.details), str(result)
    assert any("policy=every:2 gradient of layers.0." in d and "gradient is None in actual" in d
               for d in result.details), str(result)


def test_a_non_reentrant_runner_passes_every_policy():
    result = check_gradient_checkpointing(_target(_non_reentrant))
    assert result.ok and "policies=all,seed,every:2" in result.case, str(result)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mutant", RUNNER_MUTANTS, ids=[m.name for m in RUNNER_MUTANTS])
def test_every_runner_mutant_is_caught_on_the_meta_style_model(mutant):
    # declared mode-independent, as llama_ref's: recomputing in train mode only is then a bug (gc_only_in_training)
    result = check_gradient_checkpointing(_target(mutant.components["block_runner"], checkpoints_in_eval=True))
    assert not result.ok, f"{mutant.name} not caught on the Meta-style model: {result}"


def test_undeclared_train_mode_only_checkpointing_is_a_note_on_the_meta_style_model():
    from verify.mutants import MUTANTS
    result = check_gradient_checkpointing(_target(MUTANTS["gc_only_in_training"].components["block_runner"]))
    assert result.ok and any("the target checkpoints in train mode only" in d for d in result.details), str(result)


def test_without_a_switch_or_a_gradient_it_is_not_applicable_and_says_why():
    model = seed_style.trainable(seed_style.make_lora())
    model.params.use_gradient_checkpoint = None  # not a bool: not taken for a switch
    result = check_gradient_checkpointing(model)
    assert result.verdict == "N/A" and "no gradient-checkpointing switch" in result.not_applicable
    result = check_gradient_checkpointing(seed_style.make_lora())  # Meta's inference_mode forward
    assert result.verdict == "N/A" and "torch.inference_mode()" in result.not_applicable


def test_the_blocks_are_the_modules_around_the_cached_attention():
    target = _target()
    assert target.blocks(target.model) == list(target.model.layers)
