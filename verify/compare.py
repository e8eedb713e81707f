"""Tensor and gradient comparisons with ``torch.testing.assert_close`` semantics that say where they differ."""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

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
    magnitude = e.abs() if scale is None else torch.maximum(e.abs(), scale.detach().to("cpu", torch.float64))
    allowed = tol.atol + tol.rtol * magnitude
    probe = _probe_for(name)
    if probe is not None:
        a = probe.inject_elementwise(name, a, e, allowed, magnitude.expand_as(e))
    same_inf = (a == e) & torch.isinf(e)  # inf == inf passes, as in assert_close; NaN never does
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
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
        c = compare(a, e, tol, f"grad {name}")
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
                       floor: Optional[float] = None, name: str = "tensor") -> CalibratedComparison:
    """Calibrated closeness (DESIGN §4); ``floor`` defaults to eps(test dtype)·||reference||; ``name`` says what
    is compared (a :class:`Probe` selects comparisons by it)."""
    ref = reference.detach().to("cpu", torch.float64)
    t = test.detach().to("cpu", torch.float64)
    plain_err = float((plain.detach().to("cpu", torch.float64) - ref).norm())
    if floor is None:
        floor = torch.finfo(test.dtype).eps * float(ref.norm()) if test.dtype.is_floating_point else 0.0
    probe = _probe_for(name)
    if probe is not None:
        t = probe.inject_calibrated(name, t, ref, factor * max(plain_err, floor))
    err = float((t - ref).norm())
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


# ---- errors of a controlled size: what a check detects ----------------------------------------------------------

@dataclass
class Probe:
    """Records every comparison whose ``name`` fully matches ``claim`` (a regular expression) and, where
    ``multiple`` is set, puts an error of ``multiple`` times the comparison's allowance at one ``place`` of its
    actual side before it is judged: how a check's detection threshold is measured (``verify.thresholds``).

    - elementwise (:func:`compare`): the element at ``place`` becomes expected + multiple·(atol + rtol·magnitude),
      every other element left as computed;
    - calibrated (:func:`compare_calibrated`): the test side is moved along the element at ``place`` until
      ||test − reference|| = multiple·factor·max(||plain − reference||, floor).

    ``place`` indexes the compared tensor (negative indices count from the end; None: the element of largest
    |expected|). ``hits`` holds one :class:`ProbeHit` per comparison seen; ``missed`` names, with the reason, each
    one the error could not be put into (no element at ``place``; the rest of the error already beyond it).
    """

    claim: str
    multiple: Optional[float] = None
    place: Optional[tuple[int, ...]] = None
    hits: list["ProbeHit"] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    def _index(self, name: str, e: torch.Tensor) -> Optional[tuple[int, ...]]:
        if self.place is None:
            flat = int(e.abs().nan_to_num(0.0).flatten().argmax())
            return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), e.shape))
        if len(self.place) != e.dim() or not all(-n <= i < n for i, n in zip(self.place, e.shape)):
            self.missed.append(f"{name}: no element at {self.place} of a tensor of shape {tuple(e.shape)}")
            return None
        return tuple(i % n for i, n in zip(self.place, e.shape))

    def _where(self, name: str, actual: torch.Tensor, expected: torch.Tensor) -> Optional[tuple[int, ...]]:
        """Where to put the error (None: nowhere — only recorded, or no such element, said in ``missed``)."""
        if self.multiple is None:
            self.hits.append(ProbeHit(name, tuple(actual.shape)))
            return None
        return self._index(name, expected)

    def inject_elementwise(self, name: str, a: torch.Tensor, e: torch.Tensor, allowed: torch.Tensor,
                           magnitude: torch.Tensor) -> torch.Tensor:
        at = self._where(name, a, e)
        if at is None:
            return a
        a = a.clone()
        a[at] = e[at] + self.multiple * allowed[at]
        self.hits.append(ProbeHit(name, tuple(a.shape), at, float(self.multiple * allowed[at]), float(magnitude[at])))
        return a

    def inject_calibrated(self, name: str, t: torch.Tensor, ref: torch.Tensor, allowed: float) -> torch.Tensor:
        at = self._where(name, t, ref)
        if at is None:
            return t
        target = self.multiple * allowed  # the error norm wanted
        d = t - ref
        rest = float(d.square().sum() - d[at].square())
        if not target ** 2 > rest:
            self.missed.append(f"{name}: the error elsewhere ({math.sqrt(rest):.3e}) already exceeds {target:.3e}")
            return t
        t = t.clone()
        t[at] = ref[at] + math.sqrt(target ** 2 - rest)
        self.hits.append(ProbeHit(name, tuple(t.shape), at, target, float(ref.norm())))
        return t


@dataclass(frozen=True)
class ProbeHit:
    """One comparison a :class:`Probe` saw: its name and shape; where it put an error, how large (|error| at the
    element, or the error's 2-norm for a calibrated comparison) and the magnitude beside it (the magnitude the
    relative tolerance is taken on there, or ||reference||)."""

    name: str
    shape: tuple[int, ...]
    at: Optional[tuple[int, ...]] = None
    error: float = 0.0
    magnitude: float = 0.0


_PROBES: list[Probe] = []


@contextlib.contextmanager
def probing(*probes: Probe) -> Iterator[tuple[Probe, ...]]:
    """Apply ``probes`` to every comparison made in the block (the first whose claim matches a name wins)."""
    _PROBES.extend(probes)
    try:
        yield probes
    finally:
        _PROBES[:] = [p for p in _PROBES if all(p is not q for q in probes)]  # by identity: equal probes may differ


def _probe_for(name: str) -> Optional[Probe]:
    return next((p for p in _PROBES if re.fullmatch(p.claim, name)), None)
