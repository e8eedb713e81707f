"""verify.testing: the assertion helpers for a user's own tests."""
from __future__ import annotations

import pytest

from verify.result import CheckResult
from verify.testing import (assert_gradient_checkpointing_equivalent, assert_kv_cache_equivalent,
                            assert_lora_merge_equivalent, verdict)

from .targets import seed_style


def test_a_failing_property_raises_the_checks_report():
    with pytest.raises(AssertionError, match=r"^kv_cache: FAIL .*\n  raised: RuntimeError"):
        assert_kv_cache_equivalent(seed_style.make())


def test_a_passing_property_returns_its_result():
    result = assert_lora_merge_equivalent(seed_style.make_lora())
    assert result.ok and result.name == "lora_merge"


def test_a_property_that_does_not_apply_skips_the_test_with_the_reason():
    with pytest.raises(pytest.skip.Exception, match="gradient_checkpointing not applicable: the forward runs under"):
        assert_gradient_checkpointing_equivalent(seed_style.make_lora())  # Meta's inference_mode forward
    with pytest.raises(pytest.skip.Exception, match="kv_cache not applicable: why"):
        verdict(CheckResult.na("kv_cache", "why"))
