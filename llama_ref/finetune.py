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
import resource
import sys
import time
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from .args import ModelArgs
from .data import DataError, InstructionDataset, collate, default_dataset_path, load_records
from .generation import SEED_PROMPTS, Llama
from .lora import apply_lora_to_llama, count_parameters
from .model import Transformer, checkpoint_policy_layers, init_weights
from .tokenizer import Tokenizer, default_tokenizer_path
from .trainer import PRECISIONS, Batch, NonFiniteLossError, Trainer, make_scheduler, windows

EXIT_OOM, EXIT_NONFINITE = 3, 4
STATE_FILE, METRICS_FILE = "train_state.pt", "metrics.json"


def option(help: str, **kw: Any) -> Any:
    """A config field that is also a command-line flag (see ``dataclass_parser``): its default, help and choices."""
    return field(default=kw.pop("default"), metadata={"help": help, **kw})


def check_choices(config: Any) -> None:
    """ValueError naming the flag whose value is not among its field's ``choices``."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ValueError(f"--{f.name.replace('_', '-')} must be one of {choices}, got {getattr(config, f.name)!r}")


@dataclass
class TrainConfig:
    # model and data
    preset: str = option("model preset (ignored with --ckpt-dir)", default="tiny")
    ckpt_dir: Optional[str] = option("Meta checkpoint directory (params.json + consolidated.*.pth)", default=None)
    tokenizer: Optional[str] = option("tokenizer.model (default: the bundled SentencePiece model)", default=None)
    data: Optional[str] = option("Alpaca-style JSON/JSONL (default: the bundled instruction set)", default=None)
    max_seq_len: Optional[int] = option("truncate examples to this many tokens (default: the model's)", default=None)
    # the seed report's four techniques
    ga: int = option("micro-batches per optimizer step (gradient accumulation; the seed used 8)", default=1)
    mp: str = option("mixed precision", default="off", choices=tuple(PRECISIONS))
    half_base: Optional[bool] = option("with --mp and --lora, store the frozen base in the half dtype "
                                       "(default: on)", default=None)
    lora: bool = option("train LoRA adapters only", default=False)
    lora_r: int = option("LoRA rank", default=16)
    lora_alpha: float = option("LoRA alpha (scaling alpha / r)", default=32.0)
    lora_dropout: float = option("dropout on the LoRA branch input", default=0.05)
    lora_targets: str = option("comma-separated targets among wq,wk,wv,wo,w1,w2,w3", default="wq,wv")
    gc: bool = option("gradient checkpointing", default=False)
    gc_policy: str = option("which blocks: all, seed (i %% 3 != 0) or every:K", default="all")
    loss_chunk: int = option("compute the loss this many positions at a time, each chunk's logits recomputed in "
                             "backward instead of kept (0: full logits)", default=0)
    # optimisation
    batch_size: int = option("sequences per micro-batch", default=1)
    lr: float = option("learning rate", default=1e-3)
    optimizer: str = option("optimizer", default="adamw", choices=("sgd", "adamw"))
    weight_decay: float = option("AdamW weight decay", default=0.0)
    schedule: str = option("LR schedule", default="constant", choices=("constant", "linear", "cosine"))
    warmup_steps: int = option("linear warm-up steps", default=0)
    clip: float = option("clip the gradient norm to this (0: no clipping)", default=1.0)
    epochs: int = option("passes over the data", default=1)
    max_steps: Optional[int] = option("train for this many optimizer steps (the schedule's length)", default=None)
    stop_after: Optional[int] = option("end this invocation after this many steps, keeping the schedule of the "
                                       "whole run (continue later with --resume)", default=None)
    seed: int = option("seed of weights (presets), data order, LoRA init and dropout", default=0)
    device: str = option("torch device", default="cpu")
    threads: Optional[int] = option("torch CPU threads (default: torch's choice; 1 is fastest for tiny models on "
                                    "a busy machine)", default=None)
    # output
    out: Optional[str] = option("directory for metrics.json, the result and train_state.pt", default=None)
    resume: bool = option("continue from --out DIR/train_state.pt, bit-exactly", default=False)
    log_every: int = option("print the window loss every N steps", default=10)
    sample: bool = option("print greedy generations on the seed's four prompts before and after", default=False)
    progress: bool = option("show a progress bar", default=True)

    def __post_init__(self) -> None:
        if self.loss_chunk < 0:
            raise ValueError(f"--loss-chunk must be >= 0 (0: full logits), got {self.loss_chunk}")
        for name in ("ga", "batch_size", "epochs", "lora_r", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_seq_len", "stop_after", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("--clip, --warmup-steps and --weight-decay must be >= 0")
        check_choices(self)
        checkpoint_policy_layers(self.gc_policy, 1)  # validates the policy's syntax
        if self.half_base and not (self.lora and self.mp != "off"):
            raise ValueError("--half-base needs --lora and --mp fp16/bf16 (a trained weight must stay fp32)")
        if self.resume and not self.out:
            raise ValueError("--resume needs --out DIR holding train_state.pt")
        if self.ckpt_dir and not self.tokenizer:
            raise ValueError("--ckpt-dir needs --tokenizer")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from TrainConfig's fields (names, types, defaults, help, choices)."""
    return dataclass_parser(TrainConfig, "llama-finetune", __doc__.split("\n\n")[0])


def dataclass_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A command line with one ``--flag`` per field of the dataclass ``cls`` (declared with ``_opt``): bools as
    ``--x/--no-x``, ``Optional[T]`` as ``T``, choices and help from the field's metadata."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        kw: dict[str, Any] = dict(default=f.default, help=f.metadata["help"] + " (default: %(default)s)")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=base, choices=f.metadata.get("choices"), **kw)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(ns))
    except ValueError as e:
        parser.error(str(e))


# --- building the run ------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig) -> tuple[Transformer, Tokenizer]:
    tokenizer = Tokenizer(cfg.tokenizer or default_tokenizer_path())
    if cfg.ckpt_dir:
        from .checkpoint import load_model, load_params
        overrides: dict[str, Any] = dict(max_batch_size=max(cfg.batch_size, len(SEED_PROMPTS)))
        if cfg.max_seq_len:
            overrides["max_seq_len"] = cfg.max_seq_len
        if load_params(cfg.ckpt_dir).vocab_size == -1:
            overrides["vocab_size"] = tokenizer.n_words
        model = load_model(cfg.ckpt_dir, device=cfg.device, dtype=torch.float32, **overrides)
    else:
        args = ModelArgs.preset(cfg.preset, max_batch_size=max(cfg.batch_size, len(SEED_PROMPTS)),
                                **({"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}))
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(f"preset {cfg.preset!r} has vocab_size {args.vocab_size} but the tokenizer has "
                             f"{tokenizer.n_words} tokens; pass the model's own --tokenizer")
        model = init_weights(Transformer(args), cfg.seed).to(cfg.device)
    return prepare_for_training(model, cfg), tokenizer


def prepare_for_training(model: Transformer, cfg: TrainConfig) -> Transformer:
    """What ``cfg`` does to a model before training, in place: cache off, LoRA (fp32 adapters; the frozen base in
    the half dtype with ``--mp``), gradient checkpointing, train mode."""
    model.kv_caching = False  # training never uses the cache
    if cfg.lora:
        apply_lora_to_llama(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets,
                            merge_weights=False, lora_dtype=torch.float32)
        if PRECISIONS[cfg.mp] is not None and cfg.half_base is not False:
            half_frozen_base(model, PRECISIONS[cfg.mp])
    if cfg.gc:
        model.set_gradient_checkpointing(cfg.gc_policy)
    return model.train()


def half_frozen_base(model: Transformer, half: torch.dtype) -> Transformer:
    """Store every frozen parameter in ``half``, in place (trainable ones keep their dtype): the frozen base of
    ``--mp --lora`` takes half the bytes, and autocast would cast it to ``half`` for every matmul anyway."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(half)
    return model


def micro_batches(dataset: InstructionDataset, cfg: TrainConfig, pad_id: int) -> Iterator[Batch]:
    """Every epoch's examples in an order drawn from ``seed + epoch`` (not the global RNG), ``batch_size`` at a time."""
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        for i in range(0, len(order), cfg.batch_size):
            batch = collate([dataset[j] for j in order[i:i + cfg.batch_size]], pad_id)
            yield {k: v.to(cfg.device) for k, v in batch.items()}


def peak_memory_mb(device: str) -> tuple[float, str]:
    """(MB, what was measured): CUDA allocator peak, or this process's peak resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


@contextlib.contextmanager
def _step_tracker(model: Transformer, optimizer: torch.optim.Optimizer, window: Sequence[Batch], step: int,
                  metrics: dict[str, Any]) -> Iterator[None]:
    """Around the second step of a run (the first that starts with the optimizer's state in place), torch's
    MemTracker: ``metrics["step_memory"]`` gets that step's peak and its split by category (MiB) — one step's, on
    its batch's length, not the run's peak (``peak_memory_mb``). Elsewhere, or without MemTracker (torch < 2.5),
    nothing."""
    from .memory import MemTrackerUnavailable, PeakTracker
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


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _state(model: Transformer, trainer: Trainer, step: int, cfg: TrainConfig) -> dict[str, Any]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        "config": dataclasses.asdict(cfg), "step": step,
        "model": {k: v for k, v in model.state_dict().items() if not cfg.lora or k in trainable},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


# Options that may differ between a run and its resumption; every other one must match.
_RESUMABLE = {"stop_after", "out", "resume", "log_every", "sample", "progress", "device", "threads"}


def _restore(path: Path, model: Transformer, trainer: Trainer, cfg: TrainConfig) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (run once with --out {path.parent} first)")
    state = torch.load(path, map_location=cfg.device, weights_only=True)
    saved = state["config"]
    differ = [k for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE and saved.get(k) != v]
    if differ:
        raise ValueError(f"--resume: {path} was written with other options: "
                         + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(cfg, k)!r})"
                                     for k in differ))
    model.load_state_dict(state["model"], strict=not cfg.lora)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; return the metrics (also written to ``--out``). Raises NonFiniteLossError and
    out-of-memory errors after recording them in ``metrics.json`` (``main`` turns them into exit codes)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"config": dataclasses.asdict(cfg), "status": "running", "losses": []}
    model, tokenizer = build_model(cfg)
    trainable, total, percent = count_parameters(model)
    metrics["parameters"] = {"trainable": trainable, "total": total, "percent": percent}
    dataset = InstructionDataset(load_records(cfg.data or default_dataset_path()), tokenizer,
                                 cfg.max_seq_len or model.params.max_seq_len)
    n_micro = cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)
    total_steps = min(math.ceil(n_micro / cfg.ga), cfg.max_steps or sys.maxsize)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    trainer = Trainer(model, optimizer, scheduler=make_scheduler(optimizer, cfg.schedule, total_steps,
                                                                 cfg.warmup_steps),
                      precision=cfg.mp, clip=cfg.clip or None, device_type=torch.device(cfg.device).type,
                      loss_chunk=cfg.loss_chunk or None)
    start = _restore(out / STATE_FILE, model, trainer, cfg) if cfg.resume else 0
    print(f"llama-finetune: {total_steps} steps of {cfg.ga} x {cfg.batch_size} sequences; "
          f"trainable {trainable:,} of {total:,} parameters ({percent:.4f} %); mp={cfg.mp} lora={cfg.lora} "
          f"gc={cfg.gc_policy if cfg.gc else 'off'}")
    if cfg.sample:
        _samples(model, tokenizer, "before training")

    progress = _progress(total_steps, start, cfg.progress)
    pad_id = max(tokenizer.pad_id, 0)
    n_input_tokens, step, t0 = 0, start, time.perf_counter()
    try:
        for index, window in enumerate(windows(micro_batches(dataset, cfg, pad_id), cfg.ga)):
            if index < start:
                continue  # already trained before --resume: the data order is a function of the seed
            if step >= total_steps or (cfg.stop_after is not None and step >= cfg.stop_after):
                break
            try:
                with _step_tracker(model, optimizer, window, step, metrics):
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
        if out:
            if metrics["status"] in ("ok", "nonfinite"):
                state = _state(model, trainer, step, cfg)
                _write_atomic(out / STATE_FILE, lambda p: torch.save(state, p))
            _write_atomic(out / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
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
        if out:
            _save_result(model, out, cfg)
    return metrics


def _save_result(model: Transformer, out: Path, cfg: TrainConfig) -> None:
    if cfg.lora:
        from .lora_io import save_adapter
        save_adapter(model, out / "adapter")
    else:
        from .checkpoint import save_checkpoint
        save_checkpoint(model, out / "checkpoint")


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def write(self, s: str) -> None:
        print(s)


def _progress(total: int, start: int, enabled: bool, unit: str = "step"):
    """A tqdm bar on a terminal's stderr; elsewhere (or disabled) an object with the same methods that only prints
    what is written."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit=unit, file=sys.stderr, dynamic_ncols=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(argv)
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
        print(f"llama-finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
