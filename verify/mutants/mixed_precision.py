"""The bug zoo of property 5 (mixed precision): mistakes real training code shipped, each the smallest patch of
``llama_ref`` that reproduces it. Listed in ``verify.mutants``' registry.

Left out, because they are equivalent here: autocast around ``backward()`` or ``optimizer.step()`` (on CPU,
torch 2.4 and 2.13, it changes no op's dtype and no bit of the gradients or of an AdamW update: backward ops take
their forward's dtypes), and ``scaler.update()`` alone called every micro-batch (torch refuses it at once: "No inf
checks were recorded prior to update").
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import llama_ref.train.config as FT
import llama_ref.model as M
import llama_ref.train.trainer as T
import verify.checks.mixed_precision as MP
from llama_ref.train.data import IGNORE_INDEX

from .base import Mutant, Patch, collector

PROP = MP.NAME
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)


def _trainer_step(self: T.Trainer, window: Sequence[T.Batch], *, clip_first: bool = False,
                  bypass_scaler: bool = False) -> T.StepResult:
    """``Trainer.step`` as written in llama_ref.train.trainer (keep in sync), with one of two known mistakes switched on."""
    n_tokens = sum(T.count_target_tokens(b["labels"]) for b in window)
    if n_tokens == 0:
        raise ValueError("a window without target tokens: every label is IGNORE_INDEX")
    total = torch.zeros((), dtype=torch.float32)
    for batch in window:
        total += self.micro_step(batch, n_tokens).cpu()
    loss = float(total) / n_tokens
    if not math.isfinite(loss):
        self.optimizer.zero_grad(set_to_none=True)
        raise T.NonFiniteLossError(f"window loss is {loss}: step not taken")
    lr = self.optimizer.param_groups[0]["lr"]
    grad_norm: Optional[float] = None
    if clip_first and self.clip is not None:  # the threshold compared with *scaled* gradients
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
    if self.scaler is not None:
        self.scaler.unscale_(self.optimizer)
    if not clip_first and self.clip is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
    if self.clip is not None and self.scaler is None and not math.isfinite(grad_norm):
        self.optimizer.zero_grad(set_to_none=True)
        raise T.NonFiniteLossError(f"gradient norm is {grad_norm} (loss {loss:.4g}): step not taken")
    skipped = False
    if self.scaler is not None:
        scale = self.scaler.get_scale()
        if bypass_scaler:
            self.optimizer.step()  # steps even when the unscaled gradients hold inf/NaN
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale
    else:
        self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    if self.scheduler is not None and not skipped:
        self.scheduler.step()
    return T.StepResult(loss, n_tokens, grad_norm, lr, skipped)


@mutant("mp_trainable_params_half", "the model cast to the autocast dtype (model.half()) before training",
        "`model.half()` + GradScaler: torch's \"Attempting to unscale FP16 gradients\" (forums, HF issues); in bf16 "
        "the master weights silently lose precision")
def _params_half() -> list[Patch]:
    original = T.Trainer.__init__

    def __init__(self, model, optimizer, **kwargs):
        original(self, model, optimizer, **kwargs)
        if self.dtype is not None:
            model.to(self.dtype)
    return [(T.Trainer, "__init__", __init__)]


@mutant("mp_clip_before_unscale", "gradients clipped while still multiplied by the loss scale",
        "loops that add clip_grad_norm_ to the AMP recipe without scaler.unscale_ (torch AMP examples warn)")
def _clip_before_unscale() -> list[Patch]:
    return [(T.Trainer, "step", lambda self, window: _trainer_step(self, window, clip_first=True))]


@mutant("mp_optimizer_step_bypasses_scaler", "optimizer.step() instead of scaler.step(optimizer)",
        "loops that unscale_ for clipping and then call optimizer.step() themselves: inf/NaN steps are taken")
def _bypass_scaler() -> list[Patch]:
    return [(T.Trainer, "step", lambda self, window: _trainer_step(self, window, bypass_scaler=True))]


@mutant("mp_scaler_step_per_micro_batch", "scaler.step + scaler.update run for every micro-batch of a window",
        "the AMP recipe pasted inside a gradient-accumulation loop (torch AMP docs: update once per effective batch)")
def _scaler_per_micro_batch() -> list[Patch]:
    def micro_step(self, batch, window_tokens):
        with self.autocast():
            logits = self.model(batch["input_ids"], 0)
            loss_sum = T.token_loss_sum(logits, batch["labels"])
        loss = loss_sum / window_tokens
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
        return loss_sum.detach()
    return [(T.Trainer, "micro_step", micro_step)]


@mutant("mp_autocast_wrong_device", "autocast for a device type the model is not on: silently fp32",
        "the seed report's autocast('cuda', ...) hard-coded, run on another device (torch only warns)")
def _autocast_wrong_device() -> list[Patch]:
    def autocast(self):
        other = "cuda" if self.device_type == "cpu" else "cpu"
        with warnings.catch_warnings():  # torch's "Disabling autocast" warning: the check must not need it
            warnings.simplefilter("ignore")
            return torch.autocast(other, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)
    return [(T.Trainer, "autocast", autocast)]


@mutant("mp_rmsnorm_no_upcast", "RMSNorm's mean of squares computed in the activations' dtype",
        "Meta's RMSNorm with `.float()` / `.type_as(x)` dropped (fp16 squares overflow above 256)")
def _rmsnorm_no_upcast() -> list[Patch]:
    return [(M.RMSNorm, "forward", lambda self, x: self._norm(x) * self.weight)]


@mutant("mp_softmax_in_half", "attention softmax in the half dtype (mask cast to the scores' dtype)",
        "Meta's attention with `F.softmax(scores.float(), -1).type_as(xq)` reduced to `F.softmax(scores, -1)`",
        attn_impl="math")
def _softmax_in_half() -> list[Patch]:
    def attention_math(q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)  # Meta: mask.type_as(h)
        return torch.matmul(F.softmax(scores, dim=-1), v)
    return [(M, "attention_math", attention_math),
            (M, "ATTENTION_IMPLS", {**M.ATTENTION_IMPLS, "math": attention_math})]


@mutant("mp_loss_on_half_logits", "cross-entropy on the logits' own (half) dtype",
        "HF-style `lm_head(h)` logits fed to cross_entropy without `.float()` (Llama's logits.float() came later)")
def _loss_on_half_logits() -> list[Patch]:
    def token_loss_sum(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return [(T, "token_loss_sum", token_loss_sum)]


@mutant("mp_frozen_base_kept_fp32", "with --mp --lora the frozen base stays fp32 (half copies made per matmul)",
        "the seed report: LoRA+MP took more memory than fp32 LoRA (9,630 vs 7,521 MB): mixed precision saved nothing")
def _frozen_base_fp32() -> list[Patch]:
    return [(FT, "half_frozen_base", lambda model, half: model)]
