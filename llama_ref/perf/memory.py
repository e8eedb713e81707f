"""Peak memory of one llama-finetune training step: measured, or predicted without allocating.

``measure_step_memory`` builds the model as ``llama-finetune`` does (``build_model``), runs ``steps`` training steps
with :class:`~llama_ref.train.trainer.Trainer` on random tokens and measures the last one: with torch's ``MemTracker``
on CPU (by category), with the CUDA allocator's ``max_memory_allocated`` on CUDA (the breakdown from MemTracker).

``predict_step_memory`` runs the same step — same model, same autocast, same loss, same clipping, same optimizer —
on fake tensors (``FakeTensorMode``: shapes, dtypes and storages, no data), with ``MemTracker`` counting their
storages. Nothing is allocated, so a 1.5B-parameter model is predicted in seconds on a laptop.

What neither sees: the CUDA caching allocator's rounding (blocks of 512 bytes) and workspaces (cuBLAS), the CPU
allocator's own overheads, and kernels that allocate outside the dispatcher. On CPU the prediction and the
measurement count the same tensors; against a CUDA ``max_memory_allocated`` the prediction is a lower bound that is
tight when the peak is made of a few large tensors (weights and gradients of a full fine-tune).

Units: MiB (2**20 bytes), the unit ``torch.cuda.max_memory_allocated() / 2**20`` reports (and llama-finetune's
"Peak memory usage").
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from ..args import ModelArgs
from ..model import Transformer, init_weights
from ..train.config import TrainConfig, build_model, make_trainer, prepare_for_training
from ..train.rng import seeded
from ..train.trainer import Trainer
from .peak import MiB, MemTrackerUnavailable, PeakTracker, mem_tracker_class


@dataclass
class MemoryReport:
    """Peak memory of one training step, MiB. ``breakdown_mb`` is the split of the peak by category (MemTracker's
    snapshot at its peak; empty when MemTracker is unavailable); ``method`` says what ``peak_mb`` is."""
    peak_mb: float
    breakdown_mb: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    method: str = "MemTracker"
    seconds: float = 0.0  # wall time of the measurement or prediction
    category_peaks_mb: dict[str, float] = field(default_factory=dict)  # each category's own maximum

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:,.1f}" for k, v in self.breakdown_mb.items() if v)
        return f"{self.peak_mb:,.1f} MiB ({self.method}, {self.device}){': ' + parts if parts else ''}"


def random_batch(vocab: int, batch_size: int, seq_len: int, device: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A micro-batch of seeded uniform tokens below ``vocab`` (every one a target); ValueError below 2 positions."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (the loss predicts token t+1 from token t), got {seq_len}")
    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device)
    return {"input_ids": tokens, "labels": tokens.clone()}


def measure_step_memory(cfg: TrainConfig, batch_size: int, seq_len: int, *, steps: int = 2,
                        args: Optional[ModelArgs] = None, packed: Optional[Sequence[Sequence[int]]] = None
                        ) -> MemoryReport:
    """Build the model as llama-finetune does, run ``steps`` Trainer steps (each a window of ``cfg.ga``
    micro-batches) on random tokens, measure the last. ``args``: a model of that shape with seeded weights instead
    of ``cfg``'s preset or checkpoint (as :func:`predict_step_memory` takes a ModelArgs); ``packed``: packed rows, as
    :func:`predict_step_memory` takes them.

    CPU: MemTracker's peak (every tensor's storage, by category). CUDA: ``torch.cuda.max_memory_allocated`` over
    the last step (after ``reset_peak_memory_stats``), with MemTracker's breakdown when available.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
    if seq_len > (cfg.max_seq_len or seq_len):
        raise ValueError(f"seq_len {seq_len} exceeds the config's max_seq_len {cfg.max_seq_len}")
    t0 = time.perf_counter()
    with seeded(cfg.seed, cfg.device):
        return _measure(cfg, batch_size, seq_len, steps, t0, args, packed)


def _measure(cfg: TrainConfig, batch_size: int, seq_len: int, steps: int, t0: float,
             args: Optional[ModelArgs] = None, packed: Optional[Sequence[Sequence[int]]] = None) -> MemoryReport:
    if args is None:
        model, _ = build_model(cfg)
    else:
        args = args.replace(max_batch_size=max(batch_size, args.max_batch_size))
        model = prepare_for_training(init_weights(Transformer(args), cfg.seed).to(cfg.device), cfg)
    if seq_len > model.params.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.params.max_seq_len}")
    device = torch.device(cfg.device)
    trainer = make_trainer(cfg, model, one_process=True)
    batch = random_batch(model.vocab_size, batch_size, seq_len, device, cfg.seed)
    if packed is not None:
        batch.update({k: v.to(device) for k, v in _packed_rows(packed, batch_size, seq_len).items()})
    window = [batch] * cfg.ga  # a whole accumulation window per step
    for _ in range(steps - 1):  # warm-up: lazily created state (optimizer moments, RoPE table) exists before
        trainer.step(window)
    cuda = device.type == "cuda"
    try:
        tracker = PeakTracker(model, trainer.optimizer, batch["input_ids"], batch["labels"])
    except MemTrackerUnavailable:
        if not cuda:
            raise
        tracker = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tracker if tracker is not None else contextlib.nullcontext():
        trainer.step(window)
    if cuda:
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device) / MiB, "cuda allocator"
    else:
        peak, method = tracker.peak_mb, "MemTracker"
    return MemoryReport(peak, tracker.breakdown_mb if tracker else {}, str(device), method, time.perf_counter() - t0,
                        tracker.category_peaks_mb if tracker else {})


# --- prediction on fake tensors ---------------------------------------------------------------------------------

def model_args(cfg_or_args: Union[TrainConfig, ModelArgs, str], cfg: TrainConfig) -> ModelArgs:
    """The shape a prediction runs: ``cfg_or_args`` itself when a ModelArgs (its batch at least ``cfg``'s), else
    ``cfg``'s checkpoint's params.json or preset, at ``cfg.max_seq_len`` when set; no weights are read."""
    if isinstance(cfg_or_args, ModelArgs):
        return cfg_or_args.replace(max_batch_size=max(cfg.batch_size, cfg_or_args.max_batch_size))
    if cfg.ckpt_dir:
        from ..formats.meta import load_params
        from ..tokenizer import Tokenizer
        args = load_params(cfg.ckpt_dir, tokenizer=Tokenizer(cfg.tokenizer))
        return args.replace(**({"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}))
    return ModelArgs.preset(cfg.preset, **({"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}))


def build_like_finetune(args: ModelArgs, cfg: TrainConfig) -> Transformer:
    """``build_model`` without the weights' values (never read for memory) and without the tokenizer."""
    return prepare_for_training(Transformer(args), cfg)


class _FakeTensorTrainer(Trainer):
    """The Trainer's step on fake tensors: the same forward, loss, backward, unscaling, clipping, optimizer step and
    zero_grad, without the decisions that read data (token counts, ``float(loss)``, the gradient norm's value,
    GradScaler's skip). Random tokens: every shifted label is a target."""

    def count_targets(self, labels: torch.Tensor) -> int:
        return labels[:, 1:].numel()

    def window_loss(self, sums: Any, window: Any, window_tokens: int) -> float:
        return 0.0

    def prepare_gradients(self, loss: float) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)

    def apply_update(self) -> bool:
        self.optimizer.step()  # GradScaler.step would read found_inf (data); the update's memory is the same
        if self.scaler is not None:
            self.scaler._per_optimizer_states.clear()  # what GradScaler.update does after its step
        return False


def predict_step_memory(cfg_or_args: Union[TrainConfig, ModelArgs], batch_size: int, seq_len: int, *,
                        steps: int = 2, packed: Optional[Sequence[Sequence[int]]] = None,
                        **options: Any) -> MemoryReport:
    """Peak memory (MiB) of the last of ``steps`` training steps, by category, without allocating anything.

    ``cfg_or_args``: a TrainConfig (its preset, checkpoint's params.json or max_seq_len give the shape; ``options``
    override its fields), or a ModelArgs (any shape; ``options`` are TrainConfig fields: lora, mp, gc, optimizer,
    clip, device, ...). ``device`` is the target: "cuda" picks the optimizer kernels torch would pick there. Runs
    build, autocast, loss, backward, clipping and the optimizer on fake tensors, on CPU kernels' dtype rules
    (autocast "cpu"), with MemTracker counting their storages. The first step creates state the later ones keep
    (AdamW's moments, GradScaler's scale); the default predicts the second, as ``measure_step_memory`` measures it.
    ``packed``: the micro-batch is ``batch_size`` packed rows of ``seq_len`` tokens, row i holding documents of
    ``packed[i]`` tokens (``llama_ref.train.packing``: positions restarting, a document mask).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mem_tracker_class()  # fail early, before any work
    base = cfg_or_args if isinstance(cfg_or_args, TrainConfig) else TrainConfig()
    cfg = dataclasses.replace(base, batch_size=batch_size, **options)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target = torch.device(cfg.device)
    args = model_args(cfg_or_args, cfg)
    if seq_len > args.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    t0 = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = build_like_finetune(args, cfg)
        trainer = make_trainer(cfg, model, trainer_cls=_FakeTensorTrainer, device_type="cpu",
                               foreach=True if target.type == "cuda" else None, one_process=True)
        tokens = torch.zeros((batch_size, seq_len), dtype=torch.int64)
        batch = {"input_ids": tokens, "labels": tokens.clone()}
        if packed is not None:  # packed rows: each row's documents' lengths (positions and documents per token)
            batch.update(_packed_rows(packed, batch_size, seq_len))
        # Accumulation: from the second micro-batch on, every micro-batch allocates what the second did (the
        # gradients exist and are added to); two are the peak of any longer window.
        micro_batches = min(cfg.ga, 2)
        for _ in range(steps - 1):
            trainer.step([batch] * micro_batches)
        with PeakTracker(model, trainer.optimizer, batch["input_ids"], batch["labels"]) as tracker:
            trainer.step([batch] * micro_batches)
    return MemoryReport(tracker.peak_mb, tracker.breakdown_mb, f"{target} (predicted on fake CPU tensors)",
                        "MemTracker on FakeTensorMode", time.perf_counter() - t0, tracker.category_peaks_mb)


def _packed_rows(rows: Sequence[Sequence[int]], batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``positions`` and ``document_ids`` (batch_size, seq_len) of packed rows of documents of the given lengths (the
    rest of a row padding, a document of its own)."""
    if len(rows) != batch_size or any(sum(r) > seq_len for r in rows):
        raise ValueError(f"packed: {batch_size} rows of at most {seq_len} tokens expected, got lengths {rows}")
    positions, documents = [], []
    for row in rows:
        pos = [i for n in row for i in range(n)] + list(range(seq_len - sum(row)))
        doc = [d for d, n in enumerate(row) for _ in range(n)] + [-1] * (seq_len - sum(row))
        positions.append(pos)
        documents.append(doc)
    return {"positions": torch.tensor(positions), "document_ids": torch.tensor(documents)}


def predict_step_flops(cfg_or_args: Union[TrainConfig, ModelArgs], batch_size: int, seq_len: int,
                       **options: Any) -> int:
    """Floating-point operations of one micro-batch's forward and backward (recomputation included), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; elementwise ops are not counted) on fake
    tensors. Arguments as :func:`predict_step_memory`. A run of its own: FlopCounterMode's module hooks keep
    tensors alive, so counting inside the memory prediction would change the memory it predicts."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    base = cfg_or_args if isinstance(cfg_or_args, TrainConfig) else TrainConfig()
    cfg = dataclasses.replace(base, batch_size=batch_size, **options)
    args = model_args(cfg_or_args, cfg)
    if not 2 <= seq_len <= args.max_seq_len:
        raise ValueError(f"seq_len must be in 2..{args.max_seq_len} (the model's max_seq_len), got {seq_len}")
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = build_like_finetune(args, cfg)
        trainer = make_trainer(cfg, model, device_type="cpu", one_process=True)  # a micro-step never clips
        tokens = torch.zeros((batch_size, seq_len), dtype=torch.int64)
        with FlopCounterMode(display=False) as counter:
            trainer.micro_step({"input_ids": tokens, "labels": tokens.clone()}, batch_size * (seq_len - 1))
    return int(counter.get_total_flops())


def seed_setting_prediction(seq_len: int, **options: Any) -> MemoryReport:
    """The seed report's plain run: Llama 3.2 1B shape (untied output), SGD, fp32, batch 1, full fine-tune, no
    GA/GC/MP, no clipping."""
    args = ModelArgs.preset("llama-3.2-1b")
    return predict_step_memory(args, 1, seq_len, **{"optimizer": "sgd", "clip": 0.0, "lr": 1e-5, **options})


SEED_PEAK_MB = 11_624.06  # the seed report's "Peak memory usage" of the plain run (GA, GC, MP, LoRA off)
