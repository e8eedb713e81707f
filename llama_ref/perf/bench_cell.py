"""One measured cell of llama-bench: the model built as llama-finetune builds it, its micro-batches (the bundled
instructions packed into blocks, or synthetic tokens), trained and measured in this process; a failure is a record."""
from __future__ import annotations

import contextlib
import gc
import math
import resource
import time
from typing import Any, Iterator, Optional, Sequence

import torch

from ..loss import count_target_tokens
from ..train.config import TrainConfig, build_model, make_trainer
from ..train.data import DataError, InstructionDataset, default_dataset_path, load_records
from ..train.rng import seeded
from ..train.trainer import NonFiniteLossError, windows
from .bench_config import BenchConfig
from .cells import Cell, breakdown
from .peak import MiB, MemTrackerUnavailable, PeakTracker, peak_memory_mb


def packed_blocks(examples: Sequence[dict[str, torch.Tensor]], batch_size: int, seq_len: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """Examples concatenated (input_ids and their labels) and cut into (batch_size, seq_len) micro-batches, cycling
    through the examples as often as needed. A block may start inside an example; an example's first token is its
    BOS, whose label is IGNORE_INDEX, so no token is ever trained to predict the next example. A block without any
    target (all prompt) is skipped."""
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
        # Whole examples (packing, not truncation, fits them to the blocks).
        dataset = InstructionDataset(load_records(default_dataset_path()), tokenizer, 1 << 30)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(bench.seed)).tolist()
        return kind, packed_blocks([dataset[i] for i in order], bench.batch_size, bench.seq_len)
    return kind, synthetic_blocks(vocab, bench.batch_size, bench.seq_len, bench.seed)


def limit_memory(bench: BenchConfig, mapped: Optional[int]) -> None:
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


def address_space(key: str) -> Optional[int]:
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
    trainer = make_trainer(cfg, model, one_process=True)
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
        tracker: Optional[PeakTracker] = PeakTracker(model, trainer.optimizer, window[0]["input_ids"], window[0]["labels"])
    except MemTrackerUnavailable:
        tracker = None
    with tracker if tracker is not None else contextlib.nullcontext():
        trainer.step(window)
    if tracker is not None and not cuda:
        peak, method = tracker.peak_mb, "MemTracker"
    else:  # the CUDA allocator's peak since this call began, or (no MemTracker on CPU) the process's peak RSS
        peak, method = peak_memory_mb(cfg.device)
    return dict(peak_mb=peak, peak_method=method,
                breakdown_mb=breakdown(tracker.breakdown_mb) if tracker else {},
                category_peaks_mb=breakdown(tracker.category_peaks_mb) if tracker else {}, **record)


def run_cell(bench: BenchConfig, cell: Cell) -> dict[str, Any]:
    """Build and train ``cell`` for ``bench.steps`` micro-batches in this process; return its record (status ``ok``,
    ``OOM``, ``nonfinite`` or ``error``: a failure is recorded, never raised)."""
    cfg = bench.train_config(cell)
    record: dict[str, Any] = {**cell.record_fields(), "status": "running"}
    try:
        with seeded(bench.seed, bench.device):
            model, tokenizer = build_model(cfg, require_tokenizer=False)
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


def run_cell_in_process(bench: BenchConfig, cell: Cell) -> dict[str, Any]:
    """``run_cell`` in this process (its random state is forked: the caller's is left as it was), then the cell's
    model and optimizer state released before the next cell measures."""
    try:
        return run_cell(bench, cell)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

