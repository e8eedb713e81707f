"""transformers' ``Trainer`` as the GA and MP checks drive it: one ``Trainer.train()`` per window.

Each window's micro-batches become a dataset of that many items (one micro-batch each, ``per_device_train_batch_size``
1, a collator that hands the micro-batch over as it is), read in order, with ``gradient_accumulation_steps`` the
window size asked for (a shorter last window is the end of an epoch, as in a long run) and ``max_steps=1``. The
Trainer steps the check's own optimizer (``optimizers=(optimizer, scheduler)``, so its state carries over the
windows) at the learning rate the check gives it (a constant scheduler re-based each window: the Trainer's own
schedules are not what is checked), and clips at ``max_grad_norm``. What is judged is the Trainer's own path:
``get_batch_samples`` / ``num_items_in_batch``, ``training_step``, ``compute_loss``, the model's loss function,
accelerate's backward and clipping, its mixed precision (``bf16=True``: accelerate's autocast).

Reported: the window loss as ``train()`` returns it (``training_loss``: not rounded, as the logged one is in 4.x),
the pre-clip norm it logs (``grad_norm``); no token count (it logs none).
"""
from __future__ import annotations

import gc
import tempfile
from typing import Any, Optional, Sequence
from unittest import mock

import torch

from .protocols import Batch, Reported

PRECISIONS = ("fp32", "bf16", "fp16")


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, window: Sequence[Batch]):
        self.window = list(window)

    def __len__(self) -> int:
        return len(self.window)

    def __getitem__(self, i: int) -> Batch:
        return self.window[i]


def _one_micro_batch(items: list[Batch]) -> Batch:
    (batch,) = items
    return dict(batch)


def _in_order(trainer_cls: type, counted: Optional[list] = None) -> type:
    """``trainer_cls`` reading its dataset in order (a ``SequentialSampler``; the default shuffles); the
    ``num_items_in_batch`` each ``compute_loss`` call is given appended to ``counted``."""
    class InOrder(trainer_cls):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, *args: Any, **kwargs: Any):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, *args: Any, **kwargs: Any):
            if counted is not None:
                counted.append(kwargs.get("num_items_in_batch"))
            return super().compute_loss(*args, **kwargs)
    InOrder.__name__ = InOrder.__qualname__ = f"InOrder{trainer_cls.__name__}"
    return InOrder


class _Capture:
    """A TrainerCallback (duck-typed: transformers calls every ``on_*`` it finds) keeping the last logs."""

    def __init__(self) -> None:
        self.logs: dict[str, Any] = {}

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.logs = dict(logs)


def train_window(model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Sequence[Batch], *,
                 ga: int, lr: Optional[float], max_norm: Optional[float], precision: str = "fp32",
                 trainer_cls: Optional[type] = None, counted: Optional[list] = None) -> Reported:
    """One optimizer step of ``transformers.Trainer`` (or ``trainer_cls``) over ``window`` with
    ``gradient_accumulation_steps=ga``; the global RNG is left as it was (the Trainer seeds it). ``counted``: a list
    the ``num_items_in_batch`` of each micro-batch's ``compute_loss`` is appended to (None where it passes none)."""
    import transformers
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    device = next(model.parameters()).device
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the constant scheduler below keeps it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    capture = _Capture()
    with tempfile.TemporaryDirectory() as out, torch.random.fork_rng(devices=[]):
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=ga, max_steps=1,
            max_grad_norm=max_norm if max_norm is not None else 0.0, logging_steps=1, save_strategy="no",
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=device.type == "cpu",
            bf16=precision == "bf16", fp16=precision == "fp16", remove_unused_columns=False, seed=0)
        trainer = _in_order(trainer_cls or transformers.Trainer, counted)(
            model=model, args=args, train_dataset=_Dataset(window), data_collator=_one_micro_batch,
            optimizers=(optimizer, scheduler), callbacks=[capture])
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        # accelerate's free_memory() runs a full gc.collect() at the start of every train(): 0.19 of its 0.20 s here
        # (measured; it frees nothing a window needs), so the collection is skipped for the length of the call
        with mock.patch.object(gc, "collect", lambda *args, **kwargs: 0):
            out_ = trainer.train()
    norm = capture.logs.get("grad_norm")
    return Reported(float(out_.training_loss), None, None if norm is None or max_norm is None else float(norm), None)


class TrainerDriver:
    """The GA check's :class:`verify.targets.base.StepDriver` over ``transformers.Trainer``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: Optional[float], *,
                 trainer_cls: Optional[type] = None):
        self.model, self.optimizer, self.clip, self.trainer_cls = model, optimizer, clip, trainer_cls
        self.ga = 1

    def windows(self, micro: Sequence[Batch], ga: int) -> list[list[Batch]]:
        self.ga = ga
        return [list(micro[i:i + ga]) for i in range(0, len(micro), ga)]

    def step(self, window: Sequence[Batch], lr: float) -> Reported:
        return train_window(self.model, self.optimizer, window, ga=self.ga, lr=lr, max_norm=self.clip,
                            trainer_cls=self.trainer_cls)


class TrainerStep:
    """``transformers.Trainer`` in ``precision`` as a :class:`verify.targets.base.TrainStep` (the MP check's)."""

    def __init__(self, precision: str = "bf16", trainer_cls: Optional[type] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
        self.precision, self.trainer_cls = precision, trainer_cls

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Sequence[Batch],
                 max_norm: Optional[float]) -> float:
        return train_window(model, optimizer, window, ga=len(window), lr=None, max_norm=max_norm,
                            precision=self.precision, trainer_cls=self.trainer_cls).loss


def packed_window(model: torch.nn.Module, window: Sequence[Batch], *, trainer_cls: Optional[type] = None
                  ) -> tuple[float, Optional[int], dict[str, torch.Tensor]]:
    """Property 7's loop: one ``Trainer.train()`` step over ``window`` (the model's inputs, ``labels`` included) on
    ``model`` itself, SGD at learning rate 1 without clipping, so the gradient it stepped with is the parameters'
    change. Returns the loss it reports, the ``num_items_in_batch`` it counted (None where it passes none) and that
    gradient by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    counted: list = []
    reported = train_window(model, torch.optim.SGD(params.values(), lr=1.0), window, ga=len(window), lr=1.0,
                            max_norm=None, trainer_cls=trainer_cls, counted=counted)
    count = None if not counted or counted[0] is None else int(counted[0])
    return reported.loss, count, {n: before[n] - p.detach() for n, p in params.items()}
