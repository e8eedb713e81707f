"""``llama-bench``: the seed report's 16-cell benchmark (GA × GC × MP × LoRA), measured or predicted, with where the
memory goes.

Measured (default): every cell trains ``--steps`` micro-batches in its own Python process (a fresh allocator: no
cell's memory or cache leaks into the next; ``--no-isolate``: one after the other in this process), on the bundled
instruction set packed into ``--batch-size`` × ``--seq-len`` blocks (or on synthetic tokens when the model's
vocabulary is not the bundled tokenizer's). Peak memory:
the CUDA allocator's ``max_memory_allocated`` on CUDA; on CPU torch's MemTracker over one more accumulation window
after the timed ones (which also gives the breakdown on both devices). A cell that runs out of memory is recorded as
``OOM`` and the run goes on. ``--predict``: the same table from fake tensors (``llama_ref.memory``), any shape, any
device, nothing allocated.

Writes ``--out DIR``: ``bench.json`` (one record per cell), ``bench.md`` (the seed's two tables, the breakdown, and the
seed's qualitative "Performance Analysis" table measured) and, with matplotlib, ``loss_curves.png`` and
``memory_breakdown.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from .bench_report import BREAKDOWN, CELLS, Cell, write_markdown, write_plots
from .finetune import TrainConfig, _progress, check_choices, dataclass_parser, option

MiB = 2 ** 20


@dataclass
class BenchConfig:
    preset: str = option("model preset (ignored with --ckpt-dir)", default="bench")
    ckpt_dir: Optional[str] = option("Meta checkpoint directory (needs --tokenizer)", default=None)
    tokenizer: Optional[str] = option("tokenizer.model of --ckpt-dir", default=None)
    steps: int = option("micro-batches per cell (the seed's steps; a GA cell takes steps / ga optimizer steps)",
                        default=32)
    batch_size: int = option("sequences per micro-batch", default=4)
    seq_len: int = option("tokens per sequence", default=256)
    ga: int = option("micro-batches per optimizer step in the GA cells (the seed used 8)", default=8)
    mp: str = option("the half dtype of the MP cells", default="bf16", choices=("bf16", "fp16"))
    gc_policy: str = option("which blocks the GC cells recompute: all, seed or every:K", default="all")
    loss_chunk: int = option("loss computed this many positions at a time in every cell (0: full logits)", default=0)
    optimizer: str = option("optimizer (the seed's peaks are plain SGD's)", default="sgd", choices=("sgd", "adamw"))
    lr: float = option("learning rate (with clipping at 1, SGD moves at most this far per step)", default=0.5)
    clip: float = option("clip the gradient norm to this (0: no clipping)", default=1.0)
    data: str = option("instructions: the bundled set packed into blocks; synthetic: seeded tokens from a "
                       "skewed distribution (any vocabulary); auto: instructions when the vocabulary allows",
                       default="auto", choices=("auto", "instructions", "synthetic"))
    cells: Optional[str] = option("comma-separated cells to run (default: all 16), e.g. plain,LoRA,GC+MP+LoRA",
                                  default=None)
    predict: bool = option("predict every cell on fake tensors instead of running it", default=False)
    jobs: Optional[int] = option("processes predicting cells in parallel (default: one per CPU)", default=None)
    device: str = option("torch device", default="cpu")
    threads: Optional[int] = option("torch CPU threads per cell", default=None)
    memory_limit_mb: Optional[float] = option("an allocation past this is an OOM: on CUDA, MiB of the device; on "
                                              "CPU, MiB of address space (RLIMIT_AS, which also counts allocator "
                                              "arenas and thread stacks) beyond what the cell's process maps at "
                                              "start (each CPU record's address_space_mb says how much it needed)",
                                              default=None)
    timeout: float = option("seconds per cell before it is stopped and recorded as timeout", default=1800.0)
    isolate: bool = option("run each measured cell in a process of its own (a fresh allocator: nothing of one cell "
                           "is left in the next); --no-isolate runs them one after the other in this process, "
                           "without the start-up cost of a process per cell (CPU peaks are MemTracker's count of "
                           "live tensors, so they do not change; --memory-limit-mb and --timeout need isolation)",
                           default=True)
    seed: int = option("seed of weights, data and LoRA init", default=0)
    out: str = option("output directory", default="bench-out")
    plots: bool = option("write PNG plots (needs matplotlib: pip install .[bench])", default=True)
    progress: bool = option("show a progress bar", default=True)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ga"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps % self.ga:
            raise ValueError(f"--steps {self.steps} must be a multiple of --ga {self.ga}: GA cells and the others "
                             "must train the same micro-batches for their runtimes to compare")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2 (the loss predicts token t+1 from token t), got {self.seq_len}")
        if self.loss_chunk < 0 or not self.lr > 0 or self.clip < 0 or not self.timeout > 0:
            raise ValueError("--loss-chunk and --clip must be >= 0, --lr and --timeout > 0")
        if self.memory_limit_mb is not None and not self.memory_limit_mb > 0:
            raise ValueError(f"--memory-limit-mb must be > 0, got {self.memory_limit_mb}")
        check_choices(self)
        if self.ckpt_dir and not self.tokenizer:
            raise ValueError("--ckpt-dir needs --tokenizer")
        if self.memory_limit_mb is not None and not self.isolate and not self.predict:
            raise ValueError("--memory-limit-mb needs isolated cells (it limits the cell's own process): drop "
                             "--no-isolate")
        self.selected_cells()  # validates --cells

    def selected_cells(self) -> list[Cell]:
        if not self.cells:
            return list(CELLS)
        wanted = [Cell.parse(name) for name in self.cells.split(",") if name.strip()]
        return [c for c in CELLS if c in wanted]

    def train_config(self, cell: Cell) -> TrainConfig:
        """llama-finetune's configuration of ``cell``."""
        return TrainConfig(preset=self.preset, ckpt_dir=self.ckpt_dir, tokenizer=self.tokenizer,
                           max_seq_len=self.seq_len, ga=self.ga if cell.ga else 1, mp=self.mp if cell.mp else "off",
                           lora=cell.lora, gc=cell.gc, gc_policy=self.gc_policy, loss_chunk=self.loss_chunk,
                           batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer, clip=self.clip,
                           seed=self.seed, device=self.device, threads=self.threads, progress=False)


# --- one measured cell (runs in its own process) ----------------------------------------------------------------

def _build(bench: BenchConfig, cfg: TrainConfig):
    from .args import ModelArgs
    from .finetune import build_model, prepare_for_training
    from .model import Transformer, init_weights
    from .tokenizer import Tokenizer, default_tokenizer_path

    if bench.ckpt_dir:
        model, tokenizer = build_model(cfg)
        return model, tokenizer
    args = ModelArgs.preset(bench.preset, max_seq_len=max(bench.seq_len, 2),
                            max_batch_size=bench.batch_size)
    tokenizer = Tokenizer(default_tokenizer_path())
    model = init_weights(Transformer(args), bench.seed).to(bench.device)
    return prepare_for_training(model, cfg), (tokenizer if tokenizer.n_words == args.vocab_size else None)


def packed_blocks(examples: Sequence[dict[str, torch.Tensor]], batch_size: int, seq_len: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """Examples concatenated (input_ids and their labels) and cut into (batch_size, seq_len) micro-batches, cycling
    through the examples as often as needed. A block may start inside an example; an example's first token is its
    BOS, whose label is IGNORE_INDEX, so no token is ever trained to predict the next example. A block without any
    target (all prompt) is skipped."""
    from .data import DataError, count_target_tokens

    ids = torch.cat([e["input_ids"] for e in examples])
    labels = torch.cat([e["labels"] for e in examples])
    n = batch_size * seq_len
    repeats = max(1, math.ceil(n / len(ids)))
    ids, labels = ids.repeat(repeats), labels.repeat(repeats)
    start, since_last = 0, 0
    while True:
        if start + n > len(ids):
            start = 0
        block = {"input_ids": ids[start:start + n].view(batch_size, seq_len),
                 "labels": labels[start:start + n].view(batch_size, seq_len)}
        start += n
        if count_target_tokens(block["labels"]) > 0:
            since_last = 0
            yield block
        else:
            since_last += n
            if since_last > len(ids) + n:
                raise DataError(f"no {batch_size} x {seq_len} block of the examples has a target token")


def synthetic_blocks(vocab: int, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Seeded tokens from a fixed Zipf-like distribution over (at most) the first 1,024 ids: a random model starts
    near or above log(vocab) and learns the distribution within a few steps, so the loss visibly falls."""
    support = min(vocab, 1024)
    weights = 1.0 / torch.arange(1, support + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.multinomial(weights, batch_size * seq_len, replacement=True, generator=g)
        tokens = tokens.view(batch_size, seq_len)
        yield {"input_ids": tokens, "labels": tokens.clone()}


def _micro_batches(bench: BenchConfig, tokenizer, vocab: int) -> tuple[str, Iterator[dict[str, torch.Tensor]]]:
    kind = bench.data
    if kind == "auto":
        kind = "instructions" if tokenizer is not None else "synthetic"
    if kind == "instructions":
        if tokenizer is None:
            raise ValueError("--data instructions needs a model whose vocabulary is the bundled tokenizer's "
                             f"({vocab} tokens here); use --data synthetic")
        from .data import InstructionDataset, default_dataset_path, load_records
        # Whole examples (packing, not truncation, fits them to the blocks).
        dataset = InstructionDataset(load_records(default_dataset_path()), tokenizer, 1 << 30)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(bench.seed)).tolist()
        return kind, packed_blocks([dataset[i] for i in order], bench.batch_size, bench.seq_len)
    return kind, synthetic_blocks(vocab, bench.batch_size, bench.seq_len, bench.seed)


def _limit_memory(bench: BenchConfig, mapped: Optional[int]) -> None:
    """Apply ``--memory-limit-mb`` to this process; ``mapped``: the bytes of address space it maps now (VmSize)."""
    if bench.memory_limit_mb is None:
        return
    if bench.device.startswith("cuda"):
        device = torch.device(bench.device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, bench.memory_limit_mb * MiB / total), index)
        return
    if mapped is None:
        raise ValueError("--memory-limit-mb on CPU needs Linux (/proc/self/status gives the address space)")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(bench.memory_limit_mb * MiB), resource.RLIM_INFINITY))


def _address_space(key: str) -> Optional[int]:
    """Bytes of this process's ``VmSize`` (mapped now) or ``VmPeak`` (mapped at most), from /proc (Linux only)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def measure_training(model: torch.nn.Module, cfg: TrainConfig, stream: Iterator[dict[str, torch.Tensor]],
                     micro_batches: int, *, memory: bool = True) -> dict[str, Any]:
    """Train ``model`` as ``cfg`` says on ``micro_batches`` micro-batches of ``stream`` (whole windows of ``cfg.ga``)
    and measure: window losses, runtime, tokens/s; then one more window under MemTracker for the breakdown. Peak:
    the CUDA allocator's since this call began (the model is already there), or MemTracker's on CPU.
    ``memory=False``: the losses, runtime and tokens/s only (no extra window; the record has no peak)."""
    from .memory import MemTrackerUnavailable, PeakTracker, _optimizer
    from .trainer import Trainer, windows

    optimizer = _optimizer(cfg, model)
    trainer = Trainer(model, optimizer, precision=cfg.mp, clip=cfg.clip or None,
                      device_type=torch.device(cfg.device).type, loss_chunk=cfg.loss_chunk or None)
    to_device = ({k: v.to(cfg.device) for k, v in b.items()} for b in stream)
    if micro_batches < cfg.ga or micro_batches % cfg.ga:
        raise ValueError(f"{micro_batches} micro-batches is not a whole number of windows of {cfg.ga}")
    n_windows = micro_batches // cfg.ga
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses, tokens, consumed = [], 0, 0
    t0 = time.perf_counter()
    for window in windows(to_device, cfg.ga):
        result = trainer.step(window)
        consumed += len(window)
        tokens += sum(b["input_ids"].numel() for b in window)
        losses.append({"micro_batches": consumed, "loss": result.loss, "grad_norm": result.grad_norm})
        if len(losses) == n_windows:
            break
    if cuda:
        torch.cuda.synchronize(device)
    runtime = time.perf_counter() - t0
    values = [r["loss"] for r in losses]
    record = dict(runtime_s=runtime, tokens_per_s=tokens / runtime if runtime > 0 else None,
                  micro_batches=consumed, optimizer_steps=len(losses), final_loss=values[-1],
                  avg_loss=sum(values) / len(values), losses=losses)
    if not memory:
        return record
    # One more window under MemTracker: the breakdown (and the peak on CPU), outside the timed loop.
    window = [next(to_device) for _ in range(cfg.ga)]
    try:
        tracker: Optional[PeakTracker] = PeakTracker(model, optimizer, window[0]["input_ids"], window[0]["labels"])
    except MemTrackerUnavailable:
        tracker = None
    with tracker if tracker is not None else contextlib.nullcontext():
        trainer.step(window)
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(device) / MiB, "cuda max_memory_allocated"
    elif tracker is not None:
        peak, method = tracker.peak_mb, "MemTracker"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    return dict(peak_mb=peak, peak_method=method,
                breakdown_mb=_pick(tracker.breakdown_mb) if tracker else {},
                category_peaks_mb=_pick(tracker.category_peaks_mb) if tracker else {}, **record)


def run_cell(bench: BenchConfig, cell: Cell) -> dict[str, Any]:
    """Build and train ``cell`` for ``bench.steps`` micro-batches in this process; return its record (status ``ok``,
    ``OOM``, ``nonfinite`` or ``error``: a failure is recorded, never raised)."""
    from .trainer import NonFiniteLossError

    cfg = bench.train_config(cell)
    record: dict[str, Any] = {**_cell_fields(cell), "status": "running"}
    if bench.threads:
        torch.set_num_threads(bench.threads)
    torch.manual_seed(bench.seed)
    try:
        model, tokenizer = _build(bench, cfg)
        record["data"], stream = _micro_batches(bench, tokenizer, model.vocab_size)
        record.update(status="ok", **measure_training(model, cfg, stream, bench.steps))
    except NonFiniteLossError as e:
        record.update(status="nonfinite", error=str(e))
    except Exception as e:  # noqa: BLE001 — every failure of a cell is recorded, never fatal to the run
        if _is_oom(e):
            record.update(status="OOM", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        else:
            record.update(status="error", error=f"{type(e).__name__}: {e}")
    return record


def _run_in_process(bench: BenchConfig, cell: Cell) -> dict[str, Any]:
    """``run_cell`` in this process, leaving its RNG state and thread count as they were."""
    threads = torch.get_num_threads()
    cuda = bench.device.startswith("cuda") and torch.cuda.is_available()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
            return run_cell(bench, cell)
    finally:
        torch.set_num_threads(threads)
        gc.collect()  # the cell's model and optimizer state, before the next cell measures
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pick(mb: dict[str, float]) -> dict[str, float]:
    picked = {k: mb.get(k, 0.0) for k in BREAKDOWN}
    picked["other"] += mb.get("buffer", 0.0)
    return picked


def _cell_fields(cell: Cell) -> dict[str, Any]:
    return {"cell": cell.name, "ga": cell.ga, "gc": cell.gc, "mp": cell.mp, "lora": cell.lora}


def _run_isolated(bench: BenchConfig, cell: Cell, workdir: Path) -> dict[str, Any]:
    """``run_cell`` in a child process; a crash, a kill or a timeout is a record too."""
    job, result = workdir / f"{cell.name}.job.json", workdir / f"{cell.name}.result.json"
    job.write_text(json.dumps({"bench": dataclasses.asdict(bench), "cell": dataclasses.asdict(cell)}))
    cmd = [sys.executable, "-m", "llama_ref.bench", "--run-cell", str(job), str(result)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=bench.timeout)
    except subprocess.TimeoutExpired:
        return {**_cell_fields(cell), "status": "timeout", "error": f"stopped after {bench.timeout:.0f} s"}
    if result.is_file():
        return json.loads(result.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if proc.returncode == -9:  # SIGKILL: on Linux, the kernel's OOM killer
        return {**_cell_fields(cell), "status": "OOM", "error": "killed by SIGKILL (out of memory)"}
    return {**_cell_fields(cell), "status": "error",
            "error": f"cell process exited with {proc.returncode}: " + " | ".join(tail)}


# --- predicted cells ----------------------------------------------------------------------------------------------

def predict_cell(bench: BenchConfig, cell: Cell) -> dict[str, Any]:
    """``cell``'s memory and FLOPs predicted on fake tensors; a bad shape is an ``error`` record."""
    from .memory import predict_step_flops, predict_step_memory

    cfg = bench.train_config(cell)
    record: dict[str, Any] = {**_cell_fields(cell)}
    try:
        report = predict_step_memory(cfg, bench.batch_size, bench.seq_len)
        flops = predict_step_flops(cfg, bench.batch_size, bench.seq_len)
    except ValueError as e:
        return {**record, "status": "error", "error": str(e)}
    return {**record, "status": "ok", "peak_mb": report.peak_mb, "peak_method": report.method,
            "breakdown_mb": _pick(report.breakdown_mb), "category_peaks_mb": _pick(report.category_peaks_mb),
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
    cells have 4 (GC x LoRA) — checked equal across GA and MP in tests/test_bench.py."""
    from .memory import predict_step_flops
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


def _write_json(path: Path, data: Any) -> None:
    from .finetune import _write_atomic
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def _model_description(bench: BenchConfig) -> str:
    if bench.ckpt_dir:
        return f"checkpoint {bench.ckpt_dir}"
    return f"preset {bench.preset!r} (random weights)"


def run(bench: BenchConfig) -> list[dict[str, Any]]:
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = bench.selected_cells()
    meta = {"mode": "predicted" if bench.predict else "measured", "model": _model_description(bench),
            "device": bench.device, "torch": torch.__version__,
            "peak_method": "MemTracker on FakeTensorMode" if bench.predict else
            ("cuda max_memory_allocated" if bench.device.startswith("cuda") else "MemTracker")}
    records: list[dict[str, Any]] = []
    bar = _progress(len(cells), 0, bench.progress, unit="cell")

    def done(record: dict[str, Any]) -> dict[str, Any]:
        records.append(record)  # partial results survive an interrupted run
        _write_json(out / "bench.json", {"config": dataclasses.asdict(bench), **meta, "cells": records})
        bar.set_postfix_str(record["cell"])
        bar.update(1)
        return record

    if bench.predict:
        records = _predict_all(bench, cells, done)
    else:
        with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
            for cell in cells:
                done(_run_isolated(bench, cell, Path(tmp)) if bench.isolate else _run_in_process(bench, cell))
    bar.close()
    if not bench.predict:
        _add_flops(bench, records)
    _write_json(out / "bench.json", {"config": dataclasses.asdict(bench), **meta, "cells": records})
    write_markdown(out / "bench.md", bench, records, meta)
    if bench.plots:
        write_plots(out, records)
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = dataclass_parser(BenchConfig, "llama-bench", __doc__.split("\n\n")[0])
    parser.add_argument("--run-cell", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    return parser


def _child(job: Path, result: Path) -> int:
    spec = json.loads(job.read_text())
    bench = BenchConfig(**spec["bench"])
    start = _address_space("VmSize")
    _limit_memory(bench, start)  # this process only: it exists for this one cell
    record = run_cell(bench, Cell(**spec["cell"]))
    peak = _address_space("VmPeak")
    if start is not None and peak is not None and not bench.device.startswith("cuda"):
        # What --memory-limit-mb limits on CPU: the address space the cell mapped beyond its start.
        record["address_space_mb"] = (peak - start) / MiB
    _write_json(result, record)
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
    records = run(bench)
    ok = sum(r["status"] == "ok" for r in records)
    print(f"llama-bench: {ok}/{len(records)} cells ok; wrote {Path(bench.out) / 'bench.json'} and bench.md")
    print((Path(bench.out) / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
