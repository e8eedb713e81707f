"""Property 7 on a user's packed forward given as a callable (verify.targets.packed_forward)."""
from __future__ import annotations

import pytest
import torch

from verify.__main__ import main
from verify.checks.packing import check_packing
from verify.targets.packed_forward import PackedForwardTarget, cu_seqlens

from . import packed_forwards as F

HERE = F.__file__


@pytest.fixture
def default_model():
    from llama_ref.default import default_model
    return default_model()


@pytest.fixture
def hf_model():
    pytest.importorskip("transformers")
    from verify.oracle_hf import default_hf_model
    return default_hf_model()


def test_cu_seqlens_are_each_rows_documents_then_its_padding():
    batch = {"input_ids": torch.zeros((2, 6), dtype=torch.long),
             "positions": torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2]]),
             "document_ids": torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, -1, -1, -1]])}
    assert cu_seqlens(batch).tolist() == [0, 2, 5, 6, 9, 12]
    del batch["document_ids"]  # the same segments read from the positions' resets
    assert cu_seqlens(batch).tolist() == [0, 2, 5, 6, 9, 12]


@pytest.mark.parametrize("forward", [F.llama_ref_forward, F.varlen_forward])
def test_a_right_packed_forward_passes(default_model, forward):
    result = check_packing(PackedForwardTarget(default_model, forward))
    assert result.verdict == "PASS", str(result)
    assert any("training loop on packed micro-batches not checked" in d for d in result.details)


def test_transformers_padding_free_forward_as_a_callable(hf_model):
    pytest.importorskip("transformers.masking_utils", reason="eager/SDPA find packed rows from masking_utils on")
    assert check_packing(PackedForwardTarget(hf_model, F.hf_forward)).verdict == "PASS"


@pytest.mark.parametrize("forward, failing", [(F.ignores_the_documents, "isolation"),
                                              (F.restarts_positions_only, "isolation")])
def test_a_wrong_packed_forward_fails(default_model, forward, failing):
    result = check_packing(PackedForwardTarget(default_model, forward))
    assert not result.ok and any(d.startswith(failing) for d in result.details), str(result)
    assert any(d.startswith("document") and "logits" in d for d in result.details), str(result)


def test_a_callable_without_a_packing_keyword_is_an_error_naming_them(default_model):
    with pytest.raises(TypeError, match="takes none of positions, document_ids, cu_seqlens"):
        PackedForwardTarget(default_model, F.no_packing_keyword)


def test_llama_verify_packed_forward_runs_it_beside_the_targets_own(capsys):
    assert main(["--check", "packing", "--dtype", "float32", "--attn-impl", "sdpa",
                 "--packed-forward", f"{HERE}:llama_ref_forward"]) == 0
    out = capsys.readouterr().out
    assert "packed_forwards.py:llama_ref_forward: " in out and "2/2 checks passed" in out, out
    assert main(["--check", "packing", "--dtype", "float32", "--attn-impl", "sdpa",
                 "--packed-forward", f"{HERE}:ignores_the_documents"]) == 1
    assert main(["--packed-forward", f"{HERE}:no_packing_keyword"]) == 2
    assert "takes none of positions" in capsys.readouterr().err
