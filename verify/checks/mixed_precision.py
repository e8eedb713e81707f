"""Property 5: mixed precision that is really mixed, and still right.

On copies of the model (fp32 master weights), driving ``llama_ref.train.trainer.Trainer`` itself:

* **really mixed** — during the forward under ``Trainer.autocast()``, observed with a ``TorchDispatchMode`` that
  records each aten op with the module it ran in: every ``nn.Linear`` (LoRA's included) runs its matmul in the
  half dtype, and so do the attention matmuls; the reductions the reference upcasts run in fp32 — RMSNorm's mean of
  squares, the attention softmax, the loss's log-softmax. CPU autocast does not upcast ``softmax``, ``pow`` or
  ``mean`` (torch 2.4–2.13), so these upcasts are ours, and with a half residual stream (LoRA on a half base) they
  are all that keeps RMSNorm in fp32;
* **master weights** — trainable parameters and the gradients the optimizer steps with are fp32; with LoRA on a
  half base (``llama-finetune --mp --lora``) the frozen base is stored in the half dtype (half the bytes: the seed's
  mixed precision kept it fp32 and saved nothing) and the adapters and their gradients stay fp32;
* **still right** — logits, loss and every parameter's gradient are compared with a float64 reference (the same
  weights, loss written here independently) and may be at most ``FACTORS["mixed_precision"]`` times further from it
  than the *plain* low-precision path: the same model cast entirely to the half dtype, run without autocast but
  with the reference's fp32 upcasts (its loss taken in fp32 from its fp32 logits). That is what training in the half
  dtype gives with the same code; autocast, which keeps the residual stream, weights and gradients in fp32 and rounds
  only matmul inputs, must do at least about as well;
* **the upcasts hold at the extremes** — RMSNorm on half activations of ±512 (Llama's residual streams reach the
  thousands: "massive activations"; fp16 squares overflow above 256) stays within two roundings of fp64, and
  ``token_loss_sum`` on half logits returns an fp32 sum within fp32 rounding of fp64;
* **GradScaler** (fp16): a step whose gradients hold inf (then NaN) is skipped — parameters and AdamW state
  bit-identical, ``StepResult.skipped`` set — and the scale is lowered; the next finite step is taken; under a
  warm-up schedule every step's learning rate is the schedule's after the optimizer steps actually taken (a skipped
  step does not advance it; the expected rate is the oracle's ``lr_factor``, not the product's). Gradients
  are unscaled before clipping: with clipping binding, ``StepResult.grad_norm`` is the true pre-clip norm
  (calibrated against the plain fp16 path's, not 65536 times it) and the clipped SGD update matches the float64
  one (a window of two micro-batches: one scale for the whole window);
* **long positions** — a model whose weights are all in the half dtype (how Llama 3.2 ships, and the base of
  ``--mp --lora``) gives, for ``LONG_CHUNK`` tokens at the end of its context (``max_seq_len - LONG_CHUNK`` on),
  logits at most ``FACTORS["mixed_precision_rope"]`` times further from float64 than the same tokens at positions
  0 on (RoPE is relative: float64 gives the same logits at both). RoPE angles ``t·θ`` formed in the half dtype
  (transformers#29285) are off by whole radians there; at the first few dozen positions, where the other claims
  run, the error hides in their calibration. A table wrong by the same amount at every position is not this
  claim's to see (its baseline shares it);
* **training tracks fp32** — ``steps`` AdamW steps with clipping in bf16 and in fp16 give a loss curve within
  ``FACTORS["mixed_precision_curve"]`` times the distance that rounding the initial weights to the half dtype once
  (then training in fp32) moves the fp32 curve.

fp16 runs only where ``torch.autocast`` supports it on the model's device (CPU: yes in torch 2.4 and 2.13); where it
does not, the details say so. Autocast around backward or the optimizer is not checked: on CPU (2.4, 2.13) it
changes no op and no bit of the gradients or the AdamW update (backward ops take their forward's dtypes).

The factors and the measurements behind them are in :mod:`verify.tolerances` (``CALIBRATION_FACTORS``:
"mixed_precision", "mixed_precision_grad", "mixed_precision_curve", "mixed_precision_rope"). The claims live in
``mixed_precision_autocast.py``, ``mixed_precision_range.py``, ``mixed_precision_scaler.py`` and
``mixed_precision_curve.py``; on a model other than llama_ref's, ``mixed_precision_step.py`` checks a training step.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch

from llama_ref.model import Transformer
from llama_ref.train.config import half_frozen_base
from llama_ref.train.trainer import Trainer

from ..findings import FAILING
from ..result import CheckResult
from ..targets.base import why_not
from ..targets.protocols import MixedPrecisionTarget, TrainStep
from ..targets.spec import as_target
from ..tolerances import tolerance
from .mixed_precision_autocast import autocast_claim, lora_half_base
from .mixed_precision_base import FACTORS, NAME, PRECISION_NAMES, ClaimFindings, random_batch
from .mixed_precision_curve import curve_claim
from .mixed_precision_range import long_position_claim, upcast_claim
from .mixed_precision_scaler import scaler_skip_claim, unscale_clip_claim
from .mixed_precision_step import check_mixed_precision_step
from .precision_policy import autocast_observed
from .precision_policy import dtype_names as _dt

PROTOCOLS = (MixedPrecisionTarget,)  # what the check reads of a target


def autocast_dtype(model: Any) -> torch.dtype:
    """fp16 for a model (or target) stored in fp16, else bf16: the autocast dtype a run of the checks uses."""
    if isinstance(model, torch.nn.Module):
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = weight.dtype if weight is not None else None
    else:
        dtype = getattr(getattr(model, "limits", None), "dtype", None)
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def check_mixed_precision(model: Any, *, dtype: torch.dtype = torch.bfloat16, train_step: Optional[TrainStep] = None,
                          full: bool = True, lora: Optional[Sequence[str]] = ("wq", "wv", "w2"), seed: int = 0,
                          steps: int = 8, trainer_cls: type[Trainer] = Trainer,
                          half_base: Callable[[Transformer, torch.dtype], Transformer] = half_frozen_base,
                          fail_fast: bool = False) -> CheckResult:
    """Check property 5 on copies of ``model`` (left untouched), autocasting to ``dtype``.

    The one dispatch, whoever asks (``llama-verify``, the pytest plugin, :mod:`verify.testing`): ``train_step``
    where given; else, on a model other than llama_ref's, the target's own mixed-precision step (transformers'
    ``Trainer``; N/A where it has none); on llama_ref's with ``full`` off, its ``Trainer`` as such a step (LoRA only);
    else the claims above, driving llama_ref's ``Trainer`` itself.

    Args:
        model: llama_ref's ``Transformer``, another model :func:`verify.targets.spec.as_target` adapts, or a target.
            A target missing a member of ``PROTOCOLS`` gives a not-applicable result naming the member.
        dtype: the autocast dtype, ``torch.bfloat16`` or ``torch.float16`` (else ValueError).
        train_step: the user's mixed-precision step (:class:`verify.targets.protocols.TrainStep`, with its own
            autocast and GradScaler), checked by :func:`verify.checks.mixed_precision_step.check_mixed_precision_step`.
        full: on llama_ref's model, every claim (True) or its Trainer as a step on LoRA only (False: a real-size
            model, whose full fine-tune and float64 copies would not fit); elsewhere, whether the step check also
            trains the fully trainable model.
        lora: targets of the LoRA-on-a-half-base case (None skips it).
        seed: seed of the random windows and adapters.
        steps: length of the training run whose loss curve is compared (>= 1, else ValueError).
        trainer_cls: the trainer under test (``llama_ref.train.trainer.Trainer`` or a subclass).
        half_base: how the frozen base of a LoRA model is stored in ``dtype`` (``llama-finetune --mp --lora``'s).
        fail_fast: skip the remaining claims once one fails (the same verdict, sooner).

    Returns:
        The result: ``max_abs`` the largest |test − reference| of the calibrated comparisons, ``max_rel`` their
        worst ratio (curves and long positions are in ``criterion``). The GradScaler claims always run in fp16
        (where autocast supports it on the device); the training run in ``dtype`` and fp16.
    """
    if dtype not in PRECISION_NAMES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target = as_target(model)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    if train_step is not None:
        return check_mixed_precision_step(target, train_step, seed=seed)
    own = isinstance(target.model, Transformer)
    if not own or not full:
        step = target.mp_step(PRECISION_NAMES[dtype])
        if step is None:
            return CheckResult.na(NAME, "no training loop of its own: give the check your training step, with its "
                                        "autocast and GradScaler (llama-verify --mp-train-step PATH.py:FN; "
                                        "verify.checks.mixed_precision_step)", str(target))
        return check_mixed_precision_step(target, step, full=full, seed=seed,
                                          label="llama_ref's Trainer as a step" if own else target.mp_step_label)
    return _claims(target.model, dtype, lora, seed, steps, trainer_cls, half_base, fail_fast)


def _claims(model: Transformer, dtype: torch.dtype, lora: Optional[Sequence[str]], seed: int, steps: int,
            trainer_cls: type[Trainer], half_base: Callable[[Transformer, torch.dtype], Transformer],
            fail_fast: bool) -> CheckResult:
    """Every claim on llama_ref's model, each on copies of ``model``; their findings gathered."""
    base = copy.deepcopy(model).float()
    base.kv_caching = False
    device = next(base.parameters()).device
    g = torch.Generator().manual_seed(seed)
    fp16_ok, fp16_why = autocast_observed(device.type, torch.float16)
    weights = next(model.parameters()).dtype
    case = (f"{PRECISION_NAMES[dtype]} {'lora=' + ','.join(lora) if lora else 'full only'} steps={steps}"
            + ("" if weights == torch.float32 else f" from {_dt((weights,))} weights")
            + ("" if fp16_ok else " (no fp16)"))
    found = ClaimFindings()

    def run(label: str, claim: Callable[[ClaimFindings], None]) -> None:
        if fail_fast and found.failed:
            return
        mine = ClaimFindings()
        try:
            claim(mine)
        except Exception as e:  # the implementation under test crashed: a failure, with its message
            mine.raised(f"{type(e).__name__}: {e}", detail=f"raised {type(e).__name__}: {e}")
        found.merge(mine, label)

    window = [random_batch(base.params, g, device) for _ in range(2)]
    run(f"full {PRECISION_NAMES[dtype]}", lambda f: autocast_claim(base, window[:1], dtype, f, "full", trainer_cls))
    if lora:
        run(f"LoRA on a {PRECISION_NAMES[dtype]} base",
            lambda f: autocast_claim(lora_half_base(base, lora, dtype, g, half_base), window[:1], dtype, f, "lora",
                                     trainer_cls))
    halves = list(dict.fromkeys([dtype] + ([torch.float16] if fp16_ok else [])))
    run("upcasts", lambda f: upcast_claim(base, halves, g, f))
    run("long positions", lambda f: long_position_claim(base, halves, g, device, f))
    if fp16_ok:
        run("GradScaler skip", lambda f: scaler_skip_claim(base, g, device, f, trainer_cls))
        run("unscale before clip", lambda f: unscale_clip_claim(base, window, f, trainer_cls))
    else:
        found.not_applicable(f"fp16 not checked (GradScaler, unscale before clip, fp16 loss curve): {fp16_why}")
    run("loss curve", lambda f: curve_claim(base, halves, steps, g, device, f, trainer_cls))
    return _result(found, dtype, case)


def _result(found: ClaimFindings, dtype: torch.dtype, case: str) -> CheckResult:
    """The verdict from the findings' kinds; the measurements from the calibrated comparisons, each with its factor."""
    cals = [c.comparison for c in found.calibrations]
    overall, grads = found.worst("mixed_precision"), found.worst("mixed_precision_grad")
    criterion = (f"calibrated {overall:.2f}x <= {FACTORS['mixed_precision']:g}x, grads {grads:.2f}x <= "
                 f"{FACTORS['mixed_precision_grad']:g}x, curve {found.worst('mixed_precision_curve'):.2f}x <= "
                 f"{FACTORS['mixed_precision_curve']:g}x, long positions {found.worst('mixed_precision_rope'):.2f}x <= "
                 f"{FACTORS['mixed_precision_rope']:g}x; half matmuls, fp32 reductions, fp32 master, scaler")
    found.measure(max((c.max_abs for c in cals), default=float("inf")), max(overall, grads),
                  max((c.margin for c in cals), default=0.0))  # each comparison carries its own factor
    found.entries.sort(key=lambda f: f.kind not in FAILING)  # failures first, then what was noted (stable)
    return found.result(NAME, case, tolerance(dtype), criterion)


__all__ = ["NAME", "FACTORS", "PRECISION_NAMES", "PROTOCOLS", "autocast_dtype", "check_mixed_precision"]
