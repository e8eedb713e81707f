"""verify.compare and verify.tolerances: assert_close semantics, located differences, None-vs-tensor failures."""
from __future__ import annotations

import pytest
import torch

from verify.compare import compare, compare_calibrated, compare_grads
from verify.tolerances import DTYPE_DEFAULTS, Tolerance, tolerance

TIGHT = tolerance(torch.float32)


def test_dtype_defaults_are_assert_close_defaults():
    from torch.testing._comparison import _DTYPE_PRECISIONS

    for dtype, tol in DTYPE_DEFAULTS.items():
        if dtype in _DTYPE_PRECISIONS:
            assert tol == Tolerance(*_DTYPE_PRECISIONS[dtype]), dtype


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="no tolerance for dtype torch.int64"):
        tolerance(torch.int64)


def test_compare_agrees_with_assert_close_on_the_boundary():
    expected = torch.tensor([1.0, 100.0])
    just_inside = expected + torch.tensor([0.0, TIGHT.bound(100.0) * 0.99])
    just_outside = expected + torch.tensor([0.0, TIGHT.bound(100.0) * 1.01])
    assert compare(just_inside, expected, TIGHT).ok
    c = compare(just_outside, expected, TIGHT, "logits")
    assert not c.ok and c.n_mismatched == 1 and c.where == (1,)
    assert "logits" in c.message and "Mismatched elements: 1 / 2" in c.message


def test_compare_locates_the_largest_difference():
    a = torch.zeros(3, 4)
    b = a.clone()
    b[2, 1] = 0.5
    b[0, 0] = 0.1
    c = compare(a, b, TIGHT)
    assert c.where == (2, 1) and c.max_abs == pytest.approx(0.5) and c.n_mismatched == 2


def test_nan_is_a_mismatch_but_equal_infinities_are_not():
    assert not compare(torch.tensor([float("nan")]), torch.tensor([float("nan")]), TIGHT).ok
    assert compare(torch.tensor([float("inf")]), torch.tensor([float("inf")]), TIGHT).ok
    assert not compare(torch.tensor([float("inf")]), torch.tensor([1.0]), TIGHT).ok


def test_shape_mismatch_is_a_failure_not_a_broadcast():
    c = compare(torch.zeros(2, 1), torch.zeros(2, 3), TIGHT, "x")
    assert not c.ok and "shape (2, 1) != expected (2, 3)" in c.message


def test_grad_comparison_fails_on_none_against_a_tensor():
    g = torch.ones(3)
    result = compare_grads({"a": g, "b": None}, {"a": g, "b": g}, TIGHT)
    assert not result.ok and result.problems == ("b: gradient is None in actual, a tensor in the other",)
    assert compare_grads({"a": g, "b": None}, {"a": g, "b": None}, TIGHT).ok
    missing = compare_grads({"a": g}, {"a": g, "c": g}, TIGHT)
    assert not missing.ok and "c: present only in expected" in missing.problems[0]


def test_scale_sets_the_magnitude_of_the_relative_term():
    # A small logit next to a large one in the same row carries the large one's rounding error.
    expected = torch.tensor([[100.0, 0.5]])
    actual = expected + torch.tensor([[0.0, 5e-5]])
    assert not compare(actual, expected, TIGHT).ok  # elementwise: 5e-5 > 1e-5 + 1.3e-6·0.5
    scale = expected.abs().amax(-1, keepdim=True)
    assert compare(actual, expected, TIGHT, scale=scale).ok  # 5e-5 ≤ 1e-5 + 1.3e-6·100
    assert not compare(expected + torch.tensor([[0.0, 2e-4]]), expected, TIGHT, scale=scale).ok


def test_the_margin_is_the_worst_error_over_what_the_rule_allows():
    tol = Tolerance(1e-3, 1e-4)
    # |2.0015 - 2| = 1.5e-3 against 1e-4 + 1e-3·2 = 2.1e-3; the exact element counts 0, a NaN is past any bound
    c = compare(torch.tensor([1.0, 2.0015], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64), tol)
    assert c.ok and c.margin == pytest.approx(1.5e-3 / 2.1e-3)
    assert not compare(torch.tensor([3.0]), torch.tensor([2.0]), tol).ok
    assert compare(torch.tensor([3.0]), torch.tensor([2.0]), tol).margin > 1
    assert compare(torch.tensor([float("nan")]), torch.tensor([2.0]), tol).margin == float("inf")
    assert compare(torch.zeros(2), torch.zeros(2), Tolerance(0.0, 0.0)).margin == 0.0  # exact, atol 0: no 0/0
    cal = compare_calibrated(torch.tensor([1.3]), torch.tensor([1.1]), torch.tensor([1.0]), factor=4.0)
    assert cal.margin == pytest.approx(0.3 / 0.1 / 4.0)


def test_the_report_table_fits_120_columns_and_shows_each_margin():
    from verify.table import format_results
    from verify.result import CheckResult

    results = [CheckResult("kv_cache", True, 1e-6, 1e-6, Tolerance(1e-5, 0.0), case="x" * 300, margin=0.25),
               CheckResult("grad_accum", False, 2.0, 0.0, None, ["step 1 grads: TOO FAR"], "short", margin=12.5),
               CheckResult.na("lora_merge", "no LoRA layers", "m")]
    text = format_results(results)
    table = text.split("\n\n")[0].splitlines()
    assert max(map(len, table)) <= 120 and table[2].endswith("  0.25    PASS")
    assert "12.50" in table[3] and table[3].endswith("FAIL") and table[4].endswith("N/A")
    assert "[1] kv_cache PASS: " + "x" * 300 in text  # the whole case below the table
    assert "    step 1 grads: TOO FAR" in text and "    not applicable: no LoRA layers" in text
