"""The user's training step as the GA check drives it (:class:`verify.targets.base.TrainStep`), and how one is named:
``--train-step PATH.py:FN`` or ``package.module:FN``."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .protocols import Batch, Reported, TrainStep
from .spec import load_factory


class UserStepDriver:
    """Windows of ``ga`` micro-batches in order (the last may be short); each window's learning rate set on the
    optimizer's param groups, then the user's ``step(model, optimizer, window, max_norm)``."""

    def __init__(self, step: TrainStep, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 max_norm: Optional[float]):
        self.fn, self.model, self.optimizer, self.max_norm = step, model, optimizer, max_norm

    def windows(self, micro: Sequence[Batch], ga: int) -> list[list[Batch]]:
        return [list(micro[i:i + ga]) for i in range(0, len(micro), ga)]

    def step(self, window: Sequence[Batch], lr: float) -> Reported:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.fn(self.model, self.optimizer, window, self.max_norm)
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().item() if loss.numel() == 1 else float("nan")
        return Reported(float(loss))


def load_train_step(spec: str) -> Callable[..., float]:
    """The training step a SPEC names (``PATH.py:FN`` or ``package.module:FN``); ValueError naming what is wrong."""
    return load_factory(spec, "train step")
