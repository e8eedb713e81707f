"""What a check found, as typed records: the verdict and the margin are computed from the kinds, never from the
wording of a message (``torch.testing._comparison`` keeps typed error records for the same reason).

A check collects its :class:`Findings` as it goes — comparisons measured, failures, notes, genuine ties, parts not
applicable, what the implementation raised — and turns them into its :class:`verify.result.CheckResult` with
:meth:`Findings.result`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from .result import CheckResult
from .tolerances import Tolerance


class Kind(enum.Enum):
    FAILURE = "failure"  # the property does not hold here
    RAISED = "raised"  # the implementation under test raised: a failure, with its message
    NOTE = "note"  # said for the record; judges nothing
    TIE = "tie"  # a divergence excused as a genuine tie (within rounding of both paths)
    NOT_APPLICABLE = "not applicable"  # a part of the property the target cannot be asked: says what went unexamined


FAILING = frozenset({Kind.FAILURE, Kind.RAISED})
_PREFIX = {Kind.NOTE: "note: ", Kind.TIE: "tie: ", Kind.NOT_APPLICABLE: "note: "}


@dataclass(frozen=True)
class Finding:
    kind: Kind
    message: str

    def __str__(self) -> str:
        return _PREFIX.get(self.kind, "") + self.message

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind.value, "message": self.message}


class Findings:
    """A check's findings in order, and the worst of what it measured: largest |actual − expected| (``max_abs``),
    relative error or ratio (``max_rel``) and ``margin`` (the worst error ÷ what its criterion allows; > 1 fails)."""

    def __init__(self) -> None:
        self.entries: list[Finding] = []
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.margin = 0.0
        self.error: Optional[str] = None  # the first thing the implementation raised
        self.aborted = False  # nothing after the crash was examined: the measurements are void

    # ---- what a check records ---------------------------------------------------------------------------------

    def measure(self, max_abs: float = 0.0, max_rel: float = 0.0, margin: float = 0.0) -> None:
        """A measurement that judges nothing by itself (its verdict is recorded separately, if any)."""
        self.max_abs, self.max_rel = max(self.max_abs, max_abs), max(self.max_rel, max_rel)
        self.margin = max(self.margin, margin)

    def compared(self, label: str, c: Any) -> bool:
        """A comparison (:class:`verify.compare.Comparison` or ``CalibratedComparison``): measured, and a failure
        ``"label: <comparison>"`` where it is not ok; returns whether it was."""
        self.measure(c.max_abs, getattr(c, "max_rel", 0.0), c.margin)
        if not c.ok:
            self.fail(f"{label}: {c}")
        return bool(c.ok)

    def compared_grads(self, where: str, c: Any) -> bool:
        """A :class:`verify.compare.GradComparison`: measured, one failure per problem (``"where gradient of …"``)."""
        self.measure(c.max_abs, c.max_rel, c.margin)
        for problem in c.problems:
            self.fail(f"{where} gradient of {problem}")
        return bool(c.ok)

    def fail(self, message: str) -> None:
        self.entries.append(Finding(Kind.FAILURE, message))

    def note(self, message: str) -> None:
        self.entries.append(Finding(Kind.NOTE, message))

    def tie(self, message: str) -> None:
        self.entries.append(Finding(Kind.TIE, message))

    def not_applicable(self, message: str) -> None:
        self.entries.append(Finding(Kind.NOT_APPLICABLE, message))

    def raised(self, message: str, detail: Optional[str] = None, *, aborts: bool = False) -> None:
        """The implementation raised ``message`` (``Type: text``); ``detail`` is the line shown among the details
        (none where ``message`` is shown as the result's error alone); ``aborts``: nothing after it was examined."""
        self.error = self.error or message
        self.aborted = self.aborted or aborts
        if detail is not None:
            self.entries.append(Finding(Kind.RAISED, detail))

    def extend(self, other: "Findings") -> None:
        """``other``'s entries and measurements added to these."""
        self.entries += other.entries
        self.measure(other.max_abs, other.max_rel, other.margin)
        self.error = self.error or other.error
        self.aborted = self.aborted or other.aborted

    # ---- what they add up to ----------------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.error is not None or any(f.kind in FAILING for f in self.entries)

    @property
    def details(self) -> list[str]:
        return [str(f) for f in self.entries]

    def of(self, *kinds: Kind) -> list[Finding]:
        return [f for f in self.entries if f.kind in kinds]

    def result(self, name: str, case: str, tol: Optional[Tolerance] = None, criterion: str = "") -> CheckResult:
        """The check's result: ok unless a failure or a raise was recorded; the margin is the worst measured, or
        inf where the check failed on something no comparison measured (a crash, a missing gradient)."""
        failed = self.failed
        if self.aborted:
            return CheckResult(name, False, float("inf"), float("inf"), tol, self.details, case, error=self.error,
                               criterion=criterion, findings=list(self.entries))
        margin = self.margin if not failed or self.margin > 1 else float("inf")
        return CheckResult(name, not failed, self.max_abs, self.max_rel, tol, self.details, case, error=self.error,
                           criterion=criterion, margin=margin, findings=list(self.entries))
