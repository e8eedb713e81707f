"""What every check returns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from .tolerances import Tolerance


@dataclass
class CheckResult:
    """One property checked on one model: ``ok`` and the worst error seen over all its cases.

    ``details`` holds one line per case that failed (and notes such as near-ties that were excused);
    ``error`` is set when the implementation under test raised instead of returning.
    """

    name: str
    ok: bool
    max_abs: float
    max_rel: float
    tol: Optional[Tolerance]
    details: list[str] = field(default_factory=list)
    case: str = ""
    error: Optional[str] = None
    criterion: str = ""  # how the check judged, where ``tol`` alone does not say it (calibrated comparisons)

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tol"] = None if self.tol is None else {"rtol": self.tol.rtol, "atol": self.tol.atol}
        return d

    def __str__(self) -> str:
        head = (f"{self.name}: {'PASS' if self.ok else 'FAIL'} max_abs={self.max_abs:.3e} "
                f"({self.criterion or self.tol}) {self.case}")
        lines = [head] + ([f"  raised: {self.error}"] if self.error else []) + [f"  {d}" for d in self.details]
        return "\n".join(lines)


def name_list(names: Sequence[Any], limit: int = 4) -> str:
    """``a, b, c, d and 3 more``: the first ``limit`` names of a failure detail."""
    names = [str(n) for n in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
