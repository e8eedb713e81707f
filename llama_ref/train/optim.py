"""llama-finetune's optimizer and learning-rate schedule, built in one place for every caller (the CLI, the
benchmark, the memory measurement and prediction)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


def make_optimizer(cfg: Any, model: nn.Module, foreach: Optional[bool] = None) -> torch.optim.Optimizer:
    """SGD or AdamW (``cfg.optimizer``, ``cfg.lr``, ``cfg.weight_decay``: a TrainConfig) over the trainable
    parameters of ``model``. ``foreach=None``: torch's choice (the multi-tensor kernels on CUDA, the per-parameter
    loop on CPU and on fake CPU tensors); a memory prediction for CUDA passes True, as torch would pick there."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, foreach=foreach)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """``constant``, ``linear`` (to 0) or ``cosine`` (to 0) after ``warmup_steps`` of linear warm-up."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown LR schedule {kind!r}; use constant, linear or cosine")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
