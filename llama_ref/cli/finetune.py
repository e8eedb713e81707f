"""``llama-finetune``: the seed report's training run (``--ga``, ``--mp``, ``--lora``, ``--gc``), done right.

One ``TrainConfig`` dataclass is the single source of the options: the command line is generated from its fields,
so defaults cannot drift between the two. Logging reports the *true* window loss (never the loss divided by the
accumulation steps), and ``--out DIR`` receives ``metrics.json``, the result (a Meta checkpoint, or a LoRA adapter)
and ``train_state.pt`` for ``--resume``, each written atomically.
"""
from __future__ import annotations
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..formats.atomic import atomic_write
from ..generation import SEED_PROMPTS, Llama
from ..lora import count_parameters
from ..model import Transformer
from ..perf.peak import MemTrackerUnavailable, PeakTracker, peak_memory_mb
from ..tokenizer import Tokenizer
from ..train.config import TrainConfig, build_model
from ..train.data import DataError, InstructionDataset, collate, default_dataset_path, load_records
from ..train.optim import make_optimizer, make_scheduler
from ..train.rng import seeded
from ..train.trainer import PRECISIONS, Batch, NonFiniteLossError, Trainer, windows
from .options import dataclass_parser
from .progress import progress as make_progress


EXIT_OOM, EXIT_NONFINITE = 3, 4


STATE_FILE, METRICS_FILE = "train_state.pt", "metrics.json"


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from TrainConfig's fields (names, types, defaults, help, choices)."""
    return dataclass_parser(TrainConfig, "llama-finetune", __doc__.split("\n\n")[0])


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(ns))
    except ValueError as e:
        parser.error(str(e))


def micro_batches(dataset: InstructionDataset, cfg: TrainConfig, pad_id: int) -> Iterator[Batch]:
    """Every epoch's examples in an order drawn from ``seed + epoch`` (not the global RNG), ``batch_size`` at a time."""
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        for i in range(0, len(order), cfg.batch_size):
            batch = collate([dataset[j] for j in order[i:i + cfg.batch_size]], pad_id)
            yield {k: v.to(cfg.device) for k, v in batch.items()}


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


def _samples(model: Transformer, tokenizer: Tokenizer, label: str) -> None:
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


def _state(model: Transformer, trainer: Trainer, step: int, cfg: TrainConfig,
           losses: list[dict[str, Any]]) -> dict[str, Any]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        "config": dataclasses.asdict(cfg), "step": step,
        "losses": losses,  # the whole run's history, so that a resumed run's metrics.json holds every step
        "model": {k: v for k, v in model.state_dict().items() if not cfg.lora or k in trainable},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


# Options that may differ between a run and its resumption; every other one must match.
_RESUMABLE = {"stop_after", "out", "resume", "log_every", "sample", "progress", "device", "threads"}


def _config_differences(saved: dict[str, Any], cfg: TrainConfig) -> Optional[str]:
    """The options (other than those a resumption may change) that ``saved`` has otherwise, or None."""
    differ = [k for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE and saved.get(k) != v]
    return ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in differ) or None


def _restore(path: Path, model: Transformer, trainer: Trainer, cfg: TrainConfig) -> tuple[int, list[dict[str, Any]]]:
    """Load ``path`` into the run; the step it was written after and the window losses of the steps before."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (run once with --out {path.parent} first)")
    state = torch.load(path, map_location=cfg.device, weights_only=True)
    differ = _config_differences(state["config"], cfg)
    if differ:
        raise ValueError(f"--resume: {path} was written with other options: {differ}")
    model.load_state_dict(state["model"], strict=not cfg.lora)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state.get("losses", []))  # a state of an earlier version has no history


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; return the metrics (also written to ``--out``). Raises NonFiniteLossError and
    out-of-memory errors after recording them in ``metrics.json`` (``main`` turns them into exit codes). Draws from
    ``cfg.seed``, leaving the caller's random state as it was; ``cfg.threads`` is applied by ``main``. With
    ``--dist``, every rank of torchrun's process group runs this; rank 0 alone prints and writes."""
    with _process_group(cfg) as (rank, world), seeded(cfg.seed, cfg.device):
        return _run(cfg, rank, world)


@contextlib.contextmanager
def _process_group(cfg: TrainConfig) -> Iterator[tuple[int, int]]:
    """(rank, world size): torchrun's process group for ``--dist`` (destroyed on exit; the other ranks' output
    silenced), else (0, 1)."""
    if cfg.dist == "off":
        yield 0, 1
        return
    import torch.distributed as dist
    from ..train.distributed import DistributedError, init_from_env
    rank, world = init_from_env(torch.device(cfg.device).type)
    _RAN.append(rank)
    try:
        with contextlib.ExitStack() as quiet:
            if rank != 0:
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            yield rank, world
        dist.barrier()  # no rank tears its group down while another still writes (rank 0) or gathers
    except DistributedError as e:  # raised alike on every rank, before any collective of the step
        print(f"llama-finetune: error: {e}", file=sys.stderr, flush=True)
        e.printed = True  # type: ignore[attr-defined]
        dist.barrier()  # every rank has said it before any exits (torchrun stops the others at the first exit)
        raise
    finally:
        dist.destroy_process_group()


_RAN: list[int] = []  # the ranks this process ran as (in a process group): see __main__ below


def _run(cfg: TrainConfig, rank: int = 0, world: int = 1) -> dict[str, Any]:
    out = Path(cfg.out) if cfg.out and rank == 0 else None  # rank 0 writes
    if out:
        out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"config": dataclasses.asdict(cfg), "status": "running", "losses": []}
    model, tokenizer = build_model(cfg)
    trainable, total, percent = count_parameters(model)
    metrics["parameters"] = {"trainable": trainable, "total": total, "percent": percent}
    dataset = InstructionDataset(load_records(cfg.data or default_dataset_path()), tokenizer,
                                 cfg.max_seq_len or model.params.max_seq_len)
    n_micro = cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)
    window_size = cfg.ga * world  # every rank takes its --ga micro-batches of each window
    total_steps = min(math.ceil(n_micro / window_size), cfg.max_steps or sys.maxsize)
    device_type = torch.device(cfg.device).type
    net, trainer_cls, precision = model, Trainer, cfg.mp
    if cfg.dist != "off":
        from ..train.distributed import DistributedTrainer, wrap
        fsdp_half = PRECISIONS[cfg.mp] if cfg.dist == "fsdp2" else None  # FSDP2's MixedPrecisionPolicy, no autocast
        net = wrap(model, cfg.dist, device_type=device_type, mp=fsdp_half)
        trainer_cls, precision = DistributedTrainer, ("off" if fsdp_half is not None else cfg.mp)
    optimizer = make_optimizer(cfg, model)  # after wrapping: FSDP2 replaces the parameters
    trainer = trainer_cls(net, optimizer, scheduler=make_scheduler(optimizer, cfg.schedule, total_steps,
                                                                   cfg.warmup_steps),
                          precision=precision, clip=cfg.clip or None, device_type=device_type,
                          loss_chunk=cfg.loss_chunk or None)
    start = 0
    if cfg.resume and cfg.dist != "off":
        from . import dist_state
        start, metrics["losses"] = dist_state.restore(Path(cfg.out), model, trainer,
                                                      lambda saved: _config_differences(saved, cfg))
        metrics["resumed_at_step"] = start
    elif cfg.resume:
        start, metrics["losses"] = _restore(out / STATE_FILE, model, trainer, cfg)
        metrics["resumed_at_step"] = start
    print(f"llama-finetune: {total_steps} steps of {cfg.ga} x {cfg.batch_size} sequences"
          + (f" on each of {world} ranks ({cfg.dist})" if cfg.dist != "off" else "") + "; "
          f"trainable {trainable:,} of {total:,} parameters ({percent:.4f} %); mp={cfg.mp} lora={cfg.lora} "
          f"gc={cfg.gc_policy if cfg.gc else 'off'}")
    if cfg.sample:
        _samples(model, tokenizer, "before training")

    progress = make_progress(total_steps, start, cfg.progress and rank == 0)  # one bar, rank 0's
    pad_id = max(tokenizer.pad_id, 0)
    if world > 1:  # every window the run trains must give each rank a micro-batch: said now, not at that step
        from ..train.distributed import split_window
        last = min(window_size, n_micro - (total_steps - 1) * window_size)
        split_window([None] * last, rank, world)  # DistributedError on every rank alike
    n_input_tokens, step, t0 = 0, start, time.perf_counter()
    try:
        for index, window in enumerate(windows(micro_batches(dataset, cfg, pad_id), window_size)):
            if index < start:
                continue  # already trained before --resume: the data order is a function of the seed
            if step >= total_steps or (cfg.stop_after is not None and step >= cfg.stop_after):
                break
            try:
                with _step_tracker(model, optimizer, window, step if world == 1 else -1, metrics):
                    result = trainer.step(window)
            except NonFiniteLossError as e:
                metrics["status"] = "nonfinite"
                metrics["error"] = (f"step {step + 1}: {e}; kept the state after step {step} (the last update "
                                    f"applied; its weights gave this loss)")
                raise
            step += 1
            n_input_tokens += sum(int(b["lengths"].sum()) for b in window)
            grad_norm = result.grad_norm if result.grad_norm is None or math.isfinite(result.grad_norm) else None
            metrics["losses"].append({"step": step, "loss": result.loss, "tokens": result.n_tokens,  # strict JSON:
                                      "lr": result.lr, "grad_norm": grad_norm, "skipped": result.skipped})  # no inf
            if step % cfg.log_every == 0 or step == total_steps:
                progress.write(f"step {step}/{total_steps}: loss {result.loss:.4f} (lr {result.lr:.2e}"
                               + (", skipped by GradScaler" if result.skipped else "") + ")")
            progress.update(1)
        metrics["status"] = "ok"
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        metrics["status"] = "oom"
        metrics["error"] = f"out of memory at step {step + 1}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        raise
    finally:
        progress.close()
        elapsed = time.perf_counter() - t0
        mem, mem_kind = peak_memory_mb(cfg.device)
        losses = [r["loss"] for r in metrics["losses"]]
        metrics.update(steps=step, runtime_s=elapsed, peak_memory_mb=mem, peak_memory_kind=mem_kind,
                       avg_loss=sum(losses) / len(losses) if losses else None,
                       tokens_per_s=n_input_tokens / elapsed if elapsed > 0 else None)
        resumable = metrics["status"] in ("ok", "nonfinite")
        if resumable and cfg.out and cfg.dist != "off":  # every rank writes its shards
            from . import dist_state
            dist_state.save(Path(cfg.out), model, trainer, step,
                            {"config": dataclasses.asdict(cfg), "losses": metrics["losses"]})
        if out:
            if resumable and cfg.dist == "off":
                state = _state(model, trainer, step, cfg, metrics["losses"])
                atomic_write(out / STATE_FILE, lambda f: torch.save(state, f))
            atomic_write(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    if metrics["status"] == "ok":
        print(f"Avg Loss: {metrics['avg_loss']:.4f}")
        print(f"Training time: {elapsed:.2f} s")
        print(f"Peak memory usage: {mem:.1f} MB ({mem_kind})")
        if "step_memory" in metrics:
            sm = metrics["step_memory"]
            print(f"Step {sm['step']} tensors (MemTracker): {sm['peak_mb']:.1f} MiB at its peak: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sm["breakdown_mb"].items() if v >= 0.05))
        print(f"Trainable parameters: {trainable:,} / {total:,} ({percent:.4f} %)")
        print(f"Tokens/s: {metrics['tokens_per_s']:.1f}")
        if cfg.sample:
            _samples(model, tokenizer, "after training")
    if metrics["status"] == "ok" and cfg.out:
        _save_result(model, Path(cfg.out), cfg, rank)
    return metrics


def _save_result(model: Transformer, out: Path, cfg: TrainConfig, rank: int = 0) -> None:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        run(cfg)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        print(f"llama-finetune: OUT OF MEMORY: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return EXIT_OOM
    except NonFiniteLossError as e:
        print(f"llama-finetune: stopped, non-finite loss: {e}; the last good state was kept"
              + (f" in {Path(cfg.out) / STATE_FILE}" if cfg.out else ""), file=sys.stderr)
        return EXIT_NONFINITE
    except (DataError, FileNotFoundError, ValueError) as e:
        if not getattr(e, "printed", False):
            print(f"llama-finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    if _RAN:
        # A rank under torchrun, its process group destroyed and every file written: leave without the interpreter's
        # teardown, where a gloo/FSDP2 thread still joinable aborted the process ("terminate called without an
        # active exception", SIGABRT) in about 1 of 10 FSDP2 runs on a loaded CPU — after the run had completed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
