# Over 350 lines: property 5's five claims share one calibration; its op rules are in precision_policy.py.
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

Calibration (CPU, torch 2.13; ratio = ||test − fp64|| / ||plain − fp64||). Over 70 models (tiny preset seeds 0–29,
40 random small configs: GQA, SDPA, tied output, 1–2 layers), bf16 and fp16, full fine-tune and LoRA on a half base:
logits 0.73–0.99; each parameter's gradient 0.41–2.51, median 0.85 (2.51: fp16, a one-layer SDPA config; the tiny
preset ≤ 1.23); LoRA on a half base exactly 1.00 in bf16 (both paths round the same tensors), ≤ 1.23 in fp16; loss,
with a floor of eps·|loss|, ≤ 0.28; GradScaler's grad norm ≤ 0.35 and clipped update ≤ 1.39. Hence factor 5 (2x
headroom); the mutants reach 500 to 10^7. One parameter's gradient alone is judged at factor 10: on tensors of a
few dozen entries the ratio is heavy-tailed (up to 7.19 over 2600 seeds of a dim-8 one-head model; see
``CALIBRATION_FACTORS["mixed_precision_grad"]``). Loss curves (8 steps of AdamW, lr 1e-2, clip 1; 100 models: tiny seeds
100–139 and 60 random configs) against fp32 from half-rounded weights: at most 3.49 (bf16) and 3.65 (fp16), median
1.3; that baseline is spiky (14.5 once in 40 other random configs, where MP's curve was 0.26·eps·||curve|| off;
the median is 0.1–0.2 eps·||curve||), so it is floored at 0.1·eps·||curve||: then at most 1.92 (bf16), 3.65 (fp16),
factor 8. GradScaler legitimately skips fp16 steps of large-gradient models at its initial scale of 2^16 (17 of 40
random configs, a LoRA half base 5 times in 240 steps); the fp32 runs skip the same steps.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch

import llama_ref.train.trainer as T  # looked up at call time: the loss is the implementation's, mutants reach it
from llama_ref.lora import apply_lora_to_llama, lora_layers
from llama_ref.loss import IGNORE_INDEX
from llama_ref.model import Transformer
from llama_ref.train.config import half_frozen_base
from llama_ref.train.optim import make_scheduler
from llama_ref.train.trainer import Trainer

from ..compare import CalibratedComparison, compare, compare_calibrated
from .precision_policy import OpRecorder, autocast_observed, precision_policy_problems
from .mixed_precision_step import check_mixed_precision_step
from .precision_policy import dtype_names as _dt
from ..oracles import lr_factor, token_loss_sum, total_grad_norm
from ..result import CheckResult
from ..result import name_list as _names
from ..targets.base import why_not
from ..targets.protocols import MixedPrecisionTarget, TrainStep
from ..targets.spec import as_target
from ..tolerances import CALIBRATION_FACTORS, Tolerance, tolerance

NAME = "mixed_precision"
PROTOCOLS = (MixedPrecisionTarget,)  # what the check reads of a target
FACTORS = CALIBRATION_FACTORS  # "mixed_precision" and "mixed_precision_curve", measured in verify/tolerances.py
CURVE_FLOOR = 0.1  # × eps(half)·||fp32 curve||: the rounded start can land closer than MP's per-step rounding allows
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
LONG_CHUNK = 32  # tokens of the long-position claim: a chunk of positions, so relative angles there are seen
SKIP_LR, SKIP_WARMUP = 1e-3, 48  # the GradScaler claim's warm-up schedule: every step taken changes the lr
Batch = dict[str, torch.Tensor]


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
    """Check property 5 on copies of ``model`` (left untouched), autocasting to ``dtype`` (bf16 or fp16).

    ``lora``: targets of the LoRA-on-a-half-base case (None skips it); ``steps``: length of the training run;
    ``trainer_cls``: the trainer under test (``llama_ref.train.trainer.Trainer`` or a subclass); ``half_base``: how
    the frozen base of a LoRA model is stored in ``dtype`` (``llama-finetune --mp --lora``'s by default);
    ``fail_fast``: skip the remaining claims once one fails (the same verdict, sooner). The GradScaler claims always
    run in fp16 (where supported); the training run in ``dtype`` and fp16. The result's
    ``max_abs`` is the largest |test − reference| of the calibrated comparisons, ``max_rel`` their worst ratio
    (curves excluded; both are in ``criterion``). Raises ValueError for a ``dtype`` other than bf16/fp16 or
    ``steps`` < 1.
    """
    if dtype not in PRECISION_NAMES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target = as_target(model)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    # One dispatch, whoever asks (llama-verify, the pytest plugin, verify.testing): the user's step where given; a
    # foreign model's own step (transformers' Trainer); llama_ref's Trainer as a step where ``full`` is off (a
    # real-size model: LoRA only); else the full check below, driving llama_ref's Trainer itself.
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
    model = target.model
    base = copy.deepcopy(model).float()
    base.kv_caching = False
    device = next(base.parameters()).device
    g = torch.Generator().manual_seed(seed)
    fp16_ok, fp16_why = autocast_observed(device.type, torch.float16)
    weights = next(model.parameters()).dtype
    case = (f"{PRECISION_NAMES[dtype]} {'lora=' + ','.join(lora) if lora else 'full only'} steps={steps}"
            + ("" if weights == torch.float32 else f" from {_dt((weights,))} weights")
            + ("" if fp16_ok else " (no fp16)"))
    failures: list[str] = []
    notes: list[str] = []
    cals: dict[str, CalibratedComparison] = {}
    error: Optional[str] = None

    def run(label: str, fn: Callable[[], list[str]]) -> None:
        nonlocal error
        if fail_fast and failures:
            return
        try:
            failures.extend(f"{label}: {p}" for p in fn())
        except Exception as e:  # the implementation under test crashed: a failure, with its message
            message = f"{type(e).__name__}: {e}"
            failures.append(f"{label}: raised {message}")
            error = error or message

    window = [_random_batch(base.params, g, device) for _ in range(2)]
    run(f"full {PRECISION_NAMES[dtype]}",
        lambda: _autocast_problems(base, window[:1], dtype, cals, "full", trainer_cls))
    if lora:
        run(f"LoRA on a {PRECISION_NAMES[dtype]} base",
            lambda: _autocast_problems(_lora_half_base(base, lora, dtype, g, half_base), window[:1], dtype, cals,
                                       "lora", trainer_cls))
    halves = list(dict.fromkeys([dtype] + ([torch.float16] if fp16_ok else [])))
    run("upcasts", lambda: _upcast_problems(base, halves, g))
    run("long positions", lambda: _long_position_problems(base, halves, g, device, cals, notes))
    if fp16_ok:
        run("GradScaler skip", lambda: _scaler_skip_problems(base, g, device, trainer_cls))
        run("unscale before clip", lambda: _unscale_clip_problems(base, window, cals, trainer_cls))
    else:
        notes.append(f"fp16 not checked (GradScaler, unscale before clip, fp16 loss curve): {fp16_why}")
    run("loss curve", lambda: _curve_problems(base, halves, steps, g, device, cals, notes, trainer_cls))

    worst_abs = max((c.max_abs for c in cals.values()), default=float("inf"))
    def kind(key: str) -> str:  # a comparison's kind is its key's first word; a gradient's is "grad"
        return "grad" if key.split()[1:2] == ["grad"] else key.split()[0]

    def worst(of: Optional[str] = None) -> float:
        ratios = [c.ratio for k, c in cals.items() if (kind(k) == of if of else kind(k) not in ("curve", "rope", "grad"))]
        return max(ratios, default=float("inf"))
    worst_ratio = worst()
    criterion = (f"calibrated {worst_ratio:.2f}x <= {FACTORS['mixed_precision']:g}x, grads {worst('grad'):.2f}x <= "
                 f"{FACTORS['mixed_precision_grad']:g}x, curve {worst('curve'):.2f}x <= "
                 f"{FACTORS['mixed_precision_curve']:g}x, long positions {worst('rope'):.2f}x <= "
                 f"{FACTORS['mixed_precision_rope']:g}x; half matmuls, fp32 reductions, fp32 master, scaler")
    margin = max((c.margin for c in cals.values()), default=0.0)  # each comparison carries its own factor
    if failures and margin <= 1:
        margin = float("inf")  # a failure no calibrated comparison measured (an op's dtype, a skipped step)
    return CheckResult(NAME, not failures, worst_abs, max(worst_ratio, worst("grad")), tolerance(dtype),
                       failures + notes, case, error=error, criterion=criterion, margin=margin)


# ---- autocast forward/backward vs float64 and the plain half path ---------------------------------------------

def _autocast_problems(model: Transformer, window: list[Batch], half: torch.dtype,
                       cals: dict[str, CalibratedComparison], label: str,
                       trainer_cls: type[Trainer] = Trainer) -> list[str]:
    """One window through ``Trainer.step`` (SGD, lr 0) under observation: policy, dtypes, calibrated accuracy."""
    factor = FACTORS[NAME]
    test = copy.deepcopy(model)
    logits: list[torch.Tensor] = []
    hook = test.register_forward_hook(lambda m, args, out: logits.append(out.detach()))
    rec = OpRecorder(test)
    try:
        result, grads, attempts = _step_capturing_grads(test, window, PRECISION_NAMES[half], rec,
                                                        trainer_cls=trainer_cls)
    finally:
        rec.remove()
        hook.remove()
    problems = precision_policy_problems(rec, test, half)
    trainable = {n: p for n, p in test.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in test.named_parameters() if not p.requires_grad}
    if result.skipped:
        return problems + [f"GradScaler skipped all {attempts} attempts at a finite window"]
    problems += _dtype_problems(trainable, frozen, grads, half if label == "lora" else None)
    ref_loss, ref_grads, ref_logits = _float64_window(model, window)
    plain_loss, plain_grads, plain_logits = _plain_window(model, window, half)
    loss_floor = torch.finfo(half).eps * abs(ref_loss)
    checks = {"logits": compare_calibrated(logits[-1], plain_logits, ref_logits, factor),
              "loss": compare_calibrated(torch.tensor(result.loss), torch.tensor(plain_loss),
                                         torch.tensor(ref_loss, dtype=torch.float64), factor, floor=loss_floor)}
    for key, c in checks.items():
        cals[f"{label} {key}"] = c
        if not c.ok:
            problems.append(f"{key} vs float64: {c}")
    per_param = {n: compare_calibrated(grads[n], plain_grads[n], ref_grads[n], FACTORS["mixed_precision_grad"])
                 for n in trainable if grads.get(n) is not None}
    cals.update((f"{label} grad {n}", c) for n, c in per_param.items())
    far = sorted((n for n, c in per_param.items() if not c.ok), key=lambda n: -per_param[n].ratio)
    if far:
        problems.append(f"gradients of {len(far)}/{len(per_param)} parameters too far from float64 ({_names(far)}); "
                        f"worst, {far[0]}: {per_param[far[0]]}")
    return problems


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


def _step_capturing_grads(model: Transformer, window: list[Batch], precision: str, rec: Optional[OpRecorder] = None,
                          max_attempts: int = 16, trainer_cls: type[Trainer] = Trainer):
    """``Trainer.step`` with SGD at lr 0, the gradients captured as the optimizer steps; a step GradScaler skips
    (fp16 overflow at the initial scale) is retried at the lowered scale, as training would."""
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


def _float64_window(model: Transformer, window: list[Batch]):
    return _window_backward(copy.deepcopy(model).double(), window, torch.float64)


def _plain_window(model: Transformer, window: list[Batch], half: torch.dtype):
    """The calibration baseline: everything in ``half``, no autocast, the reference's own upcasts, loss in fp32."""
    return _window_backward(copy.deepcopy(model).to(half), window, torch.float32)


def _lora_half_base(model: Transformer, targets: Sequence[str], half: torch.dtype, g: torch.Generator,
                    half_base: Callable[[Transformer, torch.dtype], Transformer]) -> Transformer:
    lora = copy.deepcopy(model)
    apply_lora_to_llama(lora, 4, 8.0, 0.0, targets, merge_weights=False, lora_dtype=torch.float32, generator=g)
    with torch.no_grad():
        for _, layer in lora_layers(lora):  # B ≠ 0: A gets a gradient, and the update reaches the output
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) / 2)
    return half_base(lora.train(), half)


# ---- the upcasts at the extremes -------------------------------------------------------------------------------

def _upcast_problems(model: Transformer, halves: Sequence[torch.dtype], g: torch.Generator) -> list[str]:
    problems = []
    device = next(model.parameters()).device
    for half in dict.fromkeys(halves):
        eps = torch.finfo(half).eps
        norm = copy.deepcopy(model.norm).to(half)
        x = (torch.randn(2, 8, model.params.dim, generator=g) * 512).to(device, half)  # squares overflow fp16
        with torch.no_grad():
            out = norm(x)
        x64, w64 = x.double(), norm.weight.double()
        expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * w64
        c = compare(out, expected, Tolerance(2 * eps, torch.finfo(half).tiny), "RMSNorm")  # two roundings to half
        if not c.ok or out.dtype != half:
            problems.append(f"RMSNorm on {_dt((half,))} activations of ±512 (output {_dt((out.dtype,))}): {c}")
        logits = (torch.randn(2, 17, model.params.vocab_size, generator=g) * 3).to(device, half)
        labels = torch.randint(0, model.params.vocab_size, (2, 17), generator=g).to(device)
        labels[0, :5] = IGNORE_INDEX
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss = T.token_loss_sum(logits, labels)
        expected_loss = float(token_loss_sum(logits.double(), labels))
        bound = (n + 4) * torch.finfo(torch.float32).eps * expected_loss  # fp32 log-softmax and an n-term sum
        if loss.dtype != torch.float32 or not abs(float(loss) - expected_loss) <= bound:
            problems.append(f"token_loss_sum on {_dt((half,))} logits returned {float(loss):.6f} "
                            f"({_dt((loss.dtype,))}), float64 says {expected_loss:.6f} (allowed ±{bound:.1e})")
    return problems


# ---- long positions: the rotary table of a half model -----------------------------------------------------------

def _long_position_problems(model: Transformer, halves: Sequence[torch.dtype], g: torch.Generator,
                            device: torch.device, cals: dict[str, CalibratedComparison], notes: list[str]) -> list[str]:
    """The whole model in each half dtype, no autocast: logits of one chunk at the end of the context against
    float64, calibrated by the same chunk at position 0."""
    p = model.params
    chunk = min(LONG_CHUNK, p.max_seq_len // 2)
    far = p.max_seq_len - chunk
    if far < 2 * chunk:
        notes.append(f"long positions not checked: max_seq_len={p.max_seq_len} has no position far from the start")
        return []
    tokens = torch.randint(0, p.vocab_size, (2, chunk), generator=g).to(device)
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = {0: exact(tokens, 0), far: exact(tokens, far)}
    problems = []
    factor = FACTORS["mixed_precision_rope"]
    for half in halves:
        test = copy.deepcopy(model).to(half)
        with torch.no_grad():
            near, end = test(tokens, 0), test(tokens, far)
        # The baseline: the error at positions 0 on, moved onto the reference at the far positions (both float64).
        c = compare_calibrated(end, near.double() - ref[0] + ref[far], ref[far], factor)
        cals[f"rope {PRECISION_NAMES[half]}"] = c
        if not c.ok:
            problems.append(f"{PRECISION_NAMES[half]} weights, positions {far}-{far + chunk - 1} vs float64: {c} "
                            f"(the error at positions 0-{chunk - 1} is the baseline; RoPE angles formed in "
                            f"{PRECISION_NAMES[half]}?)")
    return problems


# ---- GradScaler: skipping non-finite steps, unscaling before clipping ------------------------------------------

def _scaler_skip_problems(model: Transformer, g: torch.Generator, device: torch.device,
                          trainer_cls: type[Trainer] = Trainer) -> list[str]:
    """fp16 + AdamW: finite step, inf step, NaN step (both skipped, nothing changed, scale lowered), finite step;
    under a warm-up schedule, where every advance shows, each step's learning rate is the schedule's after the steps
    actually taken (a skipped step does not advance it)."""
    test = copy.deepcopy(model)
    params = dict((n, p) for n, p in test.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params.values(), lr=SKIP_LR, weight_decay=0.01)
    trainer = trainer_cls(test, opt, precision="fp16", clip=1.0,
                          scheduler=make_scheduler(opt, "constant", SKIP_WARMUP, warmup_steps=SKIP_WARMUP))
    results: list = []

    def step(batch: Batch):
        results.append(trainer.step([batch]))
        return results[-1]
    for _ in range(16):  # a first finite step; GradScaler may skip while it finds its scale
        if not step(_random_batch(test.params, g, device)).skipped:
            break
    problems = []
    victim = list(params)[len(params) // 2]
    for bad in (float("inf"), float("nan")):
        before = {n: p.detach().clone() for n, p in params.items()}
        state = copy.deepcopy(opt.state_dict()["state"])
        scale = trainer.scaler.get_scale()
        row0 = torch.tensor([0], device=device)
        handle = params[victim].register_hook(lambda grad, bad=bad: grad.index_fill(0, row0, bad))
        try:
            result = step(_random_batch(test.params, g, device))
        finally:
            handle.remove()
        what = f"a step with {bad} in {victim}.grad"
        changed = [n for n, p in params.items() if not torch.equal(p, before[n])]
        if changed:
            broken = [n for n in changed if not bool(params[n].isfinite().all())]
            return problems + [f"{what} changed parameters: {_names(changed)}"
                               + (f" ({len(broken)} of them now non-finite)" if broken else "")]
        after = opt.state_dict()["state"]
        if not _same_state(state, after):
            problems.append(f"{what} changed the optimizer state")
        if not result.skipped:
            problems.append(f"{what} was not reported skipped (StepResult.skipped is False)")
        if not trainer.scaler.get_scale() < scale:
            problems.append(f"{what} did not lower the scale ({scale:g} -> {trainer.scaler.get_scale():g})")
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(16):  # the lowered scale may still overflow: GradScaler lowers it again
        if not step(_random_batch(test.params, g, device)).skipped:
            break
    if all(torch.equal(p, before[n]) for n, p in params.items()):
        problems.append("no finite step was taken after the two skipped ones (16 tries)")
    return problems + _schedule_problems(results)


def _schedule_problems(results: Sequence) -> list[str]:
    """Each step's lr against the oracle's warm-up factor at the number of steps taken before it."""
    taken, wrong = 0, []
    for i, r in enumerate(results):
        want = SKIP_LR * lr_factor(taken, "constant", SKIP_WARMUP, SKIP_WARMUP)
        if abs(r.lr - want) > 1e-9 * SKIP_LR:
            wrong.append(f"step {i + 1} ({taken} taken before it) used lr {r.lr:.4g}, the schedule gives {want:.4g}")
        taken += not r.skipped
    if not wrong:
        return []
    return [f"the LR schedule does not count optimizer steps actually taken (GradScaler skipped "
            f"{sum(r.skipped for r in results)} of {len(results)}): {_names(wrong, 3)}"]


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if a[k].keys() != b[k].keys():
            return False
        for key, v in a[k].items():
            w = b[k][key]
            if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor):
                return False
            if not (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w):
                return False
    return True


def _unscale_clip_problems(model: Transformer, window: list[Batch], cals: dict[str, CalibratedComparison],
                           trainer_cls: type[Trainer] = Trainer) -> list[str]:
    """fp16 + GradScaler, SGD (lr 1), clipping at a quarter of the true norm, one window of two micro-batches."""
    factor = FACTORS[NAME]
    _, ref_grads, _ = _float64_window(model, window)
    _, plain_grads, _ = _plain_window(model, window, torch.float16)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref_norm = total_grad_norm(ref_grads[n] for n in names)
    plain_norm = total_grad_norm(plain_grads[n] for n in names)
    clip = ref_norm / 4
    test = copy.deepcopy(model)
    params = dict(test.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    trainer = trainer_cls(test, torch.optim.SGD([params[n] for n in names], lr=1.0), precision="fp16", clip=clip)
    for _ in range(16):
        result = trainer.step(window)
        if not result.skipped:
            break
    else:
        return ["GradScaler skipped 16 attempts at a finite window"]

    def update(grads, norm):
        coef = min(1.0, clip / (norm + 1e-6))  # clip_grad_norm_'s definition
        return torch.cat([-coef * grads[n].detach().double().flatten() for n in names])
    test_update = torch.cat([(params[n].detach().double() - before[n].double()).flatten() for n in names])
    checks = {
        "grad_norm": compare_calibrated(torch.tensor(float(result.grad_norm or 0.0), dtype=torch.float64),
                                        torch.tensor(plain_norm), torch.tensor(ref_norm), factor,
                                        floor=torch.finfo(torch.float16).eps * ref_norm),
        "clipped update": compare_calibrated(test_update, update(plain_grads, plain_norm),
                                             update(ref_grads, ref_norm), factor),
    }
    problems = []
    if result.grad_norm is None:
        problems.append("StepResult.grad_norm is None with clipping on")
    for key, c in checks.items():
        cals[f"scaler {key}"] = c
        if not c.ok:
            problems.append(f"{key} vs float64 (pre-clip norm {ref_norm:.4g}, clip {clip:.4g}, StepResult.grad_norm "
                            f"{result.grad_norm}): {c}")
    return problems


# ---- a short training run tracks fp32 --------------------------------------------------------------------------

def _curve_problems(model: Transformer, halves: Sequence[torch.dtype], steps: int, g: torch.Generator,
                    device: torch.device, cals: dict[str, CalibratedComparison], notes: list[str],
                    trainer_cls: type[Trainer] = Trainer) -> list[str]:
    """Each half dtype's loss curve vs fp32's, calibrated by fp32 from half-rounded weights. Steps GradScaler skipped
    (fp16 overflow while it lowers its initial scale) are skipped in the fp32 runs too: same steps, same curve."""
    windows = [[_random_batch(model.params, g, device)] for _ in range(steps)]
    problems = []
    for half in halves:
        name = PRECISION_NAMES[half]
        mixed, skipped = _train(model, windows, name, trainer_cls=trainer_cls)
        if len(skipped) == len(windows):  # legitimate while the scale is too high; the scaler checks cover it
            notes.append(f"{name} loss curve not compared: GradScaler skipped all {steps} steps while lowering its "
                         f"initial scale (use more steps)")
            continue
        fp32, _ = _train(model, windows, "off", skip=skipped, trainer_cls=trainer_cls)
        rounded = copy.deepcopy(model)
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.to(half).to(p.dtype))
        perturbed, _ = _train(rounded, windows, "off", skip=skipped, trainer_cls=trainer_cls)
        c = compare_calibrated(mixed, perturbed, fp32, FACTORS["mixed_precision_curve"],
                               floor=CURVE_FLOOR * torch.finfo(half).eps * float(fp32.norm()))
        cals[f"curve {name}"] = c
        if not c.ok:
            problems.append(f"{name} loss curve vs fp32 (vs fp32 from {name}-rounded weights; steps {skipped} skipped "
                            f"by GradScaler, and in fp32): {c}; fp32 {_curve(fp32)}, {name} {_curve(mixed)}")
    return problems


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


# ---- small helpers ---------------------------------------------------------------------------------------------

def _random_batch(p, g: torch.Generator, device: torch.device, batch: int = 2, length: int = 16) -> Batch:
    """(B, L) right-padded ragged sequences, a masked prompt on the first row; at least one target each."""
    length = min(length, p.max_seq_len)
    ids = torch.randint(0, p.vocab_size, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, : length // 4] = IGNORE_INDEX
    for b in range(1, batch):
        n = int(torch.randint(max(2, length // 2), length + 1, (1,), generator=g))
        ids[b, n:], labels[b, n:] = 0, IGNORE_INDEX
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _curve(losses: torch.Tensor) -> str:
    return "[" + " ".join(f"{v:.4f}" for v in losses.tolist()) + "]"

