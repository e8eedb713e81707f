"""Property 5's last claim: a short training run in each half dtype tracks the fp32 loss curve, calibrated by fp32
trained from half-rounded weights (:mod:`verify.checks.mixed_precision`)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch

import llama_ref.train.trainer as T  # looked up at call time: the loss is the implementation's, mutants reach it
from llama_ref.model import Transformer
from llama_ref.train.trainer import Trainer

from ..compare import compare_calibrated
from .mixed_precision_base import CURVE_FLOOR, FACTORS, PRECISION_NAMES, Batch, ClaimFindings, random_batch


def curve_claim(model: Transformer, halves: Sequence[torch.dtype], steps: int, g: torch.Generator,
                device: torch.device, found: ClaimFindings, trainer_cls: type[Trainer] = Trainer) -> None:
    """Each half dtype's loss curve vs fp32's, calibrated by fp32 from half-rounded weights. Steps GradScaler skipped
    (fp16 overflow while it lowers its initial scale) are skipped in the fp32 runs too: same steps, same curve."""
    windows = [[random_batch(model.params, g, device)] for _ in range(steps)]
    for half in halves:
        name = PRECISION_NAMES[half]
        mixed, skipped = _train(model, windows, name, trainer_cls=trainer_cls)
        if len(skipped) == len(windows):  # legitimate while the scale is too high; the scaler claims cover it
            found.not_applicable(f"{name} loss curve not compared: GradScaler skipped all {steps} steps while "
                                 "lowering its initial scale (use more steps)")
            continue
        fp32, _ = _train(model, windows, "off", skip=skipped, trainer_cls=trainer_cls)
        rounded = copy.deepcopy(model)
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.to(half).to(p.dtype))
        perturbed, _ = _train(rounded, windows, "off", skip=skipped, trainer_cls=trainer_cls)
        c = compare_calibrated(mixed, perturbed, fp32, FACTORS["mixed_precision_curve"],
                               floor=CURVE_FLOOR * torch.finfo(half).eps * float(fp32.norm()), name="curve")
        if not found.calibrated("mixed_precision_curve", f"curve {name}", c):
            found.fail(f"{name} loss curve vs fp32 (vs fp32 from {name}-rounded weights; steps {skipped} skipped "
                       f"by GradScaler, and in fp32): {c}; fp32 {_curve(fp32)}, {name} {_curve(mixed)}")


def _train(model: Transformer, windows: list[list[Batch]], precision: str, skip: Sequence[int] = (),
           trainer_cls: type[Trainer] = Trainer) -> tuple[torch.Tensor, list[int]]:
    """Losses of AdamW + clipping via ``Trainer.step``, and the steps GradScaler skipped; windows in ``skip`` are
    only evaluated (the loss a step would report), not stepped."""
    test = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in test.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    trainer = trainer_cls(test, opt, precision=precision, clip=1.0)
    losses, skipped = [], []
    for i, window in enumerate(windows):
        if i in skip:
            with torch.no_grad():
                total = sum(float(T.token_loss_sum(test(b["input_ids"], 0), b["labels"])) for b in window)
            losses.append(total / sum(T.count_target_tokens(b["labels"]) for b in window))
            continue
        result = trainer.step(window)
        losses.append(result.loss)
        if result.skipped:
            skipped.append(i)
    return torch.tensor(losses, dtype=torch.float64), skipped


def _curve(losses: torch.Tensor) -> str:
    return "[" + " ".join(f"{v:.4f}" for v in losses.tolist()) + "]"
