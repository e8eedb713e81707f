"""The tables ``llama-verify`` prints and the JSON it writes: results, the kill matrix, plain rows."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from llama_ref.formats.atomic import atomic_write

from .mutants import Mutant
from .result import CheckResult

WIDTH = 120  # the table fits a 120-column terminal; the notes below it say the rest
MAX_DETAILS = 6  # detail lines shown per result (``--json`` holds them all)


def _margin(r: CheckResult) -> str:
    if r.not_applicable or r.margin is None:
        return "-"
    return "inf" if r.margin == float("inf") else (f"{r.margin:.2f}" if r.margin < 100 else f"{r.margin:.1e}")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_results(results: Sequence[CheckResult]) -> str:
    """A table, one row per result (``margin``: the worst error ÷ what the criterion allows; above 1 fails), then
    per row what was judged how, why it does not apply, and what failed."""
    head = ("#", "check", "case", "max abs err", "margin", "verdict")
    cells = [(str(i), r.name, r.case, "-" if r.not_applicable else f"{r.max_abs:.2e}", _margin(r), r.verdict)
             for i, r in enumerate(results, 1)]
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    widths[2] = max(len(head[2]), min(widths[2], WIDTH - (sum(widths) - widths[2]) - 2 * (len(head) - 1)))
    text = _table([head] + [tuple(_cut(c, widths[2]) if i == 2 else c for i, c in enumerate(row)) for row in cells])
    notes = []
    for i, r in enumerate(results, 1):
        lines = ([f"not applicable: {r.not_applicable}"] if r.not_applicable else
                 [f"judged by: {r.criterion or r.tol}"] + ([f"raised {r.error}"] if r.error else []))
        shown = r.details[:MAX_DETAILS]
        lines += shown + ([f"… and {len(r.details) - len(shown)} more (--json has them all)"]
                          if len(r.details) > len(shown) else [])
        notes.append(f"[{i}] {r.name} {r.verdict}: {r.case}")
        notes += [f"    {line}" for line in lines]
    return text + "\n\n" + "\n".join(notes)


def format_kill_matrix(matrix: dict[str, dict[str, CheckResult]], mutants: Sequence[Mutant]) -> str:
    checks = sorted({c for row in matrix.values() for c in row})
    by_name = {m.name: m for m in mutants}
    rows = [("mutant", "property", *checks, "verdict")]
    for name, row in matrix.items():
        cells = []
        for c in checks:
            r = row.get(c)
            cells.append("-" if r is None else ("passes" if r.ok else ("FAILS (raised)" if r.error else "FAILS")))
        own = row.get(by_name[name].prop)
        rows.append((name, by_name[name].prop, *cells, "caught" if own is not None and not own.ok else "MISSED"))
    return _table(rows)


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first the header) as left-aligned columns under a rule."""
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (llama_ref's one atomic writer: all of the file or none of it)."""
    atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
