"""The seed report's table (its figures for each of the 16 cells, its qualitative "Performance Analysis") and llama-bench's
reports of it: ``bench.md`` in the seed's layout with the breakdown and the analysis measured, and the PNG plots."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Optional

from ..formats.atomic import atomic_write
from .bench_config import BenchConfig
from .cells import BREAKDOWN, CELLS, Cell

# The seed report's figures (MB, s); None: out of memory ("x").
SEED_TABLE: dict[Cell, tuple[Optional[float], Optional[float]]] = dict(zip(CELLS, [
    (13993.84, 38.02), (7523.20, 22.64), (None, None), (9630.22, 27.00),
    (13358.04, 40.99), (6864.00, 29.13), (None, None), (7958.86, 39.57),
    (11624.06, 35.79), (7521.13, 22.71), (11624.91, 50.50), (9620.55, 27.07),
    (11623.09, 41.23), (6857.48, 28.48), (11623.79, 57.52), (7954.38, 34.54),
]))

# The seed's qualitative "Performance Analysis" table: technique -> row -> arrow.
SEED_ANALYSIS = {
    "GA": {"parameter": "—", "activation": "↓", "gradient": "↑", "optimizer state": "↑", "FLOPs": "—",
           "runtime": "↑"},
    "GC": {"parameter": "—", "activation": "↓", "gradient": "↑", "optimizer state": "—", "FLOPs": "↑",
           "runtime": "↑"},
    "MP": {"parameter": "—", "activation": "↓", "gradient": "↓", "optimizer state": "↓", "FLOPs": "—",
           "runtime": "↓"},
    "LoRA": {"parameter": "↓", "activation": "—", "gradient": "↓", "optimizer state": "↓", "FLOPs": "—",
             "runtime": "—"},
}


def _fmt(value: Optional[float], status: str = "ok", digits: int = 2) -> str:
    if status == "OOM":
        return "OOM"
    if status != "ok" or value is None:
        return status if status != "ok" else "—"
    return f"{value:,.{digits}f}"


def seed_layout(records: dict[Cell, dict[str, Any]], ga: bool, title: str, runtime: bool = True) -> str:
    """One of the seed's tables: GC / MP / LoRA header rows, Peak Mem (MB) and Runtime (secs) rows."""
    cells = [c for c in CELLS if c.ga == ga]
    onoff = lambda v: "ON" if v else "OFF"  # noqa: E731
    lines = [f"### {title}", "",
             "| GC | " + " | ".join(onoff(c.gc) for c in cells) + " |",
             "|---|" + "---|" * len(cells),
             "| **MP** | " + " | ".join(onoff(c.mp) for c in cells) + " |",
             "| **LoRA** | " + " | ".join(onoff(c.lora) for c in cells) + " |"]
    row = lambda key: [_fmt(records[c].get(key), records[c]["status"]) if c in records else "not run"  # noqa: E731
                       for c in cells]
    lines.append("| **Peak Mem (MB)** | " + " | ".join(row("peak_mb")) + " |")
    if runtime:
        lines.append("| **Runtime (secs)** | " + " | ".join(row("runtime_s")) + " |")
    return "\n".join(lines) + "\n"


def breakdown_table(records: list[dict[str, Any]]) -> str:
    head = "| cell | " + " | ".join(BREAKDOWN) + " | peak MiB | FLOPs / micro-batch |"
    lines = [head, "|---|" + "---|" * (len(BREAKDOWN) + 2)]
    for r in records:
        b = r.get("breakdown_mb") or {}
        flops = r.get("flops_per_micro_batch")
        lines.append(f"| {r['cell']} | " + " | ".join(_fmt(b.get(k), r["status"], 1) if b else "—" for k in BREAKDOWN)
                     + f" | {_fmt(r.get('peak_mb'), r['status'], 1)} | "
                     + (f"{flops / 1e9:,.2f} G" if flops else "—") + " |")
    return "\n".join(lines) + "\n"


def _ratio_arrow(ratio: float) -> str:
    return "↓" if ratio < 0.95 else "↑" if ratio > 1.05 else "—"


ANALYSIS_ROWS = ("parameter", "activation", "gradient", "optimizer state", "temporary", "peak", "FLOPs", "runtime")


def _value(record: dict[str, Any], row: str) -> Optional[float]:
    if row == "peak":
        return record.get("peak_mb")
    if row == "FLOPs":
        return record.get("flops_per_micro_batch")
    if row == "runtime":
        return record.get("runtime_s")
    return (record.get("category_peaks_mb") or {}).get(row)


def analysis(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The seed's qualitative table, measured: for each technique and quantity, the on/off ratios over every pair
    of finished cells that differ only in that technique (memory categories: each category's own peak), their
    median and range, the arrow the median gives (↓ below 0.95, ↑ above 1.05), and the seed's arrow."""
    by_cell = {Cell.parse(r["cell"]): r for r in records if r["status"] == "ok"}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for tech in ("GA", "GC", "MP", "LoRA"):
        out[tech] = {}
        for row in ANALYSIS_ROWS:
            ratios, zero_pairs = [], 0
            for off, record in by_cell.items():
                on = dataclasses.replace(off, **{tech.lower(): True})
                if getattr(off, tech.lower()) or on not in by_cell:
                    continue
                a, b = _value(record, row), _value(by_cell[on], row)
                if a is None or b is None:
                    continue
                if a == 0 and b == 0:
                    zero_pairs += 1
                else:
                    ratios.append(b / a if a > 0 else math.inf)
            ratios.sort()
            median = ratios[len(ratios) // 2] if len(ratios) % 2 else (
                (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2 if ratios else None)
            arrow = _ratio_arrow(median) if median is not None else ("—" if zero_pairs else "n/a")
            out[tech][row] = {"median": median, "range": (ratios[0], ratios[-1]) if ratios else None,
                              "pairs": len(ratios), "zero_pairs": zero_pairs, "arrow": arrow,
                              "seed": SEED_ANALYSIS[tech].get(row)}
    return out


def analysis_table(result: dict[str, dict[str, dict[str, Any]]]) -> str:
    techs = list(result)
    lines = ["| | " + " | ".join(techs) + " |", "|---|" + "---|" * len(techs)]
    for row in ANALYSIS_ROWS:
        cells = []
        for tech in techs:
            e = result[tech][row]
            if e["median"] is None:
                text = "— (0 in every pair)" if e["zero_pairs"] else "not measured"
            else:
                lo, hi = e["range"]
                text = f"{e['arrow']} ×{e['median']:.2f} ({lo:.2f}–{hi:.2f})"
            if e["seed"] is not None and e["median"] is not None:
                text += f"; seed {e['seed']}" + ("" if e["seed"] == e["arrow"] else " **wrong**")
            cells.append(text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, bench: BenchConfig, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    by_cell = {Cell.parse(r["cell"]): r for r in records}
    mode = "predicted" if bench.predict else "measured"
    parts = [f"# llama-bench ({mode})", "",
             f"Model: {meta['model']}; {bench.steps} micro-batches of {bench.batch_size} x {bench.seq_len} tokens "
             f"per cell; GA cells accumulate {bench.ga}; MP = {bench.mp}; optimizer {bench.optimizer}; "
             f"loss {_loss_path(bench)}; device {meta['device']}; torch {meta['torch']}. "
             f"Peak memory in MiB ({meta['peak_method']}).", ""]
    parts.append(seed_layout(by_cell, True, f"Performance Benchmark with Gradient Accumulation ({mode})",
                             runtime=not bench.predict))
    parts.append(seed_layout(by_cell, False, f"Performance Benchmark without Gradient Accumulation ({mode})",
                             runtime=not bench.predict))
    parts += ["### Where the memory is at the peak (MiB, MemTracker's categories)", "", breakdown_table(records)]
    parts += ["### Performance Analysis, measured", "",
              "On/off ratio of each quantity for each technique: the median (and range) over the pairs of cells "
              "that differ only in that technique; a memory category's value is its own peak during the step (not "
              "its share of the total peak); FLOPs are counted per micro-batch on fake tensors; ↓ below 0.95, ↑ "
              "above 1.05. The seed's claimed arrow follows, marked **wrong** where the measurement disagrees.",
              "", analysis_table(analysis(records))]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        parts += ["### Cells that did not finish", ""] + [f"- {r['cell']}: {r['status']} — {r.get('error', '')}"
                                                          for r in failed] + [""]
    atomic_write(path, "\n".join(parts))


def write_plots(out: Path, records: list[dict[str, Any]]) -> list[Path]:
    """``loss_curves.png`` (measured runs) and ``memory_breakdown.png``; [] when matplotlib is missing.

    matplotlib's object API (a ``Figure`` on its own Agg canvas): no backend chosen for the process, no pyplot
    state left behind."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("llama-bench: matplotlib is not installed (pip install .[bench]): no plots", file=sys.stderr)
        return []

    def save(fig: "Figure", name: str) -> Path:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        return atomic_write(out / name, lambda f: fig.savefig(f, format="png", dpi=100))

    written = []
    ok = [r for r in records if r["status"] == "ok"]
    curves = [r for r in ok if r.get("losses")]
    if curves:
        fig = Figure(figsize=(12, 4.5))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, ga in zip(axes, (True, False)):
            for r in (r for r in curves if r["ga"] == ga):
                ax.plot([p["micro_batches"] for p in r["losses"]], [p["loss"] for p in r["losses"]],
                        marker="o" if ga else None, ms=3, label=r["cell"])
            ax.set_title("with GA" if ga else "without GA")
            ax.set_xlabel("micro-batches")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("window loss (mean token cross-entropy)")
        written.append(save(fig, "loss_curves.png"))
    with_breakdown = [r for r in ok if r.get("breakdown_mb")]
    if with_breakdown:
        fig = Figure(figsize=(12, 5))
        ax = fig.subplots()
        names = [r["cell"] for r in with_breakdown]
        bottom = [0.0] * len(names)
        for k in BREAKDOWN:
            values = [r["breakdown_mb"].get(k, 0.0) for r in with_breakdown]
            ax.bar(names, values, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("MiB at the peak")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.legend()
        written.append(save(fig, "memory_breakdown.png"))
    return written


def _loss_path(bench: Any) -> str:
    """How the cells computed the loss: full logits, chunked, or fused (with its chunk size)."""
    if getattr(bench, "fused_loss", False):
        from ..loss import DEFAULT_LOSS_CHUNK
        return f"fused (chunks of {bench.loss_chunk or DEFAULT_LOSS_CHUNK})"
    return f"chunked ({bench.loss_chunk})" if bench.loss_chunk else "from full logits"
