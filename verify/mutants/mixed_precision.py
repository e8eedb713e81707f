"""The bug zoo of property 5 (mixed precision): mistakes real training code shipped. Training-loop mistakes are
``Trainer`` subclasses overriding the one decision they get wrong (given to the check as ``trainer_cls``); the
model-side ones (RMSNorm, softmax, loss dtype, the frozen base) are the smallest patch of ``llama_ref`` that
reproduces them. Listed in ``verify.mutants``' registry.

Left out, because they are equivalent here: autocast around ``backward()`` or ``optimizer.step()`` (on CPU,
torch 2.4 and 2.13, it changes no op's dtype and no bit of the gradients or of an AdamW update: backward ops take
their forward's dtypes), and ``scaler.update()`` alone called every micro-batch (torch refuses it at once: "No inf
checks were recorded prior to update").
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

import llama_ref.model as M
import llama_ref.train.trainer as T
import verify.checks.mixed_precision as MP
from llama_ref.train.data import IGNORE_INDEX
from llama_ref.train.trainer import Batch, Trainer

from .base import Mutant, Patch, collector

PROP = MP.NAME
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)


@mutant("mp_trainable_params_half", "the model cast to the autocast dtype (model.half()) before training",
        "`model.half()` + GradScaler: torch's \"Attempting to unscale FP16 gradients\" (forums, HF issues); in bf16 "
        "the master weights silently lose precision", component="trainer_cls")
class _ParamsHalf(Trainer):
    def __init__(self, model, optimizer, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        if self.dtype is not None:
            model.to(self.dtype)


@mutant("mp_schedule_advances_on_skipped_step",
        "the LR schedule stepped after every window, also after one GradScaler skipped: the schedule runs ahead of "
        "the optimizer steps taken (torch's 'lr_scheduler.step() before optimizer.step()' warning is the symptom)",
        "Lightning-AI/pytorch-lightning#18828 (scheduler stepped when the optimizer step was skipped), "
        "pytorch/pytorch#55585 (GradScaler's step does not say whether it ran; fixed in transformers#11144)",
        component="trainer_cls")
class _ScheduleOnSkip(Trainer):
    def advance_schedule(self, skipped: bool) -> None:
        self.scheduler.step()


@mutant("mp_clip_before_unscale", "gradients clipped while still multiplied by the loss scale",
        "loops that add clip_grad_norm_ to the AMP recipe without scaler.unscale_ (torch AMP examples warn)",
        component="trainer_cls")
class _ClipBeforeUnscale(Trainer):
    def prepare_gradients(self, loss: float) -> Optional[float]:
        grad_norm = None
        if self.clip is not None:  # the threshold compared with *scaled* gradients
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return grad_norm


@mutant("mp_optimizer_step_bypasses_scaler", "optimizer.step() instead of scaler.step(optimizer)",
        "loops that unscale_ for clipping and then call optimizer.step() themselves: inf/NaN steps are taken",
        component="trainer_cls")
class _BypassScaler(Trainer):
    def apply_update(self) -> bool:
        if self.scaler is None:
            return super().apply_update()
        scale = self.scaler.get_scale()
        self.optimizer.step()  # steps even when the unscaled gradients hold inf/NaN
        self.scaler.update()
        return self.scaler.get_scale() < scale


@mutant("mp_scaler_skips_inf_only", "a hand-written overflow check that skips steps with inf gradients and takes "
        "steps with NaN ones", "overflow checks written as `isinf(g).any()` (an fp16 overflow is inf, but "
        "inf - inf and 0 * inf are NaN); cf. OneTrainer#1154, whose NaN check on the loss lets NaN gradients "
        "through to the optimizer", component="trainer_cls")
class _SkipsInfOnly(Trainer):
    # The check is made where such code makes it: on the unscaled gradients, before clipping (after clipping, an inf
    # step is all NaN — clip_grad_norm_ scales by max_norm / inf = 0 — and would be taken and caught like an inf step).
    def _inf_in_gradients(self) -> bool:
        return any(bool(torch.isinf(p.grad).any()) for p in self.params if p.grad is not None)

    def clip_gradients(self) -> float:
        self._has_inf = self._inf_in_gradients()
        return super().clip_gradients()

    def apply_update(self) -> bool:
        if self.scaler is None:
            return super().apply_update()
        has_inf = self.__dict__.pop("_has_inf", None)
        scale = self.scaler.get_scale()
        if not (self._inf_in_gradients() if has_inf is None else has_inf):  # NaN is not inf: that step is taken
            self.optimizer.step()
        self.scaler.update()  # its own inf/NaN record (from unscale_) still lowers the scale
        return self.scaler.get_scale() < scale


@mutant("mp_scaler_step_per_micro_batch", "scaler.step + scaler.update run for every micro-batch of a window",
        "the AMP recipe pasted inside a gradient-accumulation loop (torch AMP docs: update once per effective batch)",
        component="trainer_cls")
class _ScalerPerMicroBatch(Trainer):
    def micro_step(self, batch: Batch, window_tokens: float) -> torch.Tensor:
        if self.scaler is None:
            return super().micro_step(batch, window_tokens)
        with self.autocast():
            loss_sum = self.loss_sum(batch)
        self.scaler.scale(loss_sum / window_tokens).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_sum.detach()


@mutant("mp_autocast_wrong_device", "autocast for a device type the model is not on: silently fp32",
        "the seed report's autocast('cuda', ...) hard-coded, run on another device (torch only warns)",
        component="trainer_cls")
class _AutocastWrongDevice(Trainer):
    def autocast(self):
        other = "cuda" if self.device_type == "cpu" else "cpu"
        with warnings.catch_warnings():  # torch's "Disabling autocast" warning: the check must not need it
            warnings.simplefilter("ignore")
            return torch.autocast(other, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)


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


@mutant("mp_rope_angles_in_half", "RoPE angles t·θ formed in the model's half dtype (θ itself computed in fp32)",
        "transformers#29285: under autocast the `inv_freq @ position_ids` matmul ran in bf16, wrong by whole radians "
        "on long contexts (fixed by forcing fp32 with autocast off)")
def _rope_angles_in_half() -> list[Patch]:
    exact = M.Transformer.rotary_freqs

    def rotary_freqs(self, start_pos, seqlen, device, dtype=torch.float32):
        if dtype in (torch.float32, torch.float64):
            return exact(self, start_pos, seqlen, device, dtype)
        if (device, dtype) not in self._freqs_cis:
            p = self.params
            theta = 1.0 / (p.rope_theta ** (torch.arange(0, p.head_dim, 2, device=device).float() / p.head_dim))
            if p.use_scaled_rope:
                theta = M.apply_scaling(theta, p.rope_scale_factor)
            t = torch.arange(p.max_seq_len, device=device)
            angles = torch.outer(t.to(dtype), theta.to(dtype)).float()  # the product rounded to the half dtype
            self._freqs_cis[(device, dtype)] = torch.polar(torch.ones_like(angles), angles)
        return self._freqs_cis[(device, dtype)][start_pos:start_pos + seqlen]
    return [(M.Transformer, "rotary_freqs", rotary_freqs)]


@mutant("mp_frozen_base_kept_fp32", "with --mp --lora the frozen base stays fp32 (half copies made per matmul)",
        "the seed report: LoRA+MP took more memory than fp32 LoRA (9,630 vs 7,521 MB): mixed precision saved nothing",
        component="half_base")
def _frozen_base_fp32(model, half):
    return model
