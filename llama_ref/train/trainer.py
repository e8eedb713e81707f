"""One optimizer step over a window of micro-batches: exact token-level gradient accumulation, autocast with
GradScaler, clipping after unscaling, a schedule advanced per optimizer step.

The loss of a window is the sum of per-token cross-entropies over every non-ignored target token of the window,
divided by their count — however the window is split into micro-batches. Each micro-batch therefore divides its
*sum* by the window's token count (known before the first backward), never its own mean by the number of
micro-batches: a mean of means weights a short sequence's tokens more than a long one's.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..loss import LossKernel, count_target_tokens, token_loss_sum

PRECISIONS = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PACKING = ("positions", "document_ids")  # a packed batch's keys the model takes (llama_ref.train.packing)
Batch = dict[str, torch.Tensor]


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast(device_type, dtype)`` really autocasts (older torch disables fp16 on CPU with a
    warning instead of raising)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ctx = torch.autocast(device_type, dtype=dtype)
        except (RuntimeError, ValueError):
            return False
    return bool(getattr(ctx, "_enabled", True)) and getattr(ctx, "fast_dtype", dtype) == dtype


class NonFiniteLossError(FloatingPointError):
    """The loss of a window is NaN or infinite: the step was not taken."""


def windows(micro_batches: Iterable[Batch], ga: int) -> Iterator[list[Batch]]:
    """Group consecutive micro-batches ``ga`` at a time; the last window may be shorter."""
    window: list[Batch] = []
    for batch in micro_batches:
        window.append(batch)
        if len(window) == ga:
            yield window
            window = []
    if window:
        yield window


@dataclass(frozen=True)
class StepResult:
    loss: float  # the window's true mean token loss (never the scaled or divided value)
    n_tokens: int  # target tokens in the window
    grad_norm: Optional[float]  # before clipping, after unscaling; None without clipping
    lr: float  # the learning rate this step used
    skipped: bool  # GradScaler found inf/NaN gradients and skipped the update


class Trainer:
    """Steps ``optimizer`` once per window of micro-batches (see the module docstring for the loss)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, precision: str = "off",
                 clip: Optional[float] = None, device_type: Optional[str] = None,
                 loss_chunk: Optional[int] = None, loss_kernel: Optional[LossKernel] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 (or None), got {clip!r}")
        inner = getattr(model, "module", model)  # DDP's wrapped model
        if loss_chunk is not None and not (loss_chunk >= 1 and hasattr(inner, "hidden_states")):
            raise ValueError(f"loss_chunk={loss_chunk!r}: needs a positive number of positions and a model whose "
                             "forward takes labels and loss_chunk (llama_ref.model.Transformer)")
        if loss_kernel is not None and (loss_chunk is not None or not hasattr(inner, "hidden_states")):
            raise ValueError("loss_kernel: a model whose forward takes labels and loss_kernel "
                             "(llama_ref.model.Transformer), and no loss_chunk beside it")
        self.model, self.optimizer, self.scheduler, self.clip = model, optimizer, scheduler, clip
        self.loss_chunk, self.loss_kernel = loss_chunk, loss_kernel
        self.device_type = device_type or next(model.parameters()).device.type
        self.dtype = PRECISIONS[precision]
        if self.dtype is not None and not autocast_supported(self.device_type, self.dtype):
            raise ValueError(f"--mp {precision}: this torch ({torch.__version__}) has no {self.dtype} autocast on "
                             f"{self.device_type}")
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def autocast(self) -> AbstractContextManager:
        """Autocast around forward and loss only (never around backward or the optimizer)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def micro_step(self, batch: Batch, window_tokens: int) -> torch.Tensor:
        """Forward and backward of one micro-batch, its loss sum divided by the window's token count."""
        with self.autocast():
            loss_sum = self.loss_sum(batch)
        loss = loss_sum / window_tokens
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss_sum.detach()

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """The micro-batch's summed token loss (fp32): from full logits, ``loss_chunk`` positions at a time, or by
        ``loss_kernel`` (the output projection fused into the loss)."""
        packed = {k: batch[k] for k in PACKING if k in batch}  # packed rows: positions and documents per token
        if self.loss_kernel is not None:
            return self.model(batch["input_ids"], 0, labels=batch["labels"], loss_kernel=self.loss_kernel, **packed)
        if self.loss_chunk is None:
            return token_loss_sum(self.model(batch["input_ids"], 0, **packed), batch["labels"])
        return self.model(batch["input_ids"], 0, labels=batch["labels"], loss_chunk=self.loss_chunk, **packed)

    def step(self, window: Sequence[Batch]) -> StepResult:
        """Accumulate ``window`` and take one optimizer step (clip after unscale, then schedule).

        Raises ValueError for a window without target tokens and NonFiniteLossError (gradients cleared,
        parameters untouched) when the loss, or (clipping, no GradScaler) the gradient norm, is NaN or infinite.
        Each decision is a method of its own, so that another trainer (a check's known-wrong one) overrides the
        one it changes. A model's KV cache is off during the step and as the caller left it afterwards.
        """
        window = self.local_window(window)
        n_tokens = self.window_tokens(window)
        if n_tokens == 0:
            raise ValueError("a window without target tokens: every label is IGNORE_INDEX")
        sums = []
        with _cache_off(self.module):  # training attends within each micro-batch: the cache would only cost memory
            for i, batch in enumerate(window):
                with self.gradient_sync(i, len(window)):
                    sums.append(self.micro_step(batch, self.loss_divisor(batch, window, n_tokens)))
        loss = self.window_loss(sums, window, n_tokens)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"window loss is {loss}: step not taken")
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = self.prepare_gradients(loss)
        skipped = self.apply_update()
        self.clear_gradients()
        if self.scheduler is not None:
            self.advance_schedule(skipped)
        return StepResult(loss, n_tokens, grad_norm, lr, skipped)

    def windows(self, micro_batches: Iterable[Batch], ga: int) -> Iterator[list[Batch]]:
        """How this trainer groups a stream of micro-batches into windows (:func:`windows`)."""
        return windows(micro_batches, ga)

    @property
    def module(self) -> nn.Module:
        """The model itself (a data-parallel trainer's ``model`` is its wrapper)."""
        return self.model

    def local_window(self, window: Sequence[Batch]) -> list[Batch]:
        """The micro-batches of ``window`` this process runs: all of them (a data-parallel trainer: its share)."""
        return list(window)

    def window_tokens(self, window: Sequence[Batch]) -> int:
        """The window's target tokens (a data-parallel trainer: summed over every rank's share)."""
        return sum(self.count_targets(b["labels"]) for b in window)

    def gradient_sync(self, index: int, count: int) -> AbstractContextManager:
        """Around micro-batch ``index`` of ``count``: nothing to synchronise in one process."""
        return contextlib.nullcontext()

    def count_targets(self, labels: torch.Tensor) -> int:
        """Target tokens of a micro-batch's labels: the positions the shifted loss averages over."""
        return count_target_tokens(labels)

    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        """What a micro-batch's loss sum is divided by before backward: the window's token count, so that the
        window's gradient is that of its token mean however it is split."""
        return window_tokens

    def window_loss(self, sums: Sequence[torch.Tensor], window: Sequence[Batch], window_tokens: int) -> float:
        """The loss a step reports: the window's summed token loss (accumulated in fp32) over its token count."""
        total = torch.zeros((), dtype=torch.float32)
        for loss_sum in sums:
            total += loss_sum.cpu()
        return float(total) / window_tokens

    def prepare_gradients(self, loss: float) -> Optional[float]:
        """Unscale (GradScaler), then clip; the gradient norm before clipping, or None without clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # before clipping: the threshold is in true gradient units
        if self.clip is None:
            return None
        grad_norm = self.clip_gradients()
        if self.scaler is None and not math.isfinite(grad_norm):  # GradScaler skips such steps itself
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {grad_norm} (loss {loss:.4g}): step not taken")
        return grad_norm

    def clip_gradients(self) -> float:
        """Clip the total norm of the trainable gradients to ``clip``; the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))

    def apply_update(self) -> bool:
        """The optimizer step (through GradScaler with fp16); True when GradScaler skipped it (inf/NaN)."""
        if self.scaler is None:
            self.optimizer.step()
            return False
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()  # once per window, not per micro-batch
        return self.scaler.get_scale() < scale

    def clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def advance_schedule(self, skipped: bool) -> None:
        """One step of the LR schedule after an optimizer step that was taken; none after one GradScaler skipped
        (the schedule counts optimizer steps actually taken)."""
        if not skipped:
            self.scheduler.step()


@contextlib.contextmanager
def _cache_off(model: nn.Module) -> Iterator[None]:
    """``model.kv_caching`` off inside (where the model has the switch), restored on exit."""
    was = getattr(model, "kv_caching", None)
    if not was:
        yield
        return
    model.kv_caching = False
    try:
        yield
    finally:
        model.kv_caching = was
