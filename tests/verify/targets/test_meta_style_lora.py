"""The LoRA-merge check on code that is not ours: the seed report's LoRA on a Meta-style model
(tests/verify/targets/seed_style.py), found by loralib's shape; the merge zoo injected into it, every mutant caught."""
from __future__ import annotations

import pytest
import torch

from verify.checks.lora_merge import check_lora_merge
from verify.mutants import mutants_for
from verify.targets.lora import loralib_layers

from . import seed_style

LAYER_MUTANTS = [m for m in mutants_for("lora_merge") if "lora_layer_cls" in m.components]


def test_the_seeds_lora_passes_and_the_gradient_claims_say_why_they_did_not_run():
    model = seed_style.make_lora()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = check_lora_merge(model)
    assert result.ok and result.verdict == "PASS", str(result)
    assert result.case.startswith("targets=wq,wv r=16 alpha=32 dropout=0.05 float32")
    assert any(d.startswith("note: gradient claims not applicable: the forward runs under torch.inference_mode()")
               for d in result.details)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # checked on a copy


def test_with_autograd_the_gradient_claims_run_and_pass():
    result = check_lora_merge(seed_style.trainable(seed_style.make_lora()))
    assert result.ok and not any(d.startswith("note:") for d in result.details), str(result)


class _DetachedB(seed_style.LoRALinear):
    """``B`` detached in the forward: the adapter trains nothing (merge and outputs still agree)."""

    def forward(self, x):
        if self.merged:
            return super().forward(x)
        return torch.nn.functional.linear(x, self.weight) + (
            self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.detach().T) * self.scaling


def test_an_adapter_that_gets_no_gradient_is_caught_when_the_forward_allows_one():
    result = check_lora_merge(seed_style.trainable(seed_style.make_lora(_DetachedB)))
    assert not result.ok and any("LoRA parameters with no gradient: layers.0.attention.wq.lora_B" in d
                                 for d in result.details), str(result)


@pytest.mark.parametrize("mutant", LAYER_MUTANTS, ids=[m.name for m in LAYER_MUTANTS])
def test_every_merge_mutant_is_caught_on_the_meta_style_model(mutant):
    # The zoo's layers (loralib-shaped LoRALinear subclasses) put into the seed's model by its own apply_lora.
    result = check_lora_merge(seed_style.make_lora(mutant.components["lora_layer_cls"]))
    assert not result.ok, f"{mutant.name} not caught on the Meta-style model: {result}"


def test_a_base_left_trainable_is_caught_without_a_gradient():
    # lora_base_trainable's bug in the user's code: apply_lora forgetting to freeze. Seen on requires_grad, so
    # also under inference_mode.
    result = check_lora_merge(seed_style.make_lora(freeze=False))
    assert not result.ok and any(d.startswith("base parameters trainable: ") for d in result.details), str(result)


def test_a_model_without_lora_layers_is_not_applicable_and_says_why():
    result = check_lora_merge(seed_style.make_fixed())
    assert result.verdict == "N/A" and "no LoRA layers of loralib's shape" in result.not_applicable


def test_the_seeds_layers_are_found_by_their_shape():
    assert list(loralib_layers(seed_style.make_lora())) == [
        f"layers.{i}.attention.{t}" for i in range(2) for t in ("wq", "wv")]


def test_cli_checks_the_seeds_lora_through_a_factory(capsys):
    from verify.__main__ import main

    assert main(["--target", f"{seed_style.__file__}:make_lora", "--check", "lora_merge"]) == 0
    out = capsys.readouterr().out
    assert "1/1 checks passed, 0 failed, 0 not applicable" in out and "targets=wq,wv r=16 alpha=32" in out
