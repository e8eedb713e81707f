"""One llama-finetune run in three parts: ``build`` (the model, data, trainer and resumed state as the options say),
``loop`` (the windows trained, each step logged) and ``finish`` (the records written whatever happened: metrics,
resumable state; then, after a run that ended well, the summary, the samples and the result). Under ``--dist`` every
rank runs all three; rank 0 alone prints and writes files that are not shards."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..formats.atomic import write_json
from ..generation import SEED_PROMPTS, Llama
from ..lora import count_parameters
from ..model import Transformer
from ..perf.peak import MemTrackerUnavailable, PeakTracker, peak_memory_mb
from ..tokenizer import Tokenizer
from ..train.config import TrainConfig, build_model, make_trainer
from ..train.data import DataError, InstructionDataset, collate, default_dataset_path, load_records
from ..train.packing import packed_micro_batches
from ..train.trainer import Batch, NonFiniteLossError, Trainer, windows
from . import resume
from .progress import progress as make_progress

METRICS_FILE = "metrics.json"


@dataclass
class Run:
    """What the three parts share: the options, this rank's place, what ``build`` made and what the loop counts."""
    cfg: TrainConfig
    rank: int
    world: int
    model: Transformer
    tokenizer: Tokenizer
    dataset: InstructionDataset
    trainer: Trainer
    metrics: dict[str, Any]
    n_micro: int  # micro-batches of the whole run (every epoch)
    total_steps: int
    start: int = 0  # the step a --resume continues after
    step: int = 0
    n_input_tokens: int = 0
    elapsed: float = 0.0
    parameters: tuple[int, int, float] = (0, 0, 0.0)  # trainable, total, percent

    @property
    def window_size(self) -> int:
        """Micro-batches per optimizer step: every rank takes its ``--ga`` of each window."""
        return self.cfg.ga * self.world

    @property
    def out(self) -> Optional[Path]:
        """Where rank 0 writes (``--out``); None on the other ranks and without ``--out``."""
        return Path(self.cfg.out) if self.cfg.out and self.rank == 0 else None


def example_batches(dataset: InstructionDataset, cfg: TrainConfig) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Every epoch's examples in an order drawn from ``seed + epoch`` (not the global RNG), ``batch_size`` at a time."""
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        for i in range(0, len(order), cfg.batch_size):
            yield [dataset[j] for j in order[i:i + cfg.batch_size]]


def micro_batches(dataset: InstructionDataset, cfg: TrainConfig, pad_id: int) -> Iterator[Batch]:
    """:func:`example_batches` padded on the right (``collate``), on the device."""
    for examples in example_batches(dataset, cfg):
        yield {k: v.to(cfg.device) for k, v in collate(examples, pad_id).items()}


def check_packable(dataset: InstructionDataset, cfg: TrainConfig, max_seq_len: int) -> None:
    """Before any step: ``--pack-len`` within the model's positions, and (without ``--split-long``) every example
    within a row — a DataError naming the first that is not by its index in the data file."""
    if cfg.pack_len is not None and cfg.pack_len > max_seq_len:
        raise ValueError(f"--pack-len {cfg.pack_len} exceeds the model's max_seq_len {max_seq_len}")
    row = cfg.pack_len or dataset.max_seq_len
    if cfg.split_long:
        return
    for i, example in enumerate(dataset.examples):
        if len(example["input_ids"]) > row:
            raise DataError(f"record {dataset.indices[i]} of the data has {len(example['input_ids'])} tokens, more "
                            f"than a packed row of {row} (--pack-len): raise --pack-len, or cut such examples "
                            "into pieces with --split-long")


def train_windows(dataset: InstructionDataset, cfg: TrainConfig, pad_id: int, size: int) -> Iterator[list[Batch]]:
    """The run's windows of ``size`` micro-batches; with ``--pack``, each window's examples (the same ones, in the
    same windows, as without it) packed into rows of ``--pack-len`` and dealt into at most ``size`` micro-batches
    (``llama_ref.train.packing``): its loss is the same mean over the same targets."""
    if not cfg.pack:
        yield from windows(micro_batches(dataset, cfg, pad_id), size)
        return
    seq_len = cfg.pack_len or dataset.max_seq_len
    for group in windows(example_batches(dataset, cfg), size):
        examples = [e for batch in group for e in batch]
        yield [{k: v.to(cfg.device) for k, v in b.items()}
               for b in packed_micro_batches(examples, seq_len, size, pad_id, split=cfg.split_long)]


def build(cfg: TrainConfig, rank: int = 0, world: int = 1) -> Run:
    """The run ``cfg`` describes on rank ``rank`` of ``world``: model, data, trainer (wrapped with ``--dist``),
    the state ``--resume`` continues from; the plan printed and, with ``--sample``, the untrained generations.
    A run whose last window cannot give every rank a micro-batch is a DistributedError here, on every rank."""
    if cfg.out and rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"config": dataclasses.asdict(cfg), "status": "running", "losses": []}
    model, tokenizer = build_model(cfg)
    trainable, total, percent = count_parameters(model)
    metrics["parameters"] = {"trainable": trainable, "total": total, "percent": percent}
    dataset = InstructionDataset(load_records(cfg.data or default_dataset_path()), tokenizer,
                                 cfg.max_seq_len or model.params.max_seq_len)
    if cfg.pack:
        check_packable(dataset, cfg, model.params.max_seq_len)
    n_micro = cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)
    total_steps = min(math.ceil(n_micro / (cfg.ga * world)), cfg.max_steps or sys.maxsize)
    trainer = make_trainer(cfg, model, total_steps=total_steps)
    run = Run(cfg, rank, world, model, tokenizer, dataset, trainer, metrics, n_micro, total_steps,
              parameters=(trainable, total, percent))
    if cfg.resume:
        run.start, metrics["losses"] = resume.restore(cfg, model, trainer)
        metrics["resumed_at_step"] = run.start
    print(f"llama-finetune: {total_steps} steps of {cfg.ga} x {cfg.batch_size} sequences"
          + (f" on each of {world} ranks ({cfg.dist})" if cfg.dist != "off" else "") + "; "
          f"trainable {trainable:,} of {total:,} parameters ({percent:.4f} %); mp={cfg.mp} lora={cfg.lora} "
          f"gc={cfg.gc_policy if cfg.gc else 'off'}")
    if cfg.sample:
        samples(model, tokenizer, "before training")
    if world > 1:  # every window the run trains must give each rank a micro-batch: said now, not at that step
        from ..train.distributed import split_window
        last = min(run.window_size, run.n_micro - (run.total_steps - 1) * run.window_size)
        split_window([None] * last, rank, world)  # DistributedError on every rank alike
    return run


def loop(run: Run) -> None:
    """Train the run's windows from ``run.start`` on, until the schedule's end or ``--stop-after``; ``run.metrics``
    gets each step's window loss and the status (``ok``; ``nonfinite`` or ``oom``, re-raised)."""
    cfg, metrics = run.cfg, run.metrics
    progress = make_progress(run.total_steps, run.start, cfg.progress and run.rank == 0)  # one bar, rank 0's
    pad_id = max(run.tokenizer.pad_id, 0)
    run.step, t0 = run.start, time.perf_counter()
    try:
        for index, window in enumerate(train_windows(run.dataset, cfg, pad_id, run.window_size)):
            if index < run.start:
                continue  # already trained before --resume: the data order is a function of the seed
            if run.step >= run.total_steps or (cfg.stop_after is not None and run.step >= cfg.stop_after):
                break
            try:
                with _step_tracker(run.model, run.trainer.optimizer, window,
                                   run.step if run.world == 1 else -1, metrics):
                    result = run.trainer.step(window)
            except NonFiniteLossError as e:
                metrics["status"] = "nonfinite"
                metrics["error"] = (f"step {run.step + 1}: {e}; kept the state after step {run.step} (the last "
                                    f"update applied; its weights gave this loss)")
                raise
            run.step += 1
            run.n_input_tokens += sum(int(b["lengths"].sum()) for b in window)
            grad_norm = result.grad_norm if result.grad_norm is None or math.isfinite(result.grad_norm) else None
            metrics["losses"].append({"step": run.step, "loss": result.loss, "tokens": result.n_tokens,  # strict
                                      "lr": result.lr, "grad_norm": grad_norm, "skipped": result.skipped})  # JSON
            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                progress.write(f"step {run.step}/{run.total_steps}: loss {result.loss:.4f} (lr {result.lr:.2e}"
                               + (", skipped by GradScaler" if result.skipped else "") + ")")
            progress.update(1)
        metrics["status"] = "ok"
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        metrics["status"] = "oom"
        metrics["error"] = (f"out of memory at step {run.step + 1}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise
    finally:
        progress.close()
        run.elapsed = time.perf_counter() - t0


def write_records(run: Run) -> None:
    """After the loop, however it ended: the run's totals into ``run.metrics``, the resumable state (after a whole
    step: status ``ok`` or ``nonfinite``) and ``metrics.json``."""
    cfg, metrics = run.cfg, run.metrics
    mem, mem_kind = peak_memory_mb(cfg.device)
    losses = [r["loss"] for r in metrics["losses"]]
    metrics.update(steps=run.step, runtime_s=run.elapsed, peak_memory_mb=mem, peak_memory_kind=mem_kind,
                   avg_loss=sum(losses) / len(losses) if losses else None,
                   tokens_per_s=run.n_input_tokens / run.elapsed if run.elapsed > 0 else None)
    if metrics["status"] in ("ok", "nonfinite") and cfg.out:
        resume.save(cfg, run.model, run.trainer, run.step, metrics["losses"], run.rank)
    if run.out:
        write_json(run.out / METRICS_FILE, metrics)


def finish(run: Run) -> None:
    """After a run that ended well: the summary, the trained generations with ``--sample``, the result in
    ``--out``."""
    cfg, metrics = run.cfg, run.metrics
    trainable, total, percent = run.parameters
    print(f"Avg Loss: {metrics['avg_loss']:.4f}")
    print(f"Training time: {run.elapsed:.2f} s")
    print(f"Peak memory usage: {metrics['peak_memory_mb']:.1f} MB ({metrics['peak_memory_kind']})")
    if "step_memory" in metrics:
        sm = metrics["step_memory"]
        print(f"Step {sm['step']} tensors (MemTracker): {sm['peak_mb']:.1f} MiB at its peak: "
              + ", ".join(f"{k} {v:.1f}" for k, v in sm["breakdown_mb"].items() if v >= 0.05))
    print(f"Trainable parameters: {trainable:,} / {total:,} ({percent:.4f} %)")
    print(f"Tokens/s: {metrics['tokens_per_s']:.1f}")
    if cfg.sample:
        samples(run.model, run.tokenizer, "after training")
    if cfg.out:
        save_result(run.model, Path(cfg.out), cfg, run.rank)


@contextlib.contextmanager
def _step_tracker(model: Transformer, optimizer: torch.optim.Optimizer, window: Sequence[Batch], step: int,
                  metrics: dict[str, Any]) -> Iterator[None]:
    """Around the second step of a run (the first that starts with the optimizer's state in place), torch's
    MemTracker: ``metrics["step_memory"]`` gets that step's peak and its split by category (MiB) — one step's, on
    its batch's length, not the run's peak (``peak_memory_mb``). Elsewhere, or without MemTracker (torch < 2.5),
    nothing."""
    tracker = None
    if step == 1:
        try:
            tracker = PeakTracker(model, optimizer, window[0]["input_ids"], window[0]["labels"])
        except MemTrackerUnavailable:
            pass
    if tracker is None:
        yield
        return
    with tracker:
        yield
    metrics["step_memory"] = {"step": step + 1, "peak_mb": tracker.peak_mb, "breakdown_mb": tracker.breakdown_mb}


def samples(model: Transformer, tokenizer: Tokenizer, label: str) -> None:
    """Print greedy generations on the seed's four prompts (``label``: before or after training); the model's mode
    and cache switch are left as they were."""
    was_training = model.training
    model.eval()
    model.kv_caching = True
    try:
        with torch.autocast(model.output.weight.device.type, enabled=False):
            preds = Llama(model, tokenizer).text_completion(list(SEED_PROMPTS), temperature=0.0, max_gen_len=24)
    finally:
        model.kv_caching = False
        model.train(was_training)
    print(f"--- generations {label} ---")
    for prompt, pred in zip(SEED_PROMPTS, preds):
        print(f"{prompt!r} -> {pred['generation']!r}")


def save_result(model: Transformer, out: Path, cfg: TrainConfig, rank: int = 0) -> None:
    """The trained model (a Meta checkpoint, or the LoRA adapter), written by rank 0; FSDP2's sharded parameters are
    gathered first (every rank takes part) into an unsharded copy."""
    if cfg.dist == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return
        model, _ = build_model(dataclasses.replace(cfg, dist="off"))
        model.load_state_dict(whole)
    if rank != 0:
        return
    if cfg.lora:
        from ..lora.adapter import save_adapter
        save_adapter(model, out / "adapter")
    else:
        from ..formats.meta import save_checkpoint
        save_checkpoint(model, out / "checkpoint")
