"""Assertions for the user's own tests: each runs one property's check on a target (a model any adapter takes, or a
ready target) and raises ``AssertionError`` with the check's own report when it fails.

A property the target cannot be asked is not a failure: inside pytest the test is skipped with the reason, elsewhere
:class:`NotApplicable` is raised. Keyword arguments go to the check (``seed``, ``tokens``, ``policies``, …)::

    from verify.testing import assert_kv_cache_equivalent, assert_grad_accumulation_equivalent

    def test_my_cache():
        assert_kv_cache_equivalent(make_my_model())

    def test_my_accumulation():
        assert_grad_accumulation_equivalent(make_my_model(), train_step=my_train_step)
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from .checks.gradient_checkpointing import check_gradient_checkpointing
from .checks.grad_accum import check_grad_accumulation
from .checks.kv_cache import check_kv_cache
from .checks.lora_merge import check_lora_merge
from .checks.mixed_precision import check_mixed_precision
from .checks.mixed_precision_step import check_mixed_precision_step
from .result import CheckResult
from .targets.base import TrainStep


class NotApplicable(Exception):
    """The property cannot be asked of this target (outside pytest; inside, the test is skipped)."""


def verdict(result: CheckResult) -> CheckResult:
    """``result`` if it passed; AssertionError with its report if it failed; a skip (or NotApplicable) if N/A."""
    if result.not_applicable:
        message = f"{result.name} not applicable: {result.not_applicable}"
        if "pytest" in sys.modules:
            import pytest
            pytest.skip(message)
        raise NotApplicable(message)
    if not result.ok:
        raise AssertionError(str(result))
    return result


def assert_kv_cache_equivalent(target: Any, **kwargs: Any) -> CheckResult:
    """Property 1: cached logits and generations equal uncached ones (:func:`verify.checks.kv_cache.check_kv_cache`)."""
    return verdict(check_kv_cache(target, **kwargs))


def assert_grad_accumulation_equivalent(target: Any, *, train_step: Optional[TrainStep] = None,
                                        **kwargs: Any) -> CheckResult:
    """Property 2: accumulated windows equal one large batch, stepped by ``train_step`` or the target's own loop."""
    return verdict(check_grad_accumulation(target, train_step=train_step, **kwargs))


def assert_lora_merge_equivalent(target: Any, **kwargs: Any) -> CheckResult:
    """Property 3: merged LoRA equals unmerged, on weights and logits (:func:`verify.checks.lora_merge`)."""
    return verdict(check_lora_merge(target, **kwargs))


def assert_mixed_precision_right(target: Any, *, train_step: Optional[TrainStep] = None, **kwargs: Any) -> CheckResult:
    """Property 5: mixed precision really mixed and calibrated against float64 — of ``train_step`` (yours, with its
    autocast and GradScaler: :mod:`verify.checks.mixed_precision_step`) or of llama_ref's own trainer."""
    if train_step is not None:
        return verdict(check_mixed_precision_step(target, train_step, **kwargs))
    return verdict(check_mixed_precision(target, **kwargs))


def assert_gradient_checkpointing_equivalent(target: Any, **kwargs: Any) -> CheckResult:
    """Property 4: checkpointing changes no gradient and really recomputes (:mod:`verify.checks.gradient_checkpointing`)."""
    return verdict(check_gradient_checkpointing(target, **kwargs))


__all__ = ["NotApplicable", "assert_gradient_checkpointing_equivalent", "assert_grad_accumulation_equivalent",
           "assert_kv_cache_equivalent", "assert_lora_merge_equivalent", "assert_mixed_precision_right", "verdict"]
