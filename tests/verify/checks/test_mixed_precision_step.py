"""The step-based mixed-precision check (verify.checks.mixed_precision_step) on llama_ref's own Trainer, as
llama-verify runs it on a real-size model: the correct trainer passes in bf16 and fp16; the MP zoo's mutants that
its claims reach are caught (the others — a schedule on skipped steps, upcasts on a half base, RoPE at long
positions, the half frozen base — are llama_ref's full check's, verify.checks.mixed_precision)."""
from __future__ import annotations

import pytest

from llama_ref.default import default_model
from verify.checks.mixed_precision_step import check_mixed_precision_step
from verify.mutants import MUTANTS, inject
from verify.targets.llama_ref import LlamaRefTarget

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_llama_refs_trainer_as_a_step_passes(precision):
    target = LlamaRefTarget(default_model(0))
    result = check_mixed_precision_step(target, target.mp_step(precision), label="llama_ref's Trainer")
    assert result.ok, str(result)
    assert result.case.startswith(f"llama_ref's Trainer, {'bfloat16' if precision == 'bf16' else 'float16'} autocast")


@pytest.mark.parametrize("name, precision, message", [
    ("mp_trainable_params_half", "bf16", "master weights / their gradients not fp32"),
    ("mp_autocast_wrong_device", "bf16", "not mixed: its Linear matmuls ran in float32"),
    ("mp_softmax_in_half", "bf16", "softmax / loss reductions not upcast to fp32"),
    ("mp_optimizer_step_bypasses_scaler", "fp16", "a step with inf gradients changed"),
    ("mp_scaler_step_per_micro_batch", "fp16", "optimizer.step ran 2 times in one window"),
    ("mp_clip_before_unscale", "fp16", "clipping applied while they were still scaled"),  # 1.5e-4x
])
def test_the_mutants_its_claims_reach_are_caught(name, precision, message):
    mutant = MUTANTS[name]
    with inject(name):
        target = LlamaRefTarget(default_model(0, **mutant.model_overrides),
                                trainer_cls=mutant.components.get("trainer_cls"))
        result = check_mixed_precision_step(target, target.mp_step(precision))
    assert not result.ok and any(message in d for d in result.details), str(result)
