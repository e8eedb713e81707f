"""The GA check with the user's training step (verify.targets.base.TrainStep): the seed report's loop, written anew
in tests/verify/targets/train_steps.py, fails it and the check says why; a token-mean step passes, on a Meta-style
model (full fine-tune and the seed's LoRA) and on llama_ref alike."""
from __future__ import annotations

import pytest

from llama_ref.default import default_model
from verify.checks.grad_accum import check_grad_accumulation

from . import seed_style, train_steps

QUICK = dict(splits=[[2, 4], [1, 1, 1, 1, 1, 1]], stream_ga=None, steps=2)


def test_the_seeds_loop_fails_and_the_check_says_why():
    # Its window loss is a sum of per-micro-batch means divided by 8, and it logs the last micro-batch's scaled
    # loss; with one micro-batch per window the gradient is exactly 1/8 of the token mean's (no clipping here).
    result = check_grad_accumulation(seed_style.trainable(seed_style.make_fixed()), train_step=train_steps.seed_step,
                                     clip=None, splits=[[6], [2, 4]], stream_ga=None, steps=1, lora=(False,))
    assert not result.ok and result.error is None, str(result)
    text = "\n".join(result.details)
    assert "split [6] step 1: the logged loss" in text and "0.125x it): the logged loss is not the window's token mean" in text
    assert "split [6] step 1 grads: TOO FAR" in text and "they are 0.125x the large batch's: the window's loss is scaled" in text
    assert ("split [2, 4] step 1 grads: TOO FAR" in text
            and "not a multiple of the large batch's: the window's loss is not its token mean" in text)


@pytest.mark.parametrize("make", [seed_style.make_fixed, seed_style.make_lora], ids=["full", "seed-lora"])
def test_a_token_mean_step_passes_on_the_meta_style_model(make):
    result = check_grad_accumulation(seed_style.trainable(make()), train_step=train_steps.token_mean_step, **QUICK)
    assert result.ok, str(result)
    assert ("note: the LoRA variant not checked: the model has no LoRA layers" in result.details) == (
        make is seed_style.make_fixed)


def test_the_users_step_runs_on_llama_ref_too():
    model = default_model(0)
    assert check_grad_accumulation(model, train_step=train_steps.token_mean_step, **QUICK).ok
    assert not check_grad_accumulation(model, train_step=train_steps.seed_step, **QUICK).ok


def test_a_scaled_loss_is_caught_although_clipping_binds_and_the_logged_loss_is_right():
    # Every clipped step binds ("auto": half the first norm), which rescales any multiple of the right gradients to
    # the same update, and a user's step reports no norm: only the unclipped last scenario can see the scale.
    result = check_grad_accumulation(default_model(0), train_step=train_steps.per_micro_count_step, lora=(False,),
                                     splits=[[2, 4]], stream_ga=3, steps=2)
    assert not result.ok, str(result)
    assert "unclipped" in result.case and " (bound in 0/" not in result.case
    text = "\n".join(result.details)
    assert "unclipped step" in text and "the logged loss" not in text
    clipped = [d for d in result.details if "unclipped" not in d and not d.startswith("note:")]
    assert not clipped, clipped  # the clipped scenario is blind to it: the reason the unclipped one exists


def test_with_one_scenario_all_clipped_the_check_says_what_it_could_not_see():
    result = check_grad_accumulation(default_model(0), train_step=train_steps.token_mean_step, lora=(False,),
                                     splits=[[2, 4]], stream_ga=None, steps=2)
    assert result.ok and "0 unclipped" in result.case
    assert any(d.startswith("note: every step was clipped") for d in result.details), result.details


def test_without_a_step_a_meta_style_model_is_not_applicable_and_says_how_to_give_one():
    result = check_grad_accumulation(seed_style.trainable(seed_style.make_fixed()))
    assert result.verdict == "N/A" and "--train-step PATH.py:FN" in result.not_applicable
