"""Training steps as users write them (``verify.targets.base.TrainStep``), for the GA check's tests and for
``llama-verify --train-step tests/verify/targets/train_steps.py:FN``.

:func:`seed_step` is the seed report's loop (``../shared/seed/report.txt``), written anew: each micro-batch's mean
cross-entropy divided by ``ACCUMULATION_STEPS`` = 8 and backpropagated, one optimizer step at the end of the
window, and the scaled loss of the last micro-batch logged; it does not clip. :func:`token_mean_step` is the
correct one: the window's loss is the mean over all its target tokens. :func:`per_micro_count_step` logs that mean
too, but divides the window's summed loss by a micro-batch's average token count instead of the window's (the
data-parallel factor of transformers#34511, here over micro-batches): its gradients are exactly K times the right
ones, which clipping that binds normalises away.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
ACCUMULATION_STEPS = 8  # the seed's constant


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)


def seed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Sequence[dict],
              max_norm: Optional[float]) -> float:
    loss_fct = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    for batch in window:
        logits = model(batch["input_ids"], 0)
        loss = loss_fct(*_shifted(logits, batch["labels"]))
        loss = loss / ACCUMULATION_STEPS
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def token_mean_step(model, optimizer, window, max_norm):
    n_tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in window)
    total = 0.0
    for batch in window:
        logits = model(batch["input_ids"], 0)
        loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        (loss_sum / n_tokens).backward()
        total += float(loss_sum.detach())
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n_tokens


def per_micro_count_step(model, optimizer, window, max_norm):
    n_tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in window)
    per_micro = n_tokens / len(window)  # a micro-batch's token count on average, where the window's belongs
    total = 0.0
    for batch in window:
        logits = model(batch["input_ids"], 0)
        loss_sum = F.cross_entropy(*_shifted(logits, batch["labels"]), ignore_index=-100, reduction="sum")
        (loss_sum / per_micro).backward()
        total += float(loss_sum.detach())
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n_tokens  # the logged loss is right


def autocast_step(dtype: torch.dtype):
    """``token_mean_step`` under ``torch.autocast(dtype)``, with a GradScaler for fp16 (unscaled before clipping)."""
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None

    def step(model, optimizer, window, max_norm):
        n_tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in window)
        total = 0.0
        for batch in window:
            with torch.autocast("cpu", dtype=dtype):
                logits = model(batch["input_ids"], 0)
            loss_sum = F.cross_entropy(*_shifted(logits, batch["labels"]), ignore_index=-100, reduction="sum")
            loss = loss_sum / n_tokens
            (scaler.scale(loss) if scaler else loss).backward()
            total += float(loss_sum.detach())
        if scaler:
            scaler.unscale_(optimizer)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / n_tokens
    return step


bf16_step = autocast_step(torch.bfloat16)
fp16_step = autocast_step(torch.float16)


def seed_mp_step(model, optimizer, window, max_norm):
    """The seed report's mixed-precision loop: autocast fp16 around the forward and its shifted cross-entropy, the
    loss divided by ACCUMULATION_STEPS = 8, GradScaler('cuda') as it wrote it (here the CPU's), no clipping."""
    scaler = _SEED_SCALER
    for batch in window:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(batch["input_ids"], 0)
            loss = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(*_shifted(logits, batch["labels"]))
        loss = loss / ACCUMULATION_STEPS
        scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    return loss.item()


_SEED_SCALER = torch.amp.GradScaler("cpu")


class _Calling(torch.nn.Module):
    """A model whose plain forward is ``forward(model, tokens)``, called as the steps here call one:
    ``model(tokens, 0)``."""

    def __init__(self, model: torch.nn.Module, forward):
        super().__init__()
        self.model, self._forward = model, forward

    def forward(self, tokens: torch.Tensor, _start_pos: int = 0) -> torch.Tensor:
        return self._forward(self.model, tokens)


def through(step, forward=lambda model, tokens: model(tokens)):
    """``step`` for a model called otherwise (torchtune's and litgpt's: ``model(tokens)``; one returning a tuple:
    ``lambda model, tokens: model(tokens)[0]``)."""
    return lambda model, optimizer, window, max_norm: step(_Calling(model, forward), optimizer, window, max_norm)


def torchtune_recipe_step(model, optimizer, window, max_norm):
    """The accumulation of torchtune 0.6.1's single-device LoRA recipe (``lora_finetune_single_device.py``), written
    anew in its calling convention (``model(tokens)``): each micro-batch's mean loss over its shifted targets is
    multiplied by the micro-batch's target count — taken on the labels *before* the shift — and backpropagated; at
    the window's end the gradients are scaled by 1 / the sum of those counts, clipped, stepped. The logged loss is
    the same sum over the same count."""
    counts, total = 0, 0.0
    for batch in window:
        labels = batch["labels"]
        count = int((labels != IGNORE_INDEX).sum())  # counted before the shift, as the recipe does
        logits = model(batch["input_ids"])
        mean = F.cross_entropy(*_shifted(logits, labels), ignore_index=IGNORE_INDEX)
        (mean * count).backward()
        counts += count
        total += float(mean.detach()) * count
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(1 / counts)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / counts


def litgpt_fit_step(model, optimizer, window, max_norm):
    """The accumulation of litgpt 0.5.13's ``finetune/lora.py`` ``fit``, written anew in its calling convention:
    each micro-batch's mean loss over its targets divided by the number of micro-batches and backpropagated — a
    mean of micro-batch means —, then the step (the loop clips nothing); the logged loss the mean of those means."""
    means = []
    for batch in window:
        logits = model(batch["input_ids"])
        mean = F.cross_entropy(*_shifted(logits, batch["labels"]), ignore_index=IGNORE_INDEX)
        (mean / len(window)).backward()
        means.append(float(mean.detach()))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(means) / len(means)
