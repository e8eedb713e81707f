"""Property 5's first claims, on one window through ``Trainer.step`` under autocast: really mixed (the op policy),
master weights fp32 (a LoRA base stored in the half dtype), and logits, loss and each gradient calibrated against
float64 and the plain half path (:mod:`verify.checks.mixed_precision`)."""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch

from llama_ref.lora import apply_lora_to_llama, lora_layers
from llama_ref.model import Transformer
from llama_ref.train.trainer import Trainer

from ..compare import compare_calibrated
from ..result import name_list as _names
from .mixed_precision_base import (FACTORS, NAME, PRECISION_NAMES, Batch, ClaimFindings, float64_window,
                                   plain_window)
from .precision_policy import OpRecorder, precision_policy_problems
from .precision_policy import dtype_names as _dt


def autocast_claim(model: Transformer, window: list[Batch], half: torch.dtype, found: ClaimFindings, label: str,
                   trainer_cls: type[Trainer] = Trainer) -> None:
    """One window through ``Trainer.step`` (SGD, lr 0) under observation: policy, dtypes, calibrated accuracy
    (``label``: "full" or "lora", which also asks that the frozen base be stored in ``half``)."""
    factor = FACTORS[NAME]
    test = copy.deepcopy(model)
    logits: list[torch.Tensor] = []
    hook = test.register_forward_hook(lambda m, args, out: logits.append(out.detach()))
    rec = OpRecorder(test)
    try:
        result, grads, attempts = step_capturing_grads(test, window, PRECISION_NAMES[half], rec,
                                                       trainer_cls=trainer_cls)
    finally:
        rec.remove()
        hook.remove()
    for problem in precision_policy_problems(rec, test, half):
        found.fail(problem)
    trainable = {n: p for n, p in test.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in test.named_parameters() if not p.requires_grad}
    if result.skipped:
        found.fail(f"GradScaler skipped all {attempts} attempts at a finite window")
        return
    for problem in _dtype_problems(trainable, frozen, grads, half if label == "lora" else None):
        found.fail(problem)
    ref_loss, ref_grads, ref_logits = float64_window(model, window)
    plain_loss, plain_grads, plain_logits = plain_window(model, window, half)
    loss_floor = torch.finfo(half).eps * abs(ref_loss)
    checks = {"logits": compare_calibrated(logits[-1], plain_logits, ref_logits, factor, name="logits"),
              "loss": compare_calibrated(torch.tensor(result.loss), torch.tensor(plain_loss),
                                         torch.tensor(ref_loss, dtype=torch.float64), factor, floor=loss_floor,
                                         name="loss")}
    for key, c in checks.items():
        if not found.calibrated(NAME, f"{label} {key}", c):
            found.fail(f"{key} vs float64: {c}")
    per_param = {n: compare_calibrated(grads[n], plain_grads[n], ref_grads[n], FACTORS["mixed_precision_grad"],
                                       name=f"grad {n}")
                 for n in trainable if grads.get(n) is not None}
    for n, c in per_param.items():
        found.calibrated("mixed_precision_grad", f"{label} grad {n}", c)
    far = sorted((n for n, c in per_param.items() if not c.ok), key=lambda n: -per_param[n].ratio)
    if far:
        found.fail(f"gradients of {len(far)}/{len(per_param)} parameters too far from float64 ({_names(far)}); "
                   f"worst, {far[0]}: {per_param[far[0]]}")


def _dtype_problems(trainable: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                    grads: dict[str, Optional[torch.Tensor]], half_base: Optional[torch.dtype]) -> list[str]:
    problems = []
    not_fp32 = [f"{n} ({_dt((p.dtype,))})" for n, p in trainable.items() if p.dtype != torch.float32]
    if not_fp32:
        problems.append(f"trainable parameters not fp32: {_names(not_fp32)}")
    missing = [n for n in trainable if grads.get(n) is None]
    if missing:
        problems.append(f"trainable parameters without a gradient at optimizer.step: {_names(missing)}")
    bad = [f"{n} ({_dt((gr.dtype,))})" for n, gr in grads.items() if gr is not None and gr.dtype != torch.float32]
    if bad:
        problems.append(f"gradients not fp32 at optimizer.step: {_names(bad)}")
    if half_base is not None:
        wrong = [f"{n} ({_dt((p.dtype,))})" for n, p in frozen.items() if p.dtype != half_base]
        if wrong or not frozen:
            stored = sum(p.numel() * p.element_size() for p in frozen.values())
            half_bytes = sum(p.numel() for p in frozen.values()) * torch.finfo(half_base).bits // 8
            problems.append(f"frozen base not stored in {_dt((half_base,))} ({stored / 2**20:.2f} MiB instead of "
                            f"{half_bytes / 2**20:.2f} MiB: mixed precision saves nothing): {_names(wrong)}")
    return problems


def step_capturing_grads(model: Transformer, window: list[Batch], precision: str, rec: Optional[OpRecorder] = None,
                         max_attempts: int = 16, trainer_cls: type[Trainer] = Trainer):
    """``Trainer.step`` with SGD at lr 0, the gradients captured as the optimizer steps; a step GradScaler skips
    (fp16 overflow at the initial scale) is retried at the lowered scale, as training would. Returns the last
    ``StepResult``, the captured gradients by name and the attempts made."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    grads: dict[str, Optional[torch.Tensor]] = {}

    def capture(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                grads[names[id(p)]] = None if p.grad is None else p.grad.detach().clone()
    opt.register_step_pre_hook(capture)
    trainer = trainer_cls(model, opt, precision=precision)
    for attempt in range(1, max_attempts + 1):
        if rec is not None and attempt == 1:
            with rec:
                result = trainer.step(window)
        else:
            result = trainer.step(window)
        if not result.skipped:
            break
    return result, grads, attempt


def lora_half_base(model: Transformer, targets: Sequence[str], half: torch.dtype, g: torch.Generator,
                   half_base: Callable[[Transformer, torch.dtype], Transformer]) -> Transformer:
    """A copy with LoRA (r 4, alpha 8, fp32 adapters, ``B`` drawn non-zero) on ``targets``, its frozen base stored
    in ``half`` by ``half_base`` (the implementation's way, under test)."""
    lora = copy.deepcopy(model)
    apply_lora_to_llama(lora, 4, 8.0, 0.0, targets, merge_weights=False, lora_dtype=torch.float32, generator=g)
    with torch.no_grad():
        for _, layer in lora_layers(lora):  # B ≠ 0: A gets a gradient, and the update reaches the output
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) / 2)
    return half_base(lora.train(), half)
