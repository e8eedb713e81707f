"""Property 7 (verify.checks.packing): llama_ref's packed rows pass in fp32 and bf16 on both attention paths; the
zoo (tests/verify/mutants/test_mutants.py runs each) fails it; what the check asks of a packer is what a wrong packer
gets wrong, and a target that cannot be asked for packed input is not applicable."""
from __future__ import annotations

import pytest
import torch

from verify.checks.packing import check_packing, documents, spans
from verify.mutants import MUTANTS

from ..targets import seed_style


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama_refs_packed_rows_pass(attn_impl, dtype):
    from llama_ref.default import default_model
    result = check_packing(default_model(attn_impl=attn_impl).to(dtype))
    assert result.verdict == "PASS", str(result)
    assert result.case.startswith("7 documents of 3-13 tokens in 3 rows of at most 24 (asked: 24) over 2 micro-batches")


def test_the_documents_include_some_learned_from_their_first_token():
    # Else a packer that labels each document's first token would pass: a prompt hides that label anyway.
    docs = documents(512, 0)
    assert any(int(d["labels"][0]) != -100 for d in docs) and any(int(d["labels"][0]) == -100 for d in docs)


def test_documents_are_found_by_document_ids_or_by_position_resets():
    batch = {"input_ids": torch.zeros(1, 7, dtype=torch.long),
             "positions": torch.tensor([[0, 1, 2, 0, 1, 0, 1]]),
             "document_ids": torch.tensor([[0, 0, 0, 1, 1, -1, -1]])}
    assert spans(batch) == [(0, 0, 3), (0, 3, 5)]
    assert spans({k: v for k, v in batch.items() if k != "document_ids"}) == [(0, 0, 3), (0, 3, 5), (0, 5, 7)]


def test_a_mask_leak_is_named_per_document_and_by_the_isolation_claim():
    from llama_ref.default import default_model
    with MUTANTS["pack_no_document_mask"].applied():
        result = check_packing(default_model())
    assert not result.ok
    assert any(d.startswith("isolation: document") for d in result.details), result.details


def test_a_model_that_cannot_take_packed_rows_is_not_applicable_naming_the_member():
    result = check_packing(seed_style.make())
    assert result.verdict == "N/A" and "PackingTarget" in result.not_applicable, str(result)


def test_a_packer_putting_one_document_per_row_is_said_to_leave_isolation_unexamined():
    from llama_ref.default import default_model
    from llama_ref.train.packing import collate_packed

    def one_per_row(documents, row_len, n_micro):
        return [collate_packed([[d] for d in documents])]
    result = check_packing(default_model(), packer=one_per_row)
    assert result.ok and "0 shared rows" in result.case, str(result)
    assert "note: isolation not examined: no packed row holds two documents" in result.details
