"""The CUDA lane's results side by side, as docs/benchmarks.md records them: for each of the 16 cells the seed's figure,
the measured peak (the CUDA allocator's ``max_memory_allocated``), our prediction and its error against the
measurement; then the ``pytest -m gpu`` tally and wall time from its junit XML.

    python scripts/gpu_lane_table.py OUT_DIR    # the folder scripts/gpu_lane.sh wrote; prints markdown
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

from llama_ref.perf.bench_report import SEED_TABLE
from llama_ref.perf.cells import CELLS, Cell

PREDICTION_BOUND = 0.10  # the issue's: every prediction within 10 % of its measurement, or the difference explained


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"cells": []}
    try:
        data = json.loads(path.read_text())
        data["cells"], data["config"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise SystemExit(f"{path}: not a llama-bench bench.json ({exc})") from None
    return data


def _records(data: dict[str, Any]) -> dict[Cell, dict[str, Any]]:
    return {Cell.parse(r["cell"]): r for r in data["cells"]}


def _peak(record: Optional[dict[str, Any]]) -> str:
    if record is None:
        return "not run"
    if record["status"] != "ok":
        return record["status"]
    return f"{record['peak_mb']:,.0f}"


def memory_table(out: Path) -> str:
    run = _load(out / "bench" / "bench.json")
    measured, predicted = _records(run), _records(_load(out / "predict" / "bench.json"))
    config = run.get("config", {})
    # The seed's figures are for the 1B shape at batch 1: beside anything else they compare nothing.
    seed_comparable = config.get("preset") == "llama-3.2-1b" and config.get("batch_size") == 1
    lines = []
    if run["cells"]:
        lines += [f"{run['model']} on {run['device']}, torch {run['torch']}: batch {config['batch_size']}, "
                  f"{config['seq_len']} tokens, {config['optimizer']}, GA over {config['ga']}, "
                  f"{config['steps']} micro-batches per cell" + ("" if seed_comparable else
                                                                 "; the seed's 1B figures not comparable"), ""]
    lines += ["| cell | seed (MB) | measured (MiB) | predicted (MiB) | predicted vs measured | measured vs seed |",
             "|---|---|---|---|---|---|"]
    ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
    for cell in CELLS:
        m, p = measured.get(cell), predicted.get(cell)
        seed = SEED_TABLE[cell][0] if seed_comparable else None
        seed_text = f"{seed:,.2f}" if seed else "x (OOM)" if seed_comparable else "—"
        err = "—"
        if ok(m) and ok(p):
            rel = p["peak_mb"] / m["peak_mb"] - 1
            err = f"{rel:+.1%}" + (" **over 10 %**" if abs(rel) > PREDICTION_BOUND else "")
        vs_seed = f"{m['peak_mb'] / seed - 1:+.1%}" if ok(m) and seed else "—"
        lines.append(f"| {cell.name} | {seed_text} | {_peak(m)} | {_peak(p)} | {err} | {vs_seed} |")
    return "\n".join(lines) + "\n"


def pytest_summary(out: Path) -> str:
    xml = out / "pytest_gpu.xml"
    if not xml.is_file():
        return "pytest -m gpu: no junit XML (the step did not finish)\n"
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise SystemExit(f"{xml}: no <testsuite> element")
    get = lambda k: int(suite.get(k, 0))  # noqa: E731
    passed = get("tests") - get("failures") - get("errors") - get("skipped")
    return (f"pytest -m gpu: {passed} passed, {get('failures')} failed, {get('errors')} errors, "
            f"{get('skipped')} skipped in {float(suite.get('time', 0)):.1f} s\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder scripts/gpu_lane.sh wrote")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out}: no such folder")
    print(memory_table(args.out))
    print(pytest_summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
