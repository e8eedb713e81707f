"""The input_pos family through verify.targets.input_pos: small models in the shapes of gpt-fast's, litgpt's and
torchtune's (tests/verify/targets/input_pos_style.py, written anew) are recognised by what they are and checked for
all five properties — the training ones with the user's step, checkpointing through torch's CheckpointWrapper — and
the same bugs written into them are caught."""
from __future__ import annotations

import pytest
import torch

from verify.checks.grad_accum import check_grad_accumulation
from verify.checks.gradient_checkpointing import check_gradient_checkpointing
from verify.checks.kv_cache import check_kv_cache
from verify.checks.lora_merge import check_lora_merge
from verify.checks.mixed_precision import check_mixed_precision
from verify.targets.input_pos import InputPosTarget
from verify.targets.spec import as_target

from . import input_pos_style as S
from . import train_steps as TS

STYLES = {"gpt-fast": S.FastStyle, "litgpt": S.LitStyle, "torchtune": S.TuneStyle}
QUICK_GA = dict(splits=[[1, 2, 3]], stream_ga=3, steps=2, optimizer="sgd")


@pytest.mark.parametrize("style", STYLES)
def test_each_style_is_recognised_and_its_cache_and_lora_merge_pass(style):
    target = as_target(S.make(STYLES[style], lora=True))
    assert isinstance(target, InputPosTarget) and target.style == style
    assert target.limits.max_seq_len == 64 and target.limits.vocab_size == 256
    kv = check_kv_cache(as_target(S.make(STYLES[style])))
    assert kv.verdict == "PASS" and "L=24" in kv.case, str(kv)
    merge = check_lora_merge(target)
    assert merge.verdict == "PASS" and "eval-merge 4/4" in merge.case, str(merge)


@pytest.mark.parametrize("style", ["litgpt", "torchtune"])  # gpt-fast's model does not train (below)
def test_accumulation_and_mixed_precision_pass_with_the_users_step(style):
    ga = check_grad_accumulation(as_target(S.make(STYLES[style])), train_step=TS.token_mean_step, **QUICK_GA)
    assert ga.verdict == "PASS", str(ga)
    mp = check_mixed_precision(as_target(S.make(STYLES[style], lora=True)), train_step=TS.bf16_step, full=False)
    assert mp.verdict == "PASS" and "bfloat16 autocast" in mp.case, str(mp)


def test_checkpointing_through_torchs_checkpoint_wrapper_passes_every_policy():
    result = check_gradient_checkpointing(as_target(S.make(S.TuneStyle, lora=True)))
    assert result.verdict == "PASS" and "policies=all,seed,every:2" in result.case, str(result)


def test_a_reentrant_switch_loses_the_lora_gradients_and_fails():
    from torch.utils.checkpoint import checkpoint

    def reentrant(model, blocks):
        for i, block in enumerate(model.layers):
            forward = type(block).forward.__get__(block)
            block.forward = (lambda *a, f=forward: checkpoint(f, *a, use_reentrant=True)) if i in blocks else forward
    target = InputPosTarget(S.make(S.LitStyle, lora=True), gc_switch=reentrant)
    result = check_gradient_checkpointing(target, full_finetune=False)  # torch's warning: recorded in the result
    assert not result.ok and any("gradient is None" in d for d in result.details), str(result)


class _WritesAtZero(S.FullBatchCache):
    def update(self, input_pos, k, v):  # input_pos ignored: every chunk lands at position 0
        return super().update(torch.arange(k.shape[2], device=k.device), k, v)


class _FastAtZero(S.FastStyle):
    def setup_caches(self, max_batch_size, max_seq_length):
        super().setup_caches(max_batch_size, max_seq_length)
        for layer in self.layers:
            c = layer.attention.kv_cache
            layer.attention.kv_cache = _WritesAtZero(*c.k_cache.shape[:3], c.k_cache.shape[3], c.k_cache.dtype)


class _TuneNoReset(S.TuneStyle):
    def reset_caches(self):  # the cache keeps its position: a new sequence is appended to the last
        pass


@pytest.mark.parametrize("cls", [_FastAtZero, _TuneNoReset], ids=["cache-ignores-input_pos", "reset-does-nothing"])
def test_cache_bugs_written_into_these_shapes_are_caught(cls):
    result = check_kv_cache(as_target(S.make(cls)))
    assert result.verdict == "FAIL", str(result)


def test_an_uncached_path_that_writes_the_cache_is_refused_not_compared():
    target = as_target(S.make(S.LitStyle))
    with target.kv_session():
        target._live.forward = lambda idx, input_pos=None, **kw: S.LitStyle.forward(
            target._live, idx, torch.arange(idx.shape[1]) if input_pos is None else input_pos, **kw)
        with pytest.raises(RuntimeError, match="a KV-cache buffer was written or replaced during the forward without caches"):
            target.logits(torch.zeros((1, 4), dtype=torch.long), 0, kv_caching=False)


def test_gpt_fast_style_trains_nothing_and_says_so():
    # its forward runs only with caches set up: the gradient properties are not applicable, with why
    for check in (check_gradient_checkpointing, check_grad_accumulation, check_mixed_precision):
        result = check(as_target(S.make(S.FastStyle, lora=True)))
        assert result.verdict == "N/A" and "an inference model" in result.not_applicable, str(result)


def test_fixed_batch_caches_say_what_is_not_examined_and_the_callers_own_caches_do_not_matter():
    model = S.make(S.TuneStyle)
    model.setup_caches(1, torch.float32, decoder_max_seq_len=128)  # the caller's own, of another batch and length
    result = check_kv_cache(model)
    assert result.verdict == "PASS", str(result)
    assert any("torchtune's cache has a fixed batch size" in d for d in result.details), result.details
    assert model.layers[0].attention.kv_cache.k_cache.shape[0] == 1  # the caller's caches, untouched
    fast = S.make(S.FastStyle)
    fast.setup_caches(2, 128)
    assert check_kv_cache(fast).verdict == "PASS"


def test_the_callers_model_is_left_without_caches_and_in_its_mode():
    model = S.make(S.LitStyle).train()
    assert check_kv_cache(model).ok
    assert model.training and all(layer.attention.kv_cache is None for layer in model.layers)


def test_without_lora_layers_the_merge_is_not_applicable_and_says_why():
    result = check_lora_merge(as_target(S.make(S.FastStyle)))
    assert result.verdict == "N/A" and "no LoRA layers of loralib's shape" in result.not_applicable


class _StateDictMerged(InputPosTarget):
    """torchtune's shape of adapter, merged by a state-dict function (torchtune's own where it is installed: the
    tox env's tests; here one written anew)."""

    merge_fn = staticmethod(S.merged_lora_state)

    def _state_dict_merge(self):
        return self.merge_fn


def _unscaled(state_dict, rank, alpha):  # the merge without alpha / rank
    return S.merged_lora_state(state_dict, rank, rank)


def test_a_state_dict_merge_is_checked_and_its_missing_unmerge_said():
    result = check_lora_merge(_StateDictMerged(S.with_tune_lora(S.make(S.TuneStyle))))
    assert result.verdict == "PASS" and "targets=wq,wv r=4 alpha=8" in result.case, str(result)
    assert any("unmerge claims not checked" in d for d in result.details), result.details
    wrong = _StateDictMerged(S.with_tune_lora(S.make(S.TuneStyle)))
    wrong.merge_fn = staticmethod(_unscaled)
    result = check_lora_merge(wrong)
    assert not result.ok and any("merged weight vs W + (alpha/r)·B·A" in d for d in result.details), str(result)


def test_a_fused_qkv_adapter_that_cannot_unmerge_is_checked_against_its_own_forward():
    # litgpt's shape: one adapter for the query and value parts of a fused projection, merge() and no unmerge. The
    # merged weight must add what the unmerged forward adds; a merge without alpha/r, or with the value part's update
    # at the rows before it, fails on the weights and on the logits.
    result = check_lora_merge(as_target(S.with_fused_lora(S.make(S.LitStyle))))
    assert result.verdict == "PASS" and "fused 2/2" in result.case, str(result)
    assert any("unmerge claims not checked" in d for d in result.details), result.details
    for bug in ("no scaling", "rows"):
        result = check_lora_merge(as_target(S.with_fused_lora(S.make(S.LitStyle), bug=bug)))
        assert not result.ok and "merged logits vs the float64 unmerged reference" in str(result), (bug, str(result))
        assert any("qkv merged weight vs W + the unmerged layer's update" in d for d in result.details), result.details


@pytest.mark.parametrize("style", [S.LitStyle, S.FastStyle], ids=["litgpt", "gpt-fast"])
def test_litgpt_and_gpt_fast_styles_have_no_packed_path(style):
    from verify.checks.packing import check_packing
    result = check_packing(as_target(S.make(style)))
    assert result.verdict == "N/A" and "no padding-free path" in result.not_applicable, str(result)
