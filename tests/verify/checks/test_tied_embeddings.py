"""Property 9 (verify.checks.tied_embeddings): llama_ref's tied default passes through every transform in fp32 and
bf16, examining what its case says; an untied model is not applicable; the zoo (tests/verify/mutants/test_mutants.py
runs each) fails it; a target without a transform has it said, not failed."""
from __future__ import annotations

import pytest
import torch

from llama_ref.default import default_model
from verify.checks.tied_embeddings import LORA, check_tied_embeddings
from verify.compare import Probe, probing
from verify.targets.llama_ref import LlamaRefTarget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama_refs_tied_model_passes_every_transform(dtype):
    with probing(Probe(".*")) as (seen,):
        result = check_tied_embeddings(default_model(tie_embeddings=True).to(dtype))
    assert result.verdict == "PASS", str(result)
    assert result.case.endswith("transforms: save_load, materialize, resize, " +
                                ", ".join(f"{n}+merge" for n in LORA))
    names = [h.name for h in seen.hits]
    # the gradient on the model and after save_load, materialize, resize; the other use before and after each of the
    # four adapters' merges; the logits after resize and each merge (toleranced), after save_load, materialize and
    # each merge's save_load (bit-exact)
    assert names.count("tied gradient") == 4
    assert names.count("tied adapter gradient") == 4  # lora_A and lora_B of each kept-tied adapter
    assert names.count("tied other use") + names.count("tied follower") == 8
    assert names.count("tied logits") == 1 + len(LORA) and names.count("tied logits exact") == 2 + len(LORA)


def test_an_untied_model_is_not_applicable_saying_how_to_tie():
    result = check_tied_embeddings(default_model())
    assert result.verdict == "N/A" and "configured untied" in result.not_applicable


def test_a_transform_the_target_lacks_is_said_not_failed():
    class NoResize(LlamaRefTarget):
        def transform(self, model, name):
            if name == "resize":
                raise NotImplementedError("no vocabulary resize here")
            return super().transform(model, name)
    result = check_tied_embeddings(NoResize(default_model(tie_embeddings=True)))
    assert result.verdict == "PASS" and "resize," not in result.case
    assert "note: resize not checked: no vocabulary resize here" in result.details


def test_two_parameters_over_one_storage_are_not_a_tie():
    # what load_state_dict(assign=True) leaves without tie_weights: one storage, two leaves trained apart
    model = default_model(tie_embeddings=True)
    model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach())
    result = check_tied_embeddings(model, transforms=())
    assert not result.ok and result.case.endswith("transforms: none")
    assert any("configured tied, but the embedding and the head are two parameters" in d for d in result.details)
    assert any(d.startswith("the model: the tied weight's gradient") for d in result.details), str(result)


def test_an_adapter_that_changes_nothing_fails_and_unknown_transforms_are_named():
    class Ignored(LlamaRefTarget):  # an adapter whose module ignores it: its B left at zero
        def transform(self, model, name):
            out = super().transform(model, name)
            if name.startswith("lora:"):
                with torch.no_grad():
                    for n, p in out.named_parameters():
                        if "lora_B" in n:
                            p.zero_()
            return out
    result = check_tied_embeddings(Ignored(default_model(tie_embeddings=True)), transforms=("lora:output",))
    assert not result.ok and any("its adapter is ignored" in d for d in result.details), str(result)
    with pytest.raises(ValueError, match=r"unknown transform\(s\) \['lora:ouput'\]"):
        check_tied_embeddings(default_model(tie_embeddings=True), transforms=("lora:ouput",))
