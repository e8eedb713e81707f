"""What every check returns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from .tolerances import Tolerance


@dataclass
class CheckResult:
    """One property checked on one model: ``ok`` and the worst error seen over all its cases.

    ``details`` holds one line per case that failed (and notes such as near-ties that were excused);
    ``error`` is set when the implementation under test raised instead of returning. ``not_applicable`` says why
    the property could not be asked of the target at all (no LoRA layers, a forward under ``inference_mode``):
    such a result is neither PASS nor FAIL (``verdict`` "N/A"); it fails nothing and proves nothing.
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
    not_applicable: Optional[str] = None
    margin: Optional[float] = None  # worst error ÷ what its criterion allows, over every comparison (> 1 fails)
    # The typed records behind ``details`` (verify.findings.Finding: failure, raised, note, tie, not applicable), in
    # the same order; empty for a result made by hand.
    findings: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.margin is None and not self.ok and not self.not_applicable:
            self.margin = float("inf")  # a failure (a crash, a missing gradient) that no comparison measured

    @classmethod
    def na(cls, name: str, why: str, case: str = "") -> "CheckResult":
        """The property cannot be asked of this target, and ``why``."""
        return cls(name, True, float("nan"), float("nan"), None, [], case, not_applicable=why)

    @property
    def verdict(self) -> str:
        return "N/A" if self.not_applicable else ("PASS" if self.ok else "FAIL")

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tol"] = None if self.tol is None else {"rtol": self.tol.rtol, "atol": self.tol.atol}
        d["findings"] = [f.to_json() for f in self.findings]
        return d

    def __str__(self) -> str:
        if self.not_applicable:
            return f"{self.name}: N/A {self.case}\n  not applicable: {self.not_applicable}"
        head = (f"{self.name}: {self.verdict} max_abs={self.max_abs:.3e} "
                f"({self.criterion or self.tol}) {self.case}")
        lines = [head] + ([f"  raised: {self.error}"] if self.error else []) + [f"  {d}" for d in self.details]
        return "\n".join(lines)


def describe_exception(e: BaseException) -> str:
    """``Type: message (at file.py:line in function)``, the place being the innermost frame outside torch and
    ``verify`` itself: in the implementation under test, where a user looks first."""
    import traceback
    from pathlib import Path

    import torch

    skip = (Path(torch.__file__).parent, Path(__file__).parent)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not any(Path(f.filename).is_relative_to(d) for d in skip)]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def name_list(names: Sequence[Any], limit: int = 4) -> str:
    """``a, b, c, d and 3 more``: the first ``limit`` names of a failure detail."""
    names = [str(n) for n in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
