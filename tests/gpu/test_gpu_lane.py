"""scripts/gpu_lane.sh, the CUDA lane in one run, kept working while no GPU is at hand: its table (seed, measured,
predicted, each prediction's error) derived from llama-bench records, and — in the slow lane — the whole script run
on CPU at tiny sizes (``GPU_LANE_SMOKE=1``), so that a loan of a GPU is never spent on a broken script."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_ref.perf.bench_report import SEED_TABLE
from llama_ref.perf.cells import Cell
from llama_ref.perf.peak import mem_tracker_available

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_lane_table", ROOT / "scripts" / "gpu_lane_table.py")
gpu_lane_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_lane_table)


def _bench(path: Path, preset: str, peaks: dict[str, float | None]) -> None:
    cells = [{"cell": name, "status": "ok" if mb is not None else "OOM", "peak_mb": mb} for name, mb in peaks.items()]
    path.mkdir(parents=True)
    (path / "bench.json").write_text(json.dumps({
        "config": {"preset": preset, "batch_size": 1, "seq_len": 384, "optimizer": "sgd", "ga": 8, "steps": 8},
        "model": f"preset {preset!r}", "device": "cuda", "torch": "2.11.0", "cells": cells}))


def _row(table: str, cell: str) -> list[str]:
    return next(line.split(" | ") for line in table.splitlines() if line.startswith(f"| {cell} |"))


def test_table_gives_each_prediction_its_error_and_the_seed_only_for_the_1b_shape(tmp_path):
    measured = {"plain": 11_000.0, "LoRA": 7_000.0, "GA+MP": None}
    predicted = {"plain": 12_210.0, "LoRA": 6_650.0, "GA+MP": 16_025.0}
    _bench(tmp_path / "bench", "llama-3.2-1b", measured)
    _bench(tmp_path / "predict", "llama-3.2-1b", predicted)
    table = gpu_lane_table.memory_table(tmp_path)

    plain = _row(table, "plain")
    assert plain[1] == f"{SEED_TABLE[Cell.parse('plain')][0]:,.2f}"
    assert plain[4] == f"{12_210 / 11_000 - 1:+.1%} **over 10 %**"  # +11.0 %: past the bound, flagged
    assert plain[5].rstrip(" |") == f"{11_000 / SEED_TABLE[Cell.parse('plain')][0] - 1:+.1%}"
    lora = _row(table, "LoRA")
    assert lora[4] == f"{6_650 / 7_000 - 1:+.1%}"  # −5.0 %: within it, not flagged
    oom = _row(table, "GA+MP")
    assert oom[1] == "x (OOM)" and oom[2] == "OOM" and oom[4] == "—"  # no error against a cell that did not fit
    assert _row(table, "GC")[2] == "not run"

    other = tmp_path / "tiny"
    _bench(other / "bench", "tiny", {"plain": 2.0})
    _bench(other / "predict", "tiny", {"plain": 2.0})
    tiny = gpu_lane_table.memory_table(other)
    assert "not comparable" in tiny and _row(tiny, "plain")[1] == "—" and _row(tiny, "plain")[5] == "— |"


@pytest.mark.slow  # the whole lane: a dozen processes (pytest, llama-verify, one per bench cell), ~25 s
@pytest.mark.skipif(not mem_tracker_available(), reason=f"torch {torch.__version__} has no MemTracker (torch >= 2.5): "
                    "the lane's predictions cannot run")
def test_the_lane_runs_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "GPU_LANE_SMOKE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_lane.sh"), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = dict(line.split("\t")[:2] for line in (tmp_path / "summary.tsv").read_text().splitlines()[1:])
    assert steps == {"pytest_gpu": "0", "verify": "0", "bench": "0", "predict": "0"}
    verdicts = json.loads((tmp_path / "verify.json").read_text())
    assert verdicts["results"] and all(r["ok"] and not r["not_applicable"] for r in verdicts["results"]), verdicts
    table = (tmp_path / "table.md").read_text()
    for cell in ("plain", "LoRA", "GC+MP+LoRA"):  # the smoke's cells: measured and predicted, an error between them
        row = _row(table, cell)
        assert row[2] not in ("not run", "error") and row[3] not in ("not run", "error") and row[4] != "—", row
    assert "22 skipped" in (tmp_path / "pytest_gpu.log").read_text()  # every gpu test reached, and skipped on CPU
