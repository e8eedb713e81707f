"""The bug zoo of property 2 (gradient accumulation): training loops that real projects shipped.

Each mutant is a ``Trainer`` subclass that overrides the one decision it gets wrong (how a micro-batch's loss is
divided, what the step reports, when gradients are zeroed or clipped, when the optimizer and the schedule step, how
a stream is grouped into windows, how targets are counted); the check is given the class. No mutant copies
``Trainer.step``.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from llama_ref.train.data import IGNORE_INDEX
from llama_ref.train.trainer import Batch, Trainer

from .base import Mutant, collector

PROP = "grad_accum"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)


@mutant("ga_mean_of_micro_means",
        "each micro-batch's mean token loss divided by K (and their mean logged): short sequences weigh more",
        "transformers Trainer until v4.46 (Oct 2024, the unsloth.ai/blog/gradient report); mlx-lm PR #1413",
        component="trainer_cls")
class _MeanOfMicroMeans(Trainer):
    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return self.count_targets(batch["labels"]) * len(window)

    def window_loss(self, sums: Sequence[torch.Tensor], window: Sequence[Batch], window_tokens: int) -> float:
        return sum(float(s) / max(self.count_targets(b["labels"]), 1) for s, b in zip(sums, window)) / len(window)


@mutant("ga_loss_not_divided", "micro-batch loss sums backpropagated undivided (gradients × window tokens)",
        "karpathy/nanoGPT issue #168: loss not divided by gradient_accumulation_steps before backward",
        component="trainer_cls")
class _NotDivided(Trainer):
    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return 1


@mutant("ga_divided_twice", "loss divided by the window's token count and again by K",
        "transformers 4.46–4.47 with num_items_in_batch plus `loss / gradient_accumulation_steps` (PR #35207; "
        "unsloth-zoo PR #1023: 'normalises the loss twice')", component="trainer_cls")
class _DividedTwice(Trainer):
    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return window_tokens * len(window)


@mutant("ga_last_window_divided_by_k",
        "the last, short window divided as if it held K micro-batches (n_tokens · K / len(window))",
        "transformers issue #38837 / PR #38872, Lightning issue #19987: the final partial accumulation scaled "
        "by gradient_accumulation_steps", component="trainer_cls")
class _LastWindowByK(Trainer):
    """Knows the accumulation steps K it was configured with, as the HF/Lightning loops do (the correct Trainer
    never needs it: it divides by the window's own token count)."""

    def windows(self, micro_batches: Iterable[Batch], ga: int) -> Iterator[list[Batch]]:
        self.configured_ga = ga
        return super().windows(micro_batches, ga)

    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return window_tokens * getattr(self, "configured_ga", len(window)) / len(window)

    def window_loss(self, sums: Sequence[torch.Tensor], window: Sequence[Batch], window_tokens: int) -> float:
        return sum(float(s) for s in sums) / self.loss_divisor(window[0], window, window_tokens)


@mutant("ga_zero_grad_each_micro_batch", "optimizer.zero_grad() before every micro-batch's backward",
        "single-batch loops given GA without moving `optimizer.zero_grad()` out of the batch loop "
        "(paiml/entrenar issue #131: gradient workspace zeroed between micro-batches)", component="trainer_cls")
class _ZeroEach(Trainer):
    def micro_step(self, batch: Batch, window_tokens: float) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return super().micro_step(batch, window_tokens)


@mutant("ga_clip_each_micro_batch", "gradient clipping after every micro-batch's backward, on partial sums",
        "transformers issues #986 and #1563 (run_squad/run_glue examples, 2019): clip_grad_norm_ after each backward",
        component="trainer_cls")
class _ClipEach(Trainer):
    def micro_step(self, batch: Batch, window_tokens: float) -> torch.Tensor:
        out = super().micro_step(batch, window_tokens)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        return out


@mutant("ga_scheduler_each_micro_batch", "LR scheduler stepped per micro-batch, not per optimizer step",
        "Lightning issue #1476, accelerate PR #999, h2o-llmstudio issue #663, starVLA PR #210", component="trainer_cls")
class _ScheduleEach(Trainer):
    def micro_step(self, batch: Batch, window_tokens: float) -> torch.Tensor:
        out = super().micro_step(batch, window_tokens)
        if self.scheduler is not None:
            self.scheduler.step()  # K times per window
        return out

    def advance_schedule(self, skipped: bool) -> None:
        pass  # already stepped per micro-batch


@mutant("seed_loss_logged_divided_by_k", "the logged window loss is the backpropagated loss / K",
        "the seed report (--ga 8 logged 0.36 for a loss of ~2.9); allennlp PR #4706", component="trainer_cls")
class _LoggedDividedByK(Trainer):
    def window_loss(self, sums: Sequence[torch.Tensor], window: Sequence[Batch], window_tokens: int) -> float:
        return super().window_loss(sums, window, window_tokens) / len(window)


@mutant("ga_count_unshifted_labels", "window tokens counted on unshifted labels (labels != -100)",
        "transformers PR #46204: num_items_in_batch counted position 0, which the shifted loss never predicts",
        component="trainer_cls")
class _CountUnshifted(Trainer):
    def count_targets(self, labels: torch.Tensor) -> int:
        return int((labels != IGNORE_INDEX).sum())


@mutant("ga_count_one_more_per_micro_batch", "the window's token count one too many per micro-batch",
        "a count taken per micro-batch that includes each one's last position (shifted labels of length L - 1 counted "
        "as L), summed into num_items_in_batch", component="trainer_cls")
class _CountPerMicroBatch(Trainer):
    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return window_tokens + len(window)


@mutant("ga_grads_not_cleared_after_step", "no zero_grad after the optimizer step: windows leak into the next",
        "loops that call optimizer.zero_grad() only once before training", component="trainer_cls")
class _NotCleared(Trainer):
    def clear_gradients(self) -> None:
        pass


@mutant("ga_last_window_dropped", "windows() drops a last window shorter than K (drop_last)",
        "timoschick/pet issue #36, tomhosking/torchseq issue #8: leftover micro-batches never stepped",
        component="trainer_cls")
class _DropLast(Trainer):
    def windows(self, micro_batches: Iterable[Batch], ga: int) -> Iterator[list[Batch]]:
        return (window for window in super().windows(micro_batches, ga) if len(window) == ga)


@mutant("ga_optimizer_step_each_micro_batch", "optimizer stepped after every micro-batch: GA a no-op",
        "paiml/entrenar issue #123 ('gradient accumulation currently a no-op': per-sequence optimizer updates)",
        component="trainer_cls")
class _OptimizerEach(Trainer):
    def micro_step(self, batch: Batch, window_tokens: float) -> torch.Tensor:
        out = super().micro_step(batch, window_tokens)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()  # a whole step per micro-batch, clipping included
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def apply_update(self) -> bool:
        return False  # already stepped, once per micro-batch


@mutant("ga_scheduler_before_optimizer", "lr_scheduler.step() before optimizer.step(): every lr one step early",
        "the PyTorch < 1.1 order (pytorch/pytorch issue #20124), still in loops ported from it",
        component="trainer_cls")
class _ScheduleFirst(Trainer):
    def apply_update(self) -> bool:
        if self.scheduler is not None:
            self.scheduler.step()
        return super().apply_update()

    def advance_schedule(self, skipped: bool) -> None:
        pass  # already stepped, before the optimizer
