# Over 350 lines: property 2's check and its calibrated large-batch reference, kept side by side.
"""Property 2: gradient accumulation equals the large batch.

Windows of ragged, prompt-masked sequences, split into micro-batches in several ways (one micro-batch of all N, N of
size 1, unequal splits, and a stream grouped by ``windows(…, K)`` whose last window is shorter than K), are trained
with ``Trainer.step`` on copies of the model. At every step an independent oracle takes the trainer's parameters and
optimizer state and runs **one batch per window**, its loss the mean over all non-ignored target tokens of the
window. Compared:

* the gradients the optimizer steps with and the learning rate it steps with (captured by a step pre-hook, i.e.
  after clipping and after any scheduler call), and that ``optimizer.step`` runs exactly once per window;
* ``StepResult``: the loss (the true window mean, never a scaled one), the token count, the pre-clip gradient norm
  and the learning rate;
* every parameter after the step — SGD with momentum and AdamW with weight decay (taking turns over the scenarios),
  clipping that binds (``clip="auto"``) except in the last of several scenarios, which runs unclipped (under binding
  clipping a uniformly scaled loss hides in a step that reports no norm), a warm-up + cosine (or linear) schedule;
* for a full fine-tune and for a frozen base with LoRA on every target (dropout 0: micro-batching must not change
  dropout masks; ``B`` drawn non-zero so that ``A`` gets a gradient).

The oracle shares nothing with the training loop but the model's forward: its loss is log_softmax + gather over the
shifted targets; its clipping is ``clip_grad_norm_``'s definition written out (total 2-norm over all trainable
gradients, scale by ``min(1, max_norm / (norm + 1e-6))``); its learning rate is the schedule's formula set on the
param groups; it steps a torch optimizer of the same class and hyper-parameters on its own copy.

Judging (DESIGN §4). Accumulating changes the order of the same sums, so the gradients differ from the large batch's
at the rounding level — and for LoRA's ``A``/``B``, sums over tokens with much cancellation, that level fails
assert_close's fp32 elementwise rule (measured: ``verify.tolerances``, ``CALIBRATION_FACTORS["grad_accum"]``).
Gradients and parameters are therefore **calibrated**: the trainer's may be at most ``CALIBRATION_FACTOR`` times
further (2-norm over all tensors) from a float64 run of the oracle, from the same state, than the oracle's own
model-dtype run is. The reported norm may be off by that much too (|‖a‖ − ‖b‖| ≤ ‖a − b‖); the loss is compared
with the float64 oracle's and the learning rates with the schedule's by assert_close's defaults. Every step is
judged from the trainer's own state, so rounding does not compound over steps.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..compare import compare, compare_calibrated
from ..oracles import IGNORE_INDEX, clip_coefficient, lr_factor, mean_token_loss, total_grad_norm
from ..findings import Findings
from ..result import CheckResult, describe_exception
from ..targets.base import why_not
from ..targets.protocols import TrainingTarget, TrainStep
from ..targets.spec import as_target
from ..targets.train_step import UserStepDriver
from ..tolerances import CALIBRATION_FACTORS, tolerance
from .grad_accum_diagnosis import diagnose

NAME = "grad_accum"
PROTOCOLS = (TrainingTarget,)  # what the check reads of a target
CALIBRATION_FACTOR = CALIBRATION_FACTORS[NAME]  # measured and justified in verify/tolerances.py
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    # eps 1e-6 (RoBERTa's) rather than 1e-8: Adam's update lr·g/(|g| + eps) turns the rounding of near-zero gradients
    # into parameter noise up to lr·δ/eps, in the large batch and GA alike; at 1e-8 it dominated the parameter error
    # and made the calibrated ratio heavy-tailed (measured: verify.tolerances, [grad_accum: AdamW eps]).
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1, eps=1e-6)),
}
Batch = dict[str, torch.Tensor]


# ---- the oracle: written from the definitions, sharing no code with llama_ref.train.trainer ----------------------------


def random_sequences(n: int, vocab_size: int, max_len: int, g: torch.Generator) -> list[Batch]:
    """``n`` sequences of 2 … ``max_len`` tokens; labels IGNORE_INDEX over a prompt of random length — none for
    every third sequence, so that a label sits at position 0 there (counting unshifted labels shows) — and the
    token ids elsewhere. Every sequence has at least one target."""
    seqs = []
    for i in range(n):
        length = int(torch.randint(2, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, vocab_size, (length,), generator=g)
        labels = ids.clone()
        labels[:0 if i % 3 == 0 else int(torch.randint(1, length, (1,), generator=g))] = IGNORE_INDEX
        seqs.append({"input_ids": ids, "labels": labels})
    return seqs


def padded(seqs: Sequence[Batch], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded batch (B, Lmax): pad id 0, IGNORE_INDEX labels (built here, not by ``collate``)."""
    ids = torch.zeros(len(seqs), max(len(s["input_ids"]) for s in seqs), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, s in enumerate(seqs):
        ids[b, :len(s["input_ids"])] = s["input_ids"]
        labels[b, :len(s["labels"])] = s["labels"]
    return ids.to(device), labels.to(device)


@dataclass
class _Step:
    loss: float
    n_tokens: int
    norm: Optional[float]  # before clipping; None without clipping
    lr: float
    grads: dict[str, Optional[torch.Tensor]]  # what the optimizer stepped with (after clipping)
    params: dict[str, torch.Tensor]  # every trainable parameter after the step
    frozen: dict[str, tuple[float, float]]  # every frozen one's (sum, sum of squares), in float64: unchanged?
    pre_clip: Optional[dict[str, Optional[torch.Tensor]]] = None  # oracle only
    stepped_lr: Optional[float] = None  # the lr in param_groups when optimizer.step ran (trainer only)
    reports_stats: bool = True  # the step reports token count, norm and lr (llama_ref's Trainer; a user's: no)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """The trainable parameters, copied; of the frozen ones (a LoRA base: most of a real-size model) only a
    fingerprint, exact enough to see any change and costing no copy."""
    trainable, frozen = {}, {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            trainable[n] = p.detach().clone()
        else:
            x = p.detach().double()
            frozen[n] = (float(x.sum()), float(x.square().sum()))
    return trainable, frozen


def _grads(params: dict[str, torch.nn.Parameter]) -> dict[str, Optional[torch.Tensor]]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()}


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    cls, hyper = OPTIMIZERS[kind]
    return cls(list(_trainable(model).values()), **hyper)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _oracle_step(target: Any, model: nn.Module, opt: torch.optim.Optimizer, window: Sequence[Batch], lr: float,
                 clip: Optional[float]) -> _Step:
    """One large batch: mean token loss over the whole window, backward, clip, set lr, step (on ``model``/``opt``,
    which hold the state the trainer starts this step from)."""
    params = _trainable(model)
    ids, labels = padded(window, _device(model))
    loss = mean_token_loss(target.train_logits(model, ids), labels)
    loss.backward()
    pre_clip = _grads(params)
    norm = None
    if clip is not None:
        norm = total_grad_norm([p.grad for p in params.values() if p.grad is not None])
        if clip_coefficient(norm, clip) < 1.0:
            with torch.no_grad():
                for p in params.values():
                    if p.grad is not None:
                        p.grad.mul_(clip_coefficient(norm, clip))
    for group in opt.param_groups:
        group["lr"] = lr
    stepped = _grads(params)
    opt.step()
    opt.zero_grad(set_to_none=True)
    n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return _Step(float(loss.detach()), n_tokens, norm, lr, stepped, *_snapshot(model), pre_clip)


# ---- the code under test, driven as llama-finetune drives it, judged step by step ---------------------------------

@dataclass
class _Scenario:
    label: str
    sizes: list[int]  # sequences per micro-batch, in stream order
    ga: int  # micro-batches per window


def _run(target: Any, models: tuple[nn.Module, nn.Module, nn.Module], start: dict[str, torch.Tensor],
         pool: Sequence[Batch], sc: _Scenario, kind: str, clip: Optional[float], schedule: str, warmup: int,
         found: Findings, train_step: Optional[TrainStep]) -> int:
    """Train ``models[0]`` from ``start`` on ``sc`` (with the user's ``train_step``, else the target's own loop),
    judging every step against the oracle run on ``models[1]`` (model dtype) and ``models[2]`` (float64); returns
    how many steps clipping bound in."""
    net, ref, exact = models
    device = _device(net)
    bounds = [0]
    for s in sc.sizes:
        bounds.append(bounds[-1] + s)
    micro = [dict(zip(("input_ids", "labels"), padded(pool[a:b], device))) for a, b in zip(bounds, bounds[1:])]
    expected = [micro[i:i + sc.ga] for i in range(0, len(micro), sc.ga)]
    seqs = [pool[bounds[i]:bounds[min(i + sc.ga, len(micro))]] for i in range(0, len(micro), sc.ga)]

    net.load_state_dict(start)
    net.zero_grad(set_to_none=True)
    opt, ref_opt, exact_opt = _optimizer(kind, net), _optimizer(kind, ref), _optimizer(kind, exact)
    driver = (UserStepDriver(train_step, net, opt, clip) if train_step is not None else
              target.step_driver(net, opt, clip=clip, schedule=schedule, total_steps=len(expected), warmup=warmup))
    params = _trainable(net)
    captured: list[tuple[dict[str, Optional[torch.Tensor]], float]] = []
    opt.register_step_pre_hook(lambda *_: captured.append((_grads(params), opt.param_groups[0]["lr"])))

    grouped = driver.windows(micro, sc.ga)
    if [[id(b) for b in w] for w in grouped] != [[id(b) for b in w] for w in expected]:
        found.fail(f"{sc.label}: windows() grouped {len(micro)} micro-batches with ga={sc.ga} as "
                       f"{[len(w) for w in grouped]}, expected {[len(w) for w in expected]} in order")
    base_lr = OPTIMIZERS[kind][1]["lr"]
    n_bound = 0
    for i, window in enumerate(grouped[:len(seqs)]):
        lr = base_lr * lr_factor(i, schedule, len(expected), warmup)
        outcome = []
        for model, optim in ((ref, ref_opt), (exact, exact_opt)):
            model.load_state_dict(net.state_dict())
            model.zero_grad(set_to_none=True)
            optim.load_state_dict(_cloned(opt.state_dict()))  # load_state_dict may alias the trainer's tensors
            outcome.append(_oracle_step(target, model, optim, seqs[i], lr, clip))
        want, truth = outcome
        n_bound += want.norm is not None and want.norm > clip
        captured.clear()
        result = driver.step(window, lr)
        if len(captured) != 1:
            found.fail(f"{sc.label} step {i + 1}: optimizer.step ran {len(captured)} times in one window")
        grads, stepped_lr = captured[-1] if captured else ({}, None)
        got = _Step(result.loss, result.n_tokens, result.grad_norm, result.lr, grads, *_snapshot(net),
                    stepped_lr=stepped_lr, reports_stats=train_step is None)
        clipped = clip is not None and any(n is not None and n > clip for n in (want.norm, got.norm))
        _judge(f"{sc.label} step {i + 1}", got, want, truth, found, target.limits.dtype, window, sc.ga, clipped)
    return n_bound


def _cloned(state: dict) -> dict:
    return {"state": {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                      for k, s in state["state"].items()},
            "param_groups": [dict(group) for group in state["param_groups"]]}


def _judge(where: str, got: _Step, want: _Step, truth: _Step, found: Findings, model_dtype: torch.dtype,
           window: Sequence[Batch], ga: int, clipped: bool) -> None:
    """``got`` (trainer) against ``want`` (oracle, model dtype) and ``truth`` (oracle, float64, same state). The loss
    is judged at the tolerance of the dtype the model computes in (``model_dtype``), not its trainable parameters':
    PEFT keeps a bf16 base's adapters in fp32."""
    if got.reports_stats and got.n_tokens is not None and got.n_tokens != want.n_tokens:  # None: not reported
        found.fail(f"{where}: StepResult.n_tokens {got.n_tokens} != {want.n_tokens} target tokens")
    dtype = next(iter(want.params.values())).dtype
    loss_label = "StepResult.loss" if got.reports_stats else "the logged loss"
    for what, a, e, tol in ((loss_label, got.loss, truth.loss, tolerance(model_dtype)),
                            ("StepResult.lr", got.lr, want.lr, tolerance(torch.float64)),
                            ("the lr optimizer.step ran with", got.stepped_lr, want.lr, tolerance(torch.float64))):
        if a is not None and not compare(torch.tensor(a, dtype=torch.float64), torch.tensor(e, dtype=torch.float64),
                                         tol, "loss" if what == loss_label else "lr").ok:
            scaled = what == loss_label and e and abs(a / e - 1) > 1e-3  # a rounding is not a scaling
            found.fail(f"{where}: {what} {a:.7g} != oracle {e:.7g} ({tol}"
                       + (f"; {a / e:.4g}x it): the logged loss is not the window's token mean" if scaled else ")"))
    for what in ("grads", "params"):
        a, e, t = getattr(got, what), getattr(want, what), getattr(truth, what)
        if sorted(a) != sorted(t) or any((a[n] is None) != (t[n] is None) for n in t):
            missing = sorted(n for n in t if a.get(n) is None and t[n] is not None)
            extra = sorted(n for n in a if a[n] is not None and t.get(n) is None)
            found.fail(f"{where} {what}: missing for {missing[:3]}, unexpected for {extra[:3]}")
            continue
        names = [n for n in t if t[n] is not None]
        flat = [torch.cat([d[n].flatten().double() for n in names]) for d in (a, e, t)]
        # the floor's norm is over every parameter, frozen ones included (their error is 0 on both sides)
        frozen_sq = sum(sq for _, sq in truth.frozen.values()) if what == "params" else 0.0
        cal = compare_calibrated(flat[0], flat[1], flat[2], CALIBRATION_FACTOR,
                                 floor=torch.finfo(dtype).eps * math.sqrt(float(flat[2].square().sum()) + frozen_sq),
                                 name=what)
        found.measure(float((flat[0] - flat[1]).abs().max()), margin=cal.margin)  # margin: ratio ÷ the factor
        if not cal.ok:
            ratios = sorted(((float((a[n].double() - t[n]).norm()) / max(float((e[n].double() - t[n]).norm()),
                                                                          1e-30), n) for n in names), reverse=True)
            found.fail(f"{where} {what}: {cal}; worst " + ", ".join(f"{n} {r:.3g}x" for r, n in ratios[:3])
                           + (diagnose(flat[0], flat[2], window, want.n_tokens, ga, clipped) if what == "grads" else ""))
    changed = sorted(n for n in want.frozen if got.frozen.get(n) != want.frozen[n])
    if changed:
        found.fail(f"{where}: frozen parameters changed by the step: {', '.join(changed[:3])}"
                       + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
    if not got.reports_stats:
        return
    if (got.norm is None) != (want.norm is None):
        found.fail(f"{where}: StepResult.grad_norm is {got.norm} with clipping "
                       f"{'off' if want.norm is None else 'on'}")
    elif want.norm is not None:
        names = [n for n, g in truth.pre_clip.items() if g is not None]
        plain = math.sqrt(sum(float((want.pre_clip[n].double() - truth.pre_clip[n]).pow(2).sum()) for n in names))
        norms = [torch.tensor(x, dtype=torch.float64) for x in (got.norm, truth.norm + plain, truth.norm)]  # plain: a bound
        cal = compare_calibrated(*norms, CALIBRATION_FACTOR, torch.finfo(dtype).eps * truth.norm, "grad_norm")
        if not cal.ok:
            found.fail(f"{where}: StepResult.grad_norm {got.norm:.7g} vs the float64 pre-clip norm {truth.norm:.7g}: "
                       f"off by {cal.error:.2e} > {cal.factor * max(cal.plain_error, cal.floor):.2e} "
                       f"({CALIBRATION_FACTOR:g}x the large batch's gradient error)")


def default_splits(n: int, g: Optional[torch.Generator] = None) -> list[list[int]]:
    """One micro-batch of all ``n``, ``n`` of size 1, ``[1, 3, n-4]`` (n > 4) and (with ``g``) a random split."""
    splits = [[n], [1] * n] + ([[1, 3, n - 4]] if n > 4 else [])
    if g is not None and n > 2:
        cuts = sorted(set((torch.randperm(n - 1, generator=g)[:2] + 1).tolist()))
        splits.append([b - a for a, b in zip([0, *cuts], [*cuts, n])])
    return [s for i, s in enumerate(splits) if s not in splits[:i]]


def _variant(target: Any, lora: bool, g: torch.Generator) -> Optional[nn.Module]:
    """A fresh training copy: fully trainable, or (``lora``) a frozen base with LoRA — on every target where the
    target applies it, the model's own adapters where it comes adapted; None where it has none — with ``A`` and a
    non-zero ``B`` drawn from ``g`` (so that ``A`` gets a gradient). Dropout off: micro-batching must not change
    dropout masks, and accumulation is what is checked."""
    if not lora:
        m = target.fresh_model().train().requires_grad_(True)
    else:
        m = target.fresh_lora_model(None, 4, 8, 0.0, torch.Generator().manual_seed(0))  # A is redrawn below
        if m is None:
            return None
        m.train()
        with torch.no_grad():
            for layer in target.lora_layers(m):
                a, b = layer.lora_A, layer.lora_B
                a.copy_((torch.randn(a.shape, generator=g) / math.sqrt(a.shape[1])).to(a))
                b.copy_((torch.randn(b.shape, generator=g) / math.sqrt(layer.rank)).to(b))
    for module in m.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return m


def check_grad_accumulation(model: Any, *, n_sequences: int = 6,
                            splits: Optional[Sequence[Sequence[int]]] = None, stream_ga: Optional[int] = 3,
                            optimizer: Union[str, Sequence[str]] = ("sgd", "adamw"),
                            clip: Union[float, str, None] = "auto", steps: int = 3, schedule: str = "cosine",
                            warmup: int = 1, lora: Sequence[bool] = (False, True), max_len: int = 12,
                            seed: int = 0, trainer_cls: Optional[type] = None,
                            train_step: Optional[TrainStep] = None, fail_fast: bool = False) -> CheckResult:
    """Check property 2 on copies of ``model`` — a target or a model :func:`verify.targets.spec.as_target` adapts —
    which is left untouched, trained by ``train_step`` (the user's :class:`verify.targets.protocols.TrainStep`) or, where
    none is given, the target's own loop: llama_ref's ``Trainer`` (or ``trainer_cls``, a subclass under test).

    Args:
        model: a target (:class:`verify.targets.protocols.TrainingTarget`) or a model ``as_target`` adapts; one missing
            a member of ``PROTOCOLS`` is not applicable, naming it — as is one with no loop and no ``train_step``.
        n_sequences: sequences per window (>= 1, else ValueError).
        splits: micro-batch sizes, each split non-empty parts summing to ``n_sequences`` (else ValueError); each
            trains ``steps`` windows of fresh sequences with ``ga = len(split)``. Default: :func:`default_splits`.
        stream_ga: K (>= 2, else ValueError): a stream of ``K·(steps-1) + r`` micro-batches of 1–3 sequences
            (0 < r < K) grouped into windows of K, the last one short. None: no stream.
        optimizer: "sgd", "adamw" (:data:`OPTIMIZERS`), or several taking turns over the scenarios; another name
            raises ValueError. AdamW is skipped on a pure fp16 model (it diverges there, large batch and GA alike).
        clip: a positive max norm, None, or "auto" (half the first window's pre-clip norm: it binds); else ValueError.
        steps: windows (optimizer steps) per scenario (>= 1, else ValueError).
        schedule: "constant", "linear" or "cosine" after ``warmup`` steps; another raises ValueError.
        warmup: warm-up steps of the schedule.
        lora: the variants: False a full fine-tune, True a frozen base + LoRA (skipped, saying so, without LoRA).
        max_len: the longest sequence in tokens (capped at the target's ``max_seq_len``).
        seed: seed of the sequences, the random split, the stream's sizes and the adapters' weights.
        trainer_cls: with llama_ref's model, a ``Trainer`` subclass under test (None: llama_ref's ``Trainer``).
        train_step: the user's step, trained instead of the target's own loop (it reports no token count or norm).
        fail_fast: stop after the first scenario that fails (the same verdict, sooner; its details only).

    Returns:
        The result: ``max_abs`` the largest |trainer − oracle in the model dtype| over gradients and parameters,
        ``margin`` the worst calibrated ratio ÷ ``CALIBRATION_FACTOR`` (the ratio itself is in ``criterion``).
    """
    target = as_target(model, trainer_cls=trainer_cls)
    why = why_not(target, NAME, PROTOCOLS)
    if why is None and train_step is None and not target.own_train_loop:
        why = ("no training loop of its own: give the check your training step (train_step=, llama-verify "
               "--train-step PATH.py:FN)")
    if why:
        return CheckResult.na(NAME, why, str(target))
    lim = target.limits
    dtype = lim.dtype
    kinds = [optimizer] if isinstance(optimizer, str) else list(optimizer)
    unknown = [k for k in kinds if k not in OPTIMIZERS]
    if unknown or not kinds:
        raise ValueError(f"unknown optimizer(s) {unknown or kinds!r}; use {sorted(OPTIMIZERS)}")
    if n_sequences < 1 or steps < 1 or (stream_ga is not None and stream_ga < 2):
        raise ValueError(f"need n_sequences >= 1, steps >= 1 and stream_ga None or >= 2; got {n_sequences}, "
                         f"{steps}, {stream_ga}")
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; use constant, linear or cosine")
    if not (clip is None or clip == "auto" or (isinstance(clip, (int, float)) and clip > 0)):
        raise ValueError(f"clip must be a positive max norm, None or 'auto', got {clip!r}")
    note = ""
    if dtype == torch.float16 and "adamw" in kinds:
        # Pure-fp16 AdamW (no fp32 master weights, no GradScaler: property 5's business) underflows its second
        # moment and diverges to NaN in a step or two, large batch and GA alike; SGD is still a fair test there.
        kinds, note = ["sgd"], " (adamw skipped: pure fp16)"
    g = torch.Generator().manual_seed(seed)
    splits = [list(s) for s in splits] if splits is not None else default_splits(n_sequences, g)
    for s in splits:
        if sum(s) != n_sequences or min(s) < 1:
            raise ValueError(f"split {s} does not divide {n_sequences} sequences into non-empty micro-batches")
    scenarios = [_Scenario(f"split {s}", s * steps, len(s)) for s in splits]
    if stream_ga is not None:
        n_micro = stream_ga * (steps - 1) + int(torch.randint(1, stream_ga, (1,), generator=g))
        sizes = torch.randint(1, 4, (n_micro,), generator=g).tolist()
        scenarios.append(_Scenario(f"stream ga={stream_ga} sizes {sizes}", sizes, stream_ga))
    pool = random_sequences(max(sum(sc.sizes) for sc in scenarios), lim.vocab_size, min(max_len, lim.max_seq_len), g)
    case = (f"N={n_sequences} splits={len(splits)} stream_ga={stream_ga} steps={steps} {schedule}(warmup {warmup}) "
            f"{'/'.join(kinds)}{note} {'+'.join('lora' if v else 'full' for v in lora)} "
            f"{str(dtype).replace('torch.', '')}")
    found = Findings()  # max_abs: |trainer − oracle| over gradients and parameters; margin: worst ratio ÷ factor
    # With clipping on, the last of several scenarios runs without it: clipping that binds rescales the gradients
    # to max_norm, so a uniformly scaled loss would show in no stepped gradient (nor, in a user's step that reports
    # no norm, anywhere); one scenario alone keeps its clipping and the note below says what went unexamined.
    unclip_last = clip is not None and len(scenarios) > 1
    try:
        bound = total = n_unclipped = 0
        for use_lora in lora:
            base = _variant(target, use_lora, g)
            if base is None:
                found.not_applicable("the LoRA variant not checked: the model has no LoRA layers")
                continue
            max_norm = clip
            if clip == "auto":  # half the first window's norm: binds at the first step at least
                ids, labels = padded(pool[:n_sequences], lim.device)
                mean_token_loss(target.train_logits(base, ids), labels).backward()  # no step: base unchanged
                max_norm = 0.5 * total_grad_norm([q.grad for q in base.parameters() if q.grad is not None])
                base.zero_grad(set_to_none=True)
            # The oracle's model-dtype twin shares the frozen tensors (a LoRA base is never written); the float64
            # one cannot. The start state copies what training changes and keeps the rest by reference.
            shared = {id(q): q for q in base.parameters() if not q.requires_grad}
            models = (base, copy.deepcopy(base, memo=dict(shared)), copy.deepcopy(base).double())
            trainable_names = {n for n, q in base.named_parameters() if q.requires_grad}
            start = {k: v.clone() if k in trainable_names or k not in dict(base.named_parameters()) else v
                     for k, v in base.state_dict().items()}
            for j, sc in enumerate(scenarios):
                kind = kinds[j % len(kinds)]
                free = unclip_last and j == len(scenarios) - 1
                labelled = _Scenario(f"{'lora' if use_lora else 'full'} {kind} {sc.label}"
                                     + (" unclipped" if free else ""), sc.sizes, sc.ga)
                bound += _run(target, models, start, pool, labelled, kind, None if free else max_norm, schedule,
                              warmup, found, train_step)
                n_steps = -(-len(sc.sizes) // sc.ga)
                n_unclipped += n_steps if free else 0
                total += 0 if free else n_steps
                if fail_fast and found.failed:
                    break
            if fail_fast and found.failed:
                break
        if clip is not None:
            case += f" clip={clip} (bound in {bound}/{total} steps, {n_unclipped} unclipped)"
            if not n_unclipped and bound == total and train_step is not None:  # its own loops report the norm
                found.not_applicable("every step was clipped and no pre-clip norm reported: a uniformly scaled "
                                     "loss would not show (give several scenarios, or clip=None)")
        return found.result(NAME, case, criterion=f"calibrated <= {CALIBRATION_FACTOR:g}x (worst "
                                                  f"{found.margin * CALIBRATION_FACTOR:.2f}x)")
    except Exception as e:  # the implementation under test crashed: a failure, with its message
        found.raised(describe_exception(e), aborts=True)
        return found.result(NAME, case)
