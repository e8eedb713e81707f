"""A model of neither shape (tests/verify/targets/past_style.py: ``forward(tokens, past) -> (logits, past)``) is
verified for all five properties through the target docs/verify-your-model.md writes out
(tests/verify/targets/own_target.py, kept equal to the doc here), the training properties with the user's step."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from verify.checks.grad_accum import check_grad_accumulation
from verify.checks.gradient_checkpointing import check_gradient_checkpointing
from verify.checks.kv_cache import check_kv_cache
from verify.checks.lora_merge import check_lora_merge
from verify.checks.mixed_precision import check_mixed_precision

from . import past_style, train_steps
from .own_target import PastTarget

EXAMPLE = Path(__file__).with_name("own_target.py")
DOC = Path(__file__).resolve().parents[3] / "docs" / "verify-your-model.md"


def test_the_doc_shows_the_example_as_it_is_tested():
    code = EXAMPLE.read_text().split("# --- the example: from here to the end, as the doc shows it ---\n", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code in blocks, "docs/verify-your-model.md's own-target example differs from tests/verify/targets/own_target.py"
    body = ast.get_source_segment(code, next(n for n in ast.parse(code).body if isinstance(n, ast.ClassDef)))
    assert len([line for line in body.splitlines() if line.strip()]) <= 40  # the whole target, all five properties


def test_the_docs_protocol_table_is_the_registrys():
    from verify.properties import RECORDS
    from verify.targets.base import Target
    from verify.targets.protocols import members
    text = DOC.read_text()
    for record in RECORDS:
        for protocol in record.protocols:
            row = (f"| `{record.name}` | `{protocol.__name__}` | "
                   + ", ".join(f"`{m}`" + ("*" if hasattr(Target, m) else "") for m in members(protocol)) + " |")
            assert row in text, f"docs/verify-your-model.md lacks or misstates: {row}"


def _step(step):  # the user's step calls model(input_ids, 0); this model's plain forward is model(tokens)[0]
    return train_steps.through(step, lambda model, tokens: model(tokens)[0])


@pytest.mark.parametrize("check, kwargs", [
    (check_kv_cache, {}), (check_lora_merge, {}), (check_gradient_checkpointing, {}),
    (check_grad_accumulation, dict(train_step=_step(train_steps.token_mean_step), lora=(True,), optimizer="sgd",
                                   steps=2)),
    (check_mixed_precision, dict(train_step=_step(train_steps.bf16_step), full=False)),
], ids=["kv_cache", "lora_merge", "gradient_checkpointing", "grad_accum", "mixed_precision"])
def test_every_property_passes_through_the_documented_target(check, kwargs):
    result = check(PastTarget(past_style.make()), **kwargs)
    assert result.verdict == "PASS", str(result)
