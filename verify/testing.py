"""Assertions for the user's own tests, one per property, derived from the registry (:mod:`verify.properties`):
each runs its property's check on a target (a model any adapter takes, or a ready target) and raises
``AssertionError`` with the check's own report when it fails.

A property the target cannot be asked is not a failure: inside pytest the test is skipped with the reason, elsewhere
:class:`NotApplicable` is raised. Keyword arguments go to the check (``seed``, ``tokens``, ``policies``,
``train_step``, …)::

    from verify.testing import assert_kv_cache_equivalent, assert_grad_accumulation_equivalent

    def test_my_cache():
        assert_kv_cache_equivalent(make_my_model())

    def test_my_accumulation():
        assert_grad_accumulation_equivalent(make_my_model(), train_step=my_train_step)

The helpers: ``assert_kv_cache_equivalent`` (property 1), ``assert_grad_accumulation_equivalent`` (2),
``assert_lora_merge_equivalent`` (3), ``assert_gradient_checkpointing_equivalent`` (4),
``assert_mixed_precision_right`` (5: of ``train_step``, yours with its autocast and GradScaler, else the target's
own step — transformers' Trainer — or llama_ref's own trainer), ``assert_distributed_equivalent`` (6), and one for
each property registered since (its record's ``assertion``).
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from .properties import PROPERTIES, Property
from .result import CheckResult


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


def assertion(prop: Property) -> Callable[..., CheckResult]:
    """The assertion helper of property ``prop``: ``helper(target, **check_keywords) -> CheckResult``."""
    def helper(target: Any, **kwargs: Any) -> CheckResult:
        __tracebackhide__ = True  # pytest shows the user's line, not this one
        return verdict(prop.check(target, **kwargs))
    helper.__name__ = helper.__qualname__ = prop.assertion
    helper.__doc__ = (f"Property {prop.name!r}: {prop.statement} (:func:`{prop.check.__module__}."
                      f"{prop.check.__qualname__}`); the check's keyword arguments pass through.")
    return helper


def __getattr__(name: str) -> Callable[..., CheckResult]:
    for prop in PROPERTIES.values():
        if prop.assertion == name:
            return assertion(prop)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *(p.assertion for p in PROPERTIES.values())])


def _exported() -> list[str]:
    return sorted(["NotApplicable", "assertion", "verdict", *(p.assertion for p in PROPERTIES.values())])


__all__ = _exported()
