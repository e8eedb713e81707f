"""The bug zoo for property 2 (gradient accumulation): training loops that real projects shipped.

Each mutant patches ``llama_ref.train.trainer`` (``Trainer.step``, ``Trainer.micro_step``, ``windows``,
``count_target_tokens``). Most are one knob of :func:`_step`, a copy of ``Trainer.step`` whose loss division,
logging, clipping, zeroing and scheduling can each be done the wrong way; listed in ``verify.mutants``' registry.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import torch

import llama_ref.train.trainer as T
from llama_ref.train.data import IGNORE_INDEX

from .base import Mutant, Patch, collector

PROP = "grad_accum"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)
# The accumulation steps K a loop was configured with, as the HF/Lightning loops know it: the mutated ``windows``
# records it; the correct Trainer never needs it (it divides by the window's own token count).
_CONFIGURED_GA: dict[str, int] = {}


def _step(self: T.Trainer, window: Sequence[T.Batch], *,
          divisor: Callable[[T.Batch, Sequence[T.Batch], int], float] = lambda batch, window, n: n,
          reported: Callable[[list[float], list[int], Sequence[T.Batch], int], float] =
          lambda sums, counts, window, n: sum(sums) / n,
          zero_each: bool = False, clip_each: bool = False, schedule_each: bool = False, optimizer_each: bool = False,
          schedule_first: bool = False, zero_after: bool = True) -> T.StepResult:
    """``Trainer.step`` with every GA decision a parameter; the defaults are the correct loop."""
    n_tokens = sum(T.count_target_tokens(b["labels"]) for b in window)
    if n_tokens == 0:
        raise ValueError("a window without target tokens: every label is IGNORE_INDEX")
    lr = self.optimizer.param_groups[0]["lr"]
    sums, counts, grad_norm = [], [], None
    for i, batch in enumerate(window):
        if zero_each:
            self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss_sum = T.token_loss_sum(self.model(batch["input_ids"], 0), batch["labels"])
        loss = loss_sum / divisor(batch, window, n_tokens)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        sums.append(float(loss_sum.detach()))
        counts.append(T.count_target_tokens(batch["labels"]))
        if clip_each and self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if optimizer_each:  # a whole step per micro-batch, clipping included
            if self.clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if schedule_each and self.scheduler is not None and i < len(window) - 1:
            self.scheduler.step()  # and once more after the optimizer step: K times per window
    loss = reported(sums, counts, window, n_tokens)
    if not math.isfinite(loss):
        self.optimizer.zero_grad(set_to_none=True)
        raise T.NonFiniteLossError(f"window loss is {loss}: step not taken")
    if self.scaler is not None:
        self.scaler.unscale_(self.optimizer)
    if self.clip is not None and not optimizer_each:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
    if schedule_first and self.scheduler is not None:
        self.scheduler.step()
    skipped = False
    if optimizer_each:
        pass  # already stepped, once per micro-batch
    elif self.scaler is not None:
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale
    else:
        self.optimizer.step()
    if zero_after:
        self.optimizer.zero_grad(set_to_none=True)
    if self.scheduler is not None and not schedule_first:
        self.scheduler.step()
    return T.StepResult(loss, n_tokens, grad_norm, lr, skipped)


def _patched_step(**knobs) -> list[Patch]:
    def step(self, window):
        return _step(self, window, **knobs)
    return [(T.Trainer, "step", step)]


def _mean_of_means(sums: list[float], counts: list[int], window: Sequence[T.Batch], n: int) -> float:
    return sum(s / max(c, 1) for s, c in zip(sums, counts)) / len(window)


@mutant("ga_mean_of_micro_means",
        "each micro-batch's mean token loss divided by K (and their mean logged): short sequences weigh more",
        "transformers Trainer until v4.46 (Oct 2024, the unsloth.ai/blog/gradient report); mlx-lm PR #1413")
def _ga_mean_of_means() -> list[Patch]:
    return _patched_step(divisor=lambda batch, window, n: T.count_target_tokens(batch["labels"]) * len(window),
                         reported=_mean_of_means)


@mutant("ga_loss_not_divided", "micro-batch loss sums backpropagated undivided (gradients × window tokens)",
        "karpathy/nanoGPT issue #168: loss not divided by gradient_accumulation_steps before backward")
def _ga_not_divided() -> list[Patch]:
    original = T.Trainer.micro_step

    def micro_step(self, batch, window_tokens):
        return original(self, batch, 1)
    return [(T.Trainer, "micro_step", micro_step)]


@mutant("ga_divided_twice", "loss divided by the window's token count and again by K",
        "transformers 4.46–4.47 with num_items_in_batch plus `loss / gradient_accumulation_steps` (PR #35207; "
        "unsloth-zoo PR #1023: 'normalises the loss twice')")
def _ga_divided_twice() -> list[Patch]:
    return _patched_step(divisor=lambda batch, window, n: n * len(window))


@mutant("ga_last_window_divided_by_k",
        "the last, short window divided as if it held K micro-batches (n_tokens · K / len(window))",
        "transformers issue #38837 / PR #38872, Lightning issue #19987: the final partial accumulation scaled "
        "by gradient_accumulation_steps")
def _ga_last_window_by_k() -> list[Patch]:
    original = T.windows

    def windows(micro_batches, ga):
        _CONFIGURED_GA["ga"] = ga
        return original(micro_batches, ga)

    def divisor(batch, window, n):
        return n * _CONFIGURED_GA.get("ga", len(window)) / len(window)

    def reported(sums, counts, window, n):
        return sum(sums) / divisor(None, window, n)
    return [(T, "windows", windows)] + _patched_step(divisor=divisor, reported=reported)


@mutant("ga_zero_grad_each_micro_batch", "optimizer.zero_grad() before every micro-batch's backward",
        "single-batch loops given GA without moving `optimizer.zero_grad()` out of the batch loop "
        "(paiml/entrenar issue #131: gradient workspace zeroed between micro-batches)")
def _ga_zero_each() -> list[Patch]:
    original = T.Trainer.micro_step

    def micro_step(self, batch, window_tokens):
        self.optimizer.zero_grad(set_to_none=True)
        return original(self, batch, window_tokens)
    return [(T.Trainer, "micro_step", micro_step)]


@mutant("ga_clip_each_micro_batch", "gradient clipping after every micro-batch's backward, on partial sums",
        "transformers issues #986 and #1563 (run_squad/run_glue examples, 2019): clip_grad_norm_ after each backward")
def _ga_clip_each() -> list[Patch]:
    original = T.Trainer.micro_step

    def micro_step(self, batch, window_tokens):
        out = original(self, batch, window_tokens)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        return out
    return [(T.Trainer, "micro_step", micro_step)]


@mutant("ga_scheduler_each_micro_batch", "LR scheduler stepped per micro-batch, not per optimizer step",
        "Lightning issue #1476, accelerate PR #999, h2o-llmstudio issue #663, starVLA PR #210")
def _ga_schedule_each() -> list[Patch]:
    return _patched_step(schedule_each=True)


@mutant("seed_loss_logged_divided_by_k", "the logged window loss is the backpropagated loss / K",
        "the seed report (--ga 8 logged 0.36 for a loss of ~2.9); allennlp PR #4706")
def _seed_loss_logging() -> list[Patch]:
    return _patched_step(reported=lambda sums, counts, window, n: sum(sums) / n / len(window))


@mutant("ga_count_unshifted_labels", "window tokens counted on unshifted labels (labels != -100)",
        "transformers PR #46204: num_items_in_batch counted position 0, which the shifted loss never predicts")
def _ga_unshifted_count() -> list[Patch]:
    def count_target_tokens(labels: torch.Tensor) -> int:
        return int((labels != IGNORE_INDEX).sum())
    return [(T, "count_target_tokens", count_target_tokens)]


@mutant("ga_grads_not_cleared_after_step", "no zero_grad after the optimizer step: windows leak into the next",
        "loops that call optimizer.zero_grad() only once before training")
def _ga_no_zero_after() -> list[Patch]:
    return _patched_step(zero_after=False)


@mutant("ga_last_window_dropped", "windows() drops a last window shorter than K (drop_last)",
        "timoschick/pet issue #36, tomhosking/torchseq issue #8: leftover micro-batches never stepped")
def _ga_drop_last() -> list[Patch]:
    def windows(micro_batches: Iterable[T.Batch], ga: int) -> Iterator[list[T.Batch]]:
        window: list[T.Batch] = []
        for batch in micro_batches:
            window.append(batch)
            if len(window) == ga:
                yield window
                window = []
    return [(T, "windows", windows)]


@mutant("ga_optimizer_step_each_micro_batch", "optimizer stepped after every micro-batch: GA a no-op",
        "paiml/entrenar issue #123 ('gradient accumulation currently a no-op': per-sequence optimizer updates)")
def _ga_optimizer_each() -> list[Patch]:
    return _patched_step(optimizer_each=True)


@mutant("ga_scheduler_before_optimizer", "lr_scheduler.step() before optimizer.step(): every lr one step early",
        "the PyTorch < 1.1 order (pytorch/pytorch issue #20124), still in loops ported from it")
def _ga_schedule_first() -> list[Patch]:
    return _patched_step(schedule_first=True)
