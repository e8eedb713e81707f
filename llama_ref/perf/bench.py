"""``llama-bench``: the seed report's 16-cell benchmark (GA × GC × MP × LoRA), measured or predicted, with where the
memory goes.

Measured (default): every cell trains ``--steps`` micro-batches in its own Python process (a fresh allocator: no
cell's memory or cache leaks into the next; ``--no-isolate``: one after the other in this process), on the bundled
instruction set packed into ``--batch-size`` × ``--seq-len`` blocks (or on synthetic tokens when the model's
vocabulary is not the bundled tokenizer's). Peak memory:
the CUDA allocator's ``max_memory_allocated`` on CUDA; on CPU torch's MemTracker over one more accumulation window
after the timed ones (which also gives the breakdown on both devices). A cell that runs out of memory is recorded as
``OOM`` and the run goes on. ``--predict``: the same table from fake tensors (``llama_ref.perf.memory``), any shape, any
device, nothing allocated.

Writes ``--out DIR``: ``bench.json`` (one record per cell), ``bench.md`` (the seed's two tables, the breakdown, and the
seed's qualitative "Performance Analysis" table measured) and, with matplotlib, ``loss_curves.png`` and
``memory_breakdown.png``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..formats.atomic import atomic_write, write_json
from .bench_cell import run_cell_in_process
from .bench_config import BenchConfig
from .bench_report import write_markdown, write_plots
from .cells import Cell, breakdown
from .memory import predict_step_flops, predict_step_memory


def _run_isolated(bench: BenchConfig, cell: Cell, workdir: Path) -> dict[str, Any]:
    """``run_cell`` in a child process; a crash, a kill or a timeout is a record too."""
    job, result = workdir / f"{cell.name}.job.json", workdir / f"{cell.name}.result.json"
    atomic_write(job, json.dumps({"bench": dataclasses.asdict(bench), "cell": dataclasses.asdict(cell)}))
    cmd = [sys.executable, "-m", "llama_ref.cli.bench", "--run-cell", str(job), str(result)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=bench.timeout)
    except subprocess.TimeoutExpired:
        return {**cell.record_fields(), "status": "timeout", "error": f"stopped after {bench.timeout:.0f} s"}
    if result.is_file():
        return json.loads(result.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if proc.returncode == -9:  # SIGKILL: on Linux, the kernel's OOM killer
        return {**cell.record_fields(), "status": "OOM", "error": "killed by SIGKILL (out of memory)"}
    return {**cell.record_fields(), "status": "error",
            "error": f"cell process exited with {proc.returncode}: " + " | ".join(tail)}


def predict_cell(bench: BenchConfig, cell: Cell) -> dict[str, Any]:
    """``cell``'s memory and FLOPs predicted on fake tensors; a bad shape is an ``error`` record."""
    cfg = bench.train_config(cell)
    record: dict[str, Any] = {**cell.record_fields()}
    try:
        report = predict_step_memory(cfg, bench.batch_size, bench.seq_len)
        flops = predict_step_flops(cfg, bench.batch_size, bench.seq_len)
    except ValueError as e:
        return {**record, "status": "error", "error": str(e)}
    return {**record, "status": "ok", "peak_mb": report.peak_mb, "peak_method": report.method,
            "breakdown_mb": breakdown(report.breakdown_mb), "category_peaks_mb": breakdown(report.category_peaks_mb),
            "flops_per_micro_batch": flops, "seconds": report.seconds}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _predict_all(bench: BenchConfig, cells: list[Cell], done) -> list[dict[str, Any]]:
    """Every cell's prediction, in ``bench.jobs`` processes (fake tensors allocate nothing, so cells are
    independent); ``done(record)`` is called as each finishes. Records come back in ``cells``' order."""
    jobs = min(len(cells), bench.jobs or os.cpu_count() or 1)
    if jobs <= 1:
        return [done(predict_cell(bench, cell)) for cell in cells]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_one_thread) as pool:
        futures = {pool.submit(predict_cell, bench, cell): cell for cell in cells}
        by_cell = {futures[f]: done(f.result()) for f in concurrent.futures.as_completed(futures)}
    return [by_cell[cell] for cell in cells]


def _add_flops(bench: BenchConfig, records: list[dict[str, Any]]) -> None:
    """FLOPs per micro-batch of each measured record, counted once per distinct count: a micro-batch's matmuls do
    not depend on GA (a window is the same micro-batches) or on MP (autocast changes dtypes, not shapes), so the 16
    cells have 4 (GC x LoRA) — checked equal across GA and MP in tests/llama_ref/perf/test_bench.py."""
    counted: dict[tuple[bool, bool], Optional[int]] = {}
    for r in records:
        if "flops_per_micro_batch" in r:
            continue
        cell = Cell.parse(r["cell"])
        key = (cell.gc, cell.lora)
        if key not in counted:
            try:
                counted[key] = predict_step_flops(bench.train_config(cell), bench.batch_size, bench.seq_len)
            except ValueError:
                counted[key] = None
        r["flops_per_micro_batch"] = counted[key]


def _model_description(bench: BenchConfig) -> str:
    if bench.ckpt_dir:
        return f"checkpoint {bench.ckpt_dir}"
    return f"preset {bench.preset!r} (random weights)"


def run(bench: BenchConfig, bar: Any = None) -> list[dict[str, Any]]:
    """Every selected cell measured (or predicted), written to ``bench.out`` as each finishes; ``bar``: an object
    with tqdm's ``update``/``set_postfix_str``/``close`` told of each cell (the command line's progress bar)."""
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = bench.selected_cells()
    meta = {"mode": "predicted" if bench.predict else "measured", "model": _model_description(bench),
            "device": bench.device, "torch": torch.__version__,
            "peak_method": "MemTracker on FakeTensorMode" if bench.predict else
            ("cuda max_memory_allocated" if bench.device.startswith("cuda") else "MemTracker")}
    records: list[dict[str, Any]] = []

    def done(record: dict[str, Any]) -> dict[str, Any]:
        records.append(record)  # partial results survive an interrupted run
        write_json(out / "bench.json", {"config": dataclasses.asdict(bench), **meta, "cells": records})
        if bar is not None:
            bar.set_postfix_str(record["cell"])
            bar.update(1)
        return record

    if bench.predict:
        records = _predict_all(bench, cells, done)
    else:
        with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
            for cell in cells:
                done(_run_isolated(bench, cell, Path(tmp)) if bench.isolate else run_cell_in_process(bench, cell))
    if bar is not None:
        bar.close()
    if not bench.predict:
        _add_flops(bench, records)
    write_json(out / "bench.json", {"config": dataclasses.asdict(bench), **meta, "cells": records})
    write_markdown(out / "bench.md", bench, records, meta)
    if bench.plots:
        write_plots(out, records)
    return records
