"""``llama-bench``: the seed report's 16-cell benchmark (GA × GC × MP × LoRA), measured or predicted
(``llama_ref.perf.bench``); ``--run-cell`` is the child process of one isolated cell."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..perf import bench as _bench
from ..formats.atomic import write_json
from ..perf.bench import run
from ..perf.bench_cell import address_space, limit_memory, run_cell
from ..perf.bench_config import BenchConfig
from ..perf.cells import Cell
from ..perf.peak import MiB
from .options import dataclass_parser
from .progress import progress as make_progress


def build_parser() -> argparse.ArgumentParser:
    parser = dataclass_parser(BenchConfig, "llama-bench", _bench.__doc__.split("\n\n")[0])
    parser.add_argument("--run-cell", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    return parser


def _child(job: Path, result: Path) -> int:
    spec = json.loads(job.read_text())
    bench = BenchConfig(**spec["bench"])
    if bench.threads:
        torch.set_num_threads(bench.threads)
    start = address_space("VmSize")
    limit_memory(bench, start)  # this process only: it exists for this one cell
    record = run_cell(bench, Cell(**spec["cell"]))
    peak = address_space("VmPeak")
    if start is not None and peak is not None and not bench.device.startswith("cuda"):
        # What --memory-limit-mb limits on CPU: the address space the cell mapped beyond its start.
        record["address_space_mb"] = (peak - start) / MiB
    write_json(result, record)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    run_cell_args = ns.pop("run_cell")
    if run_cell_args:
        return _child(Path(run_cell_args[0]), Path(run_cell_args[1]))
    try:
        bench = BenchConfig(**ns)
    except ValueError as e:
        parser.error(str(e))
    if bench.threads:  # the cells run in this process (--no-isolate) or in children that set it again
        torch.set_num_threads(bench.threads)
    if bench.world_sizes():
        return _predict_world_sizes(bench)
    records = run(bench, make_progress(len(bench.selected_cells()), 0, bench.progress, unit="cell"))
    ok = sum(r["status"] == "ok" for r in records)
    print(f"llama-bench: {ok}/{len(records)} cells ok; wrote {Path(bench.out) / 'bench.json'} and bench.md")
    print((Path(bench.out) / "bench.md").read_text())
    return 0


def _predict_world_sizes(bench: BenchConfig) -> int:
    """The per-rank FSDP2 peak at each ``--world-size`` (the plain cell's configuration), printed and written to
    ``fsdp2.json``."""
    from ..perf.fsdp2_memory import predict_fsdp2_rank_memory
    cfg = bench.train_config(Cell(False, False, False, False))
    rows = []
    for n in bench.world_sizes():
        r = predict_fsdp2_rank_memory(cfg, bench.batch_size, bench.seq_len, n)
        rows.append({"world_size": n, "peak_mb": r.peak_mb, "breakdown_mb": r.breakdown_mb})
    print(f"llama-bench: FSDP2 per-rank peak, predicted ({cfg.preset}, {cfg.optimizer}, batch {bench.batch_size} x "
          f"{bench.seq_len} per rank, fp32)")
    print(f"{'ranks':>5}  {'MiB per rank':>13}  breakdown")
    for row in rows:
        parts = ", ".join(f"{k} {v:,.1f}" for k, v in row["breakdown_mb"].items() if v >= 0.05)
        print(f"{row['world_size']:>5}  {row['peak_mb']:>13,.1f}  {parts}")
    Path(bench.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(bench.out) / "fsdp2.json", {"config": dict(preset=cfg.preset, optimizer=cfg.optimizer,
                                                                 batch_size=bench.batch_size, seq_len=bench.seq_len),
                                                 "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
