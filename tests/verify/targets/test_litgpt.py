"""Property checks on litgpt's own GPT (0.5.x) with a Llama configuration — its KV cache, its LoRA (the fused QKV
adapter), torch's checkpoint wrapper as Lightning applies it, a token-mean step in its calling convention — through
the input_pos adapter. litgpt is not in the test extra (it pins huggingface-hub below what transformers 5 needs):
`tox -e litgpt` installs it and runs these; elsewhere they skip, saying so."""
from __future__ import annotations

import pytest

pytest.importorskip("litgpt", reason="litgpt is not installed here: tox -e litgpt runs these")

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper  # noqa: E402

from verify.checks.grad_accum import check_grad_accumulation  # noqa: E402
from verify.checks.gradient_checkpointing import check_gradient_checkpointing  # noqa: E402
from verify.checks.kv_cache import check_kv_cache  # noqa: E402
from verify.checks.lora_merge import check_lora_merge  # noqa: E402
from verify.checks.mixed_precision import check_mixed_precision  # noqa: E402
from verify.targets.base import unwrapped  # noqa: E402
from verify.targets.input_pos import InputPosTarget  # noqa: E402
from verify.targets.spec import as_target  # noqa: E402

from . import frameworks, train_steps as TS  # noqa: E402

make = frameworks.litgpt_model


def _wrapping(impl):
    def switch(model, blocks):
        layers = model.transformer.h
        for i, block in enumerate(layers):
            block = unwrapped(block)
            layers[i] = checkpoint_wrapper(block, checkpoint_impl=impl) if i in blocks else block
    return switch


def test_the_model_is_recognised_and_its_kv_cache_passes():
    target = as_target(make())
    assert isinstance(target, InputPosTarget) and target.style == "litgpt"
    result = check_kv_cache(target)
    assert result.verdict == "PASS", str(result)


def test_its_checkpoint_wrapper_passes_and_a_reentrant_one_under_lora_fails():
    assert check_gradient_checkpointing(as_target(make(lora=True))).verdict == "PASS"
    reentrant = InputPosTarget(make(lora=True), gc_switch=_wrapping(CheckpointImpl.REENTRANT))
    result = check_gradient_checkpointing(reentrant, full_finetune=False)
    assert not result.ok and any("gradient is None" in d for d in result.details), str(result)


def test_accumulation_and_mixed_precision_pass_with_a_token_mean_step():
    ga = check_grad_accumulation(as_target(make()), train_step=TS.through(TS.token_mean_step), lora=(False,))
    assert ga.verdict == "PASS", str(ga)
    mp = check_mixed_precision(as_target(make(lora=True)), train_step=TS.through(TS.bf16_step), full=False)
    assert mp.verdict == "PASS", str(mp)


def test_its_lora_merge_passes_against_its_own_unmerged_forward_and_an_unscaled_merge_fails(monkeypatch):
    # merge() in place, no unmerge: the unmerge claims are said not checked. The fused QKV adapter's merged weight is
    # compared with the update its unmerged forward adds; the output projection's with (alpha/r)·B·A.
    result = check_lora_merge(as_target(make(lora=True)))
    assert result.verdict == "PASS" and "targets=qkv,proj" in result.case and "fused 2/4" in result.case, str(result)
    assert any("unmerge claims not checked" in d for d in result.details), result.details
    import litgpt.lora
    original = litgpt.lora.LoRAQKVLinear.get_lora_AB  # what merge() adds: here without alpha/r
    monkeypatch.setattr(litgpt.lora.LoRAQKVLinear, "get_lora_AB", lambda self: original(self) / self.scaling)
    result = check_lora_merge(as_target(make(lora=True)))
    assert not result.ok and any("attn.qkv merged weight vs W + the unmerged layer's update" in d
                                 for d in result.details), str(result)


def test_its_fit_loop_averages_micro_batch_means_and_fails_accumulation():
    # finetune/lora.py fit: each micro-batch's mean loss / K: a mean of means (its loop clips nothing: clip=None).
    result = check_grad_accumulation(as_target(make()), train_step=TS.litgpt_fit_step, lora=(False,), clip=None)
    assert not result.ok
    assert any("a mean of per-micro-batch means" in d for d in result.details if " grads: " in d), result.details[:3]
