"""The bug zoo: every mutant is caught by its property's check, and the correct code passes the same check."""
from __future__ import annotations

import functools

import pytest

from llama_ref.default import DEFAULT_SEED, default_model
import llama_ref.model as M
from verify.mutants import MUTANTS, inject, mutants_for
from verify.properties import PROPERTIES, Inputs, default_names, get, worst_of

@pytest.mark.parametrize("prop", ["kv_cache", "lora_merge", "gradient_checkpointing", "grad_accum",
                                  "mixed_precision", "loss_kernel", "packing", "tied_embeddings"])
def test_the_zoo_holds_at_least_six_bugs_per_property(prop):
    assert len(mutants_for(prop)) >= 6


def test_every_mutant_targets_a_registered_check():
    assert {m.prop for m in MUTANTS.values()} <= set(default_names())
    # Its own check takes every part it replaces (else the kill matrix would silently run the correct code there),
    # and a trainer goes to every check that drives one.
    assert all(set(m.components) <= PROPERTIES[m.prop].parts for m in MUTANTS.values())
    assert {p.name for p in PROPERTIES.values() if "trainer_cls" in p.parts} == {"grad_accum", "mixed_precision",
                                                                               "packing", "distributed"}


# What the failure of each mutant must say: the claim that catches it (for the properties whose checks make several
# claims). Each mutant runs once here, as llama-verify's kill matrix runs it (fail_fast: the first failing claim).
REASONS = {
    "mixed_precision": {
        "mp_trainable_params_half": "trainable parameters not fp32",
        "mp_clip_before_unscale": "grad_norm vs float64",
        "mp_optimizer_step_bypasses_scaler": "changed parameters",
        "mp_scaler_skips_inf_only": "changed parameters",  # clipping first turns the inf step's row into NaN
        "mp_scaler_step_per_micro_batch": "clipped update vs float64",
        "mp_autocast_wrong_device": "Linear matmuls not in bfloat16",
        "mp_rmsnorm_no_upcast": "norm reductions (mean of squares) not upcast to fp32",
        "mp_softmax_in_half": "_softmax(bfloat16)",
        "mp_loss_on_half_logits": "token_loss_sum on bfloat16 logits",
        "mp_frozen_base_kept_fp32": "frozen base not stored in bfloat16",
        "mp_schedule_advances_on_skipped_step": "the LR schedule does not count optimizer steps actually taken",
        "mp_rope_angles_in_half": "RoPE angles formed in bf16?",
    },
    "tied_embeddings": {
        "tied_head_adapter_merged_into_embedding": "the embedding unchanged by an untied adapter",
        "tied_config_left_tied_after_untying_merge": "configured tied, but the embedding and the head are two",
        "tied_head_dropped_at_save": "logits after lora:output + merge + save_load",
        "tied_fresh_storage_after_to_empty": "two parameters over one storage",
        "tied_gradient_from_one_use": "the model: the tied weight's gradient",
        "tied_counted_twice": "(the tied matrix counted twice)",
        "tied_kept_adapter_trained_by_one_use": "after lora:output:kept: the gradient of output.lora_A",
    },
}
REASON = {name: text for table in REASONS.values() for name, text in table.items()}


@pytest.mark.parametrize("prop", sorted(REASONS))
def test_every_mutant_of_a_property_with_reasons_has_one(prop):
    assert {m.name for m in mutants_for(prop)} == set(REASONS[prop])


@functools.lru_cache(maxsize=None)
def _correct_code_passes(prop: str, overrides: tuple) -> bool:
    return worst_of(get(prop)(default_model(DEFAULT_SEED, **dict(overrides)), Inputs(seed=1))).ok


# The mutants' own bug, not a problem of the test:
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught_by_its_propertys_check(name):
    m = MUTANTS[name]
    check = get(m.prop)
    model = default_model(DEFAULT_SEED, **m.model_overrides)
    assert _correct_code_passes(m.prop, tuple(sorted(m.model_overrides.items()))), \
        "the correct code must pass the very check the mutant fails"
    with inject(name):  # fail_fast: the verdict, without running the cases after the first failing one
        result = worst_of(check(model, Inputs(seed=1, fail_fast=True), **m.components))
    assert not result.ok, f"mutant {name} ({m.description}) was not caught: {result}"
    if name in REASON:
        assert any(REASON[name] in line for line in result.details), str(result)


def test_inject_restores_the_correct_code_even_on_error():
    before = M.causal_mask
    with pytest.raises(RuntimeError, match="boom"):
        with inject("mask_top_left"):
            assert M.causal_mask is not before
            raise RuntimeError("boom")
    assert M.causal_mask is before


def test_unknown_mutant_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown mutant 'nope'"):
        with inject("nope"):
            pass


def test_cli_checks_pass_and_every_mutant_is_caught(tmp_path, capsys):
    import json

    from verify.__main__ import main

    out = tmp_path / "results.json"
    # One check keeps the kill matrix (its mutants x the checks asked) short; each mutant against its own property's
    # check is the test above; a mutant's parts reaching only the checks that take them, test_properties.py's.
    code = main(["--dtype", "float32", "--attn-impl", "math", "--mutants", "--check", "kv_cache", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    payload = json.loads(out.read_text())
    expected = {n for n, m in MUTANTS.items() if m.prop == "kv_cache"}
    assert payload["mutants_missed"] == [] and set(payload["mutants"]) == expected
    assert all(r["ok"] for r in payload["results"]) and "torch" in payload["environment"]
    assert "MISSED" not in text and {r["name"] for r in payload["results"]} == {"kv_cache"}
    kinds = {f["kind"] for row in payload["mutants"].values() for r in row.values() for f in r["findings"]}
    assert "failure" in kinds  # the typed findings travel in the JSON


def test_cli_exits_1_when_a_check_fails(capsys):
    from verify.__main__ import main

    with inject("rope_not_offset"):
        code = main(["--dtype", "float32", "--attn-impl", "math", "--check", "kv_cache"])
    assert code == 1 and "FAIL" in capsys.readouterr().out



def test_cli_bad_checkpoint_is_a_message_not_a_traceback(tmp_path, capsys):
    from verify.__main__ import main

    assert main(["--ckpt-dir", str(tmp_path), "--tokenizer", str(tmp_path / "tokenizer.model")]) == 2
    assert "llama-verify: error: tokenizer model" in capsys.readouterr().err
