"""What property 5's claims share: the constants, the findings they record (each calibrated comparison typed by
the factor that judges it) and the float64 / plain-half reference windows (:mod:`verify.checks.mixed_precision`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from llama_ref.loss import IGNORE_INDEX
from llama_ref.model import Transformer

from ..compare import CalibratedComparison
from ..findings import FAILING, Finding, Findings
from ..oracles import token_loss_sum
from ..tolerances import CALIBRATION_FACTORS
from ..targets.base import cast_floating

NAME = "mixed_precision"
FACTORS = CALIBRATION_FACTORS  # "mixed_precision", "…_grad", "…_curve", "…_rope": measured in verify/tolerances.py
CURVE_FLOOR = 0.1  # × eps(half)·||fp32 curve||: the rounded start can land closer than MP's per-step rounding allows
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
LONG_CHUNK = 32  # tokens of the long-position claim: a chunk of positions, so relative angles there are seen
SKIP_LR, SKIP_WARMUP = 1e-3, 48  # the GradScaler claim's warm-up schedule: every step taken changes the lr
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Calibration:
    """One calibrated comparison and the factor of :data:`FACTORS` that judged it."""

    factor: str  # "mixed_precision" (logits, loss, the scaler's norm and update), "mixed_precision_grad", …
    label: str
    comparison: CalibratedComparison


class ClaimFindings(Findings):
    """A claim's findings, and its calibrated comparisons kept with the factor that judged each."""

    def __init__(self) -> None:
        super().__init__()
        self.calibrations: list[Calibration] = []

    def calibrated(self, factor: str, label: str, c: CalibratedComparison) -> bool:
        """Record ``c`` (made with ``FACTORS[factor]``); whether it passed. The caller words the failure."""
        self.calibrations.append(Calibration(factor, label, c))
        return bool(c.ok)

    def worst(self, *factors: str) -> float:
        """The largest ratio among the comparisons judged by ``factors``; inf where there is none."""
        return max((c.comparison.ratio for c in self.calibrations if c.factor in factors), default=float("inf"))

    def merge(self, other: "ClaimFindings", label: str) -> None:
        """``other``'s findings, its failures prefixed with the claim's ``label``."""
        self.entries += [Finding(f.kind, f"{label}: {f.message}") if f.kind in FAILING else f for f in other.entries]
        self.calibrations += other.calibrations
        self.error = self.error or other.error


def random_batch(p, g: torch.Generator, device: torch.device, batch: int = 2, length: int = 16) -> Batch:
    """(B, L) right-padded ragged sequences, a masked prompt on the first row; at least one target each."""
    length = min(length, p.max_seq_len)
    ids = torch.randint(0, p.vocab_size, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, : length // 4] = IGNORE_INDEX
    for b in range(1, batch):
        n = int(torch.randint(max(2, length // 2), length + 1, (1,), generator=g))
        ids[b, n:], labels[b, n:] = 0, IGNORE_INDEX
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _window_backward(model: Transformer, window: list[Batch], loss_dtype: torch.dtype):
    n = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    total, logits = 0.0, None
    for b in window:
        logits = model(b["input_ids"], 0)
        loss = token_loss_sum(logits.to(loss_dtype), b["labels"]) / n
        loss.backward()
        total += float(loss.detach())
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    return total, grads, logits.detach()


def float64_window(model: Transformer, window: list[Batch]):
    """The exact answer: loss, gradients and last logits of ``window`` on a float64 copy (the oracle's loss)."""
    return _window_backward(copy.deepcopy(model).double(), window, torch.float64)


def plain_window(model: Transformer, window: list[Batch], half: torch.dtype):
    """The calibration baseline: everything in ``half``, no autocast, the reference's own upcasts, loss in fp32."""
    return _window_backward(cast_floating(copy.deepcopy(model), half), window, torch.float32)
