"""Tensor and gradient comparisons with ``torch.testing.assert_close`` semantics that say where they differ."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .tolerances import Tolerance


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing ``actual`` with ``expected`` elementwise: |a − e| ≤ atol + rtol·|e|."""

    ok: bool
    max_abs: float  # largest |a − e|
    max_rel: float  # largest |a − e| / |e| (over elements with e ≠ 0)
    where: Optional[tuple[int, ...]]  # index of the largest |a − e| (None when the tensors are empty)
    n_mismatched: int
    numel: int
    tol: Tolerance
    message: str = ""  # assert_close's own message on failure
    margin: float = 0.0  # largest |a − e| / (atol + rtol·|e|): how close to failing (> 1 fails; inf: NaN or shape)

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"{self.n_mismatched}/{self.numel} mismatched"
        return f"{verdict}: max abs {self.max_abs:.3e} at {self.where}, max rel {self.max_rel:.3e} ({self.tol})"


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, name: str = "tensor",
            scale: Optional[torch.Tensor] = None) -> Comparison:
    """Compare two tensors of equal shape in float64: |a − e| ≤ atol + rtol·max(|e|, scale).

    ``scale`` (broadcastable to ``expected``) is the magnitude the rounding error of each element is proportional
    to when that is not the element itself — for logits, the largest |logit| of the row: every logit is a dot
    product of the same hidden state, so a small logit carries the rounding error of the large ones. Without it,
    assert_close's elementwise rule. NaN anywhere is a mismatch; equal infinities are not.
    """
    if actual.shape != expected.shape:
        return Comparison(False, float("inf"), float("inf"), None, actual.numel(), actual.numel(), tol,
                          f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}", float("inf"))
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return Comparison(True, 0.0, 0.0, None, 0, 0, tol)
    same_inf = (a == e) & torch.isinf(e)  # inf == inf passes, as in assert_close; NaN never does
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    magnitude = e.abs() if scale is None else torch.maximum(e.abs(), scale.detach().to("cpu", torch.float64))
    allowed = tol.atol + tol.rtol * magnitude
    bad = ~(diff <= allowed)  # True wherever a NaN is involved
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)  # report NaN as inf
    ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / allowed)  # 0/0 (atol 0, exact) is no error
    margin = float(torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio).max())
    flat = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    nonzero = (e != 0) & torch.isfinite(e)
    max_rel = float((diff[nonzero] / e.abs()[nonzero]).max()) if bool(nonzero.any()) else 0.0
    n_bad = int(bad.sum())
    message = ""
    if n_bad:
        try:
            torch.testing.assert_close(a, e, rtol=tol.rtol, atol=tol.atol, msg=None)
        except AssertionError as err:
            message = f"{name}: {err}"
    return Comparison(n_bad == 0, float(diff.max()), max_rel, where, n_bad, diff.numel(), tol, message, margin)


@dataclass(frozen=True)
class GradComparison:
    """Per-parameter comparisons of two gradient dicts; a ``None`` against a tensor is a failure, never a skip."""

    ok: bool
    per_param: Mapping[str, Comparison] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.per_param.values()), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.per_param.values()), default=0.0)

    @property
    def margin(self) -> float:
        """The worst parameter's margin; inf where a gradient is missing on one side."""
        if any("gradient is None" in p or "present only" in p for p in self.problems):
            return float("inf")
        return max((c.margin for c in self.per_param.values()), default=0.0)


def compare_grads(actual: Mapping[str, Optional[torch.Tensor]], expected: Mapping[str, Optional[torch.Tensor]],
                  tol: Tolerance) -> GradComparison:
    problems: list[str] = []
    per_param: dict[str, Comparison] = {}
    for name in sorted(set(actual) | set(expected)):
        if name not in actual or name not in expected:
            problems.append(f"{name}: present only in {'actual' if name in actual else 'expected'}")
            continue
        a, e = actual[name], expected[name]
        if a is None and e is None:
            continue
        if a is None or e is None:
            problems.append(f"{name}: gradient is None in {'actual' if a is None else 'expected'}, "
                            f"a tensor in the other")
            continue
        c = compare(a, e, tol, name)
        per_param[name] = c
        if not c.ok:
            problems.append(f"{name}: {c}")
    return GradComparison(not problems, per_param, tuple(problems))


@dataclass(frozen=True)
class CalibratedComparison:
    """Is ``test`` at most ``factor`` times further from ``reference`` than ``plain`` is (2-norms)?

    ``floor`` keeps a plain path that happens to be exact (error 0) from making every rounding a failure.
    """

    ok: bool
    error: float  # ||test − reference||
    plain_error: float  # ||plain − reference||
    factor: float
    floor: float
    max_abs: float  # max |test − reference|

    @property
    def ratio(self) -> float:
        if self.error == 0:
            return 0.0  # exact: no error however small the baseline (0/0 included)
        return self.error / max(self.plain_error, self.floor) if max(self.plain_error, self.floor) else float("inf")

    @property
    def margin(self) -> float:
        """ratio ÷ factor: > 1 fails."""
        ratio = self.ratio
        return float("inf") if ratio != ratio else ratio / self.factor  # NaN (a non-finite test) as inf

    def __str__(self) -> str:
        return (f"{'ok' if self.ok else 'TOO FAR'}: ||test - ref|| = {self.error:.3e} is {self.ratio:.2f}x "
                f"||plain - ref|| = {self.plain_error:.3e} (allowed {self.factor:g}x)")


def compare_calibrated(test: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor, factor: float,
                       floor: Optional[float] = None) -> CalibratedComparison:
    """Calibrated closeness (DESIGN §4); ``floor`` defaults to eps(test dtype)·||reference||."""
    ref = reference.detach().to("cpu", torch.float64)
    t = test.detach().to("cpu", torch.float64)
    err = float((t - ref).norm())
    plain_err = float((plain.detach().to("cpu", torch.float64) - ref).norm())
    if floor is None:
        floor = torch.finfo(test.dtype).eps * float(ref.norm()) if test.dtype.is_floating_point else 0.0
    ok = bool(torch.isfinite(t).all()) and err <= factor * max(plain_err, floor)
    return CalibratedComparison(ok, err, plain_err, factor, floor, float((t - ref).abs().max()))


def row_scale(logits: torch.Tensor) -> torch.Tensor:
    """The largest |logit| of each position (…, 1): the magnitude the rounding error of every logit there scales
    with, the ``scale`` of a logits comparison."""
    return logits.abs().amax(dim=-1, keepdim=True)


def scale_factor(test: torch.Tensor, reference: torch.Tensor) -> Optional[float]:
    """``c`` when ``test`` is ``c·reference`` to 1 % (the least-squares ``c``; a scaled loss, say), else None."""
    t, r = test.detach().double().flatten(), reference.detach().double().flatten()
    c = float(t @ r) / max(float(r @ r), 1e-300)
    return c if float((t - c * r).norm()) <= 1e-2 * float(t.norm()) else None
