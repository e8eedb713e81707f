"""Property 5 on the user's own training step: mixed precision that is really mixed, and still right.

The step (:class:`verify.targets.protocols.TrainStep`) brings its own autocast and, for fp16, its own ``GradScaler``;
the check observes it from outside, on fresh copies of the target's model:

* **really mixed** — while the step runs (a ``TorchDispatchMode`` records each op with the module it ran in):
  every ``nn.Linear`` and attention matmul in one half dtype (the step's: the dtype its first Linear matmul ran
  in; fp32 there is "not mixed"), and the softmax, log-softmax / NLL and every norm's mean of squares in fp32;
* **master weights** — at ``optimizer.step`` the trainable parameters and the gradients it steps with are fp32;
* **still right** — those gradients against a float64 reference (the same model, the loss as the mean over all
  target tokens) may be at most ``CALIBRATION_FACTORS["mixed_precision"]`` times further from it than the *plain*
  half path's (the model cast to the half dtype, the loss taken in fp32 from its logits), over all of them, and
  ``["mixed_precision_grad"]`` times for each parameter; a gradient that is a multiple of the reference's is
  reported as a scaled loss;
* **GradScaler** (fp16) — a step whose gradients hold inf leaves every parameter bit-identical (it is skipped);
  the step is given a ``max_norm`` 10x the true gradient norm, which never binds on unscaled gradients and always
  on scaled ones, so clipping before unscaling shows in the gradients.

Not asked of a user's step (llama_ref's own check asks them of its trainer): the upcasts at extreme activations,
the long-position logits of half weights, and the loss curve against fp32 (a user's step has one precision).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import nn

from ..compare import compare_calibrated, scale_factor
from ..oracles import mean_token_loss
from ..findings import FAILING, Findings
from ..result import CheckResult, describe_exception
from ..result import name_list as _names
from ..targets.base import cast_floating, why_not
from ..targets.lora import draw_nonzero_b
from ..targets.protocols import TrainingCopies, TrainStep
from ..targets.spec import as_target
from ..tolerances import CALIBRATION_FACTORS
from .grad_accum import padded, random_sequences
from .precision_policy import MATMULS, OpRecorder, dtype_names, precision_policy_problems

NAME = "mixed_precision"
HALVES = (torch.bfloat16, torch.float16)
Batch = dict[str, torch.Tensor]


def _window(vocab: int, max_len: int, g: torch.Generator, device: torch.device) -> list[Batch]:
    """One micro-batch of 2 ragged, prompt-masked sequences (the GA check's)."""
    return [dict(zip(("input_ids", "labels"), padded(random_sequences(2, vocab, max_len, g), device)))]


def _captured_step(step: TrainStep, model: nn.Module, window: list[Batch], optimizer: torch.optim.Optimizer,
                   max_norm: Optional[float]) -> list[dict[str, Optional[torch.Tensor]]]:
    """Run the user's step; the gradients each ``optimizer.step`` ran with (GradScaler calls it only when the
    gradients are finite, after unscaling them)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    seen: list[dict[str, Optional[torch.Tensor]]] = []
    handle = optimizer.register_step_pre_hook(
        lambda *_: seen.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()}))
    try:
        step(model, optimizer, window, max_norm)
    finally:
        handle.remove()
    return seen


def _reference_grads(target: Any, model: nn.Module, window: list[Batch], dtype: torch.dtype
                     ) -> dict[str, torch.Tensor]:
    """The gradients of the window's token-mean loss on a copy of ``model`` cast to ``dtype``, the loss in fp32 (or
    fp64) from its logits."""
    twin = cast_floating(copy.deepcopy(model), dtype)
    twin.zero_grad(set_to_none=True)
    loss = sum(mean_token_loss(target.train_logits(twin, b["input_ids"]), b["labels"]) for b in window)
    loss.backward()
    return {n: p.grad.detach().double() for n, p in twin.named_parameters() if p.requires_grad and p.grad is not None}


def check_mixed_precision_step(model: Any, train_step: TrainStep, *, full: bool = True, lora: bool = True,
                               seed: int = 0, attempts: int = 4, label: str = "the user's step") -> CheckResult:
    """Check property 5 on the user's ``train_step`` (with its own autocast and GradScaler) over copies of
    ``model`` — a target or a model :func:`verify.targets.spec.as_target` adapts — left untouched.

    Args:
        model: a target or a model ``as_target`` adapts. A target missing a member of
            :class:`verify.targets.protocols.TrainingCopies` (all the check reads of it) gives a not-applicable
            result naming the member, as does one whose own ``not_applicable`` answer says so.
        train_step: the user's step (:class:`verify.targets.protocols.TrainStep`), with its own autocast and, for
            fp16, GradScaler; its half dtype is the one its first Linear matmul runs in (fp32 there: "not mixed").
        full: check the model with every parameter trainable.
        lora: check its LoRA variant (a frozen base, kept in the dtype the model stores it in), where it has one;
            a model without LoRA layers skips it, saying so.
        seed: seed of the windows and the adapters' ``B`` (drawn non-zero).
        attempts: how many windows GradScaler may skip while it lowers its initial scale before a step is taken
            (all skipped: a failure).
        label: names the step in the result's case (e.g. "llama_ref's Trainer as a step").

    Returns:
        The result: ``max_abs`` the largest |stepped gradient − float64 reference|; ``max_rel`` and ``margin`` the
        worst calibrated ratio ÷ its factor, over all gradients together (``CALIBRATION_FACTORS["mixed_precision"]``)
        and each parameter's (``["mixed_precision_grad"]``). A step that raises fails with ``error`` set.
    """
    target = as_target(model)
    why = why_not(target, NAME, (TrainingCopies,))  # a forward without autograd, say
    if why:
        return CheckResult.na(NAME, why, str(target))
    lim = target.limits
    g = torch.Generator().manual_seed(seed)
    factor, grad_factor = CALIBRATION_FACTORS[NAME], CALIBRATION_FACTORS["mixed_precision_grad"]
    found = Findings()  # max_abs: the stepped gradients vs float64; max_rel and margin: the worst margin
    half: Optional[torch.dtype] = None
    autocast_seen: list[bool] = []
    case = f"{label} on {target}"
    try:
        variants = [("full", target.fresh_model().train().requires_grad_(True))] if full else []
        if lora:
            lora_model = target.fresh_lora_model(None, 4, 8, 0.0, g)
            if lora_model is None:
                found.not_applicable("the LoRA variant not checked: the model has no LoRA layers")
            else:
                draw_nonzero_b(target.lora_layers(lora_model), g)
                variants.append(("lora", lora_model.train()))
        for variant, net in variants:
            for module in net.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0  # the reference must see the same forward
            window = _window(lim.vocab_size, min(12, lim.max_seq_len), g, lim.device)
            start = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
            exact = _reference_grads(target, net, window, torch.float64)
            # Clipping at 10x the true norm never binds on true gradients, and always on scaled ones: a step that
            # clips before unscaling shrinks its gradients 10^3-10^4 fold.
            max_norm = 10 * math.sqrt(sum(float(t.square().sum()) for t in exact.values()))
            rec = OpRecorder(net)
            seen: list = []
            hooks = [m.register_forward_pre_hook(  # was autocast on where the Linear layers ran (accelerate enters it
                lambda m, args: autocast_seen.append(torch.is_autocast_enabled(lim.device.type)))  # inside forward)
                for m in net.modules() if isinstance(m, nn.Linear)]
            try:
                with rec:
                    for _ in range(attempts):  # GradScaler skips while its scale is too high: try another window
                        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.0)
                        seen = _captured_step(train_step, net, window, opt, max_norm)
                        if seen:
                            break
            finally:
                rec.remove()
                for hook in hooks:
                    hook.remove()
            linear_dtypes = [d for _, m, op, d in rec.ops if isinstance(m, nn.Linear) and op in MATMULS]
            half = next((d[0] for d in linear_dtypes if d), None) if half is None else half
            if half not in HALVES:
                ran = dtype_names((half,)) if half else "no dtype"
                found.fail(f"{variant}: not mixed: its Linear matmuls ran in {ran} (no autocast around the forward)")
                continue
            for p in precision_policy_problems(rec, net, half):
                found.fail(f"{variant}: {p}")
            if not seen:
                found.fail(f"{variant}: optimizer.step never ran in {attempts} windows (GradScaler skipped them all)")
                continue
            if len(seen) != 1:
                found.fail(f"{variant}: optimizer.step ran {len(seen)} times in one window")
            grads = seen[-1]
            not_fp32 = [f"{n} ({dtype_names((p.dtype,))})" for n, p in net.named_parameters()
                        if p.requires_grad and p.dtype != torch.float32]
            not_fp32 += [f"{n}.grad ({dtype_names((t.dtype,))})" for n, t in grads.items()
                         if t is not None and t.dtype != torch.float32]
            if not_fp32:
                found.fail(f"{variant}: master weights / their gradients not fp32: {_names(not_fp32)}")
            missing = [n for n, t in grads.items() if t is None]
            if missing:
                found.fail(f"{variant}: trainable parameters with no gradient at the step: {_names(missing)}")
            with torch.no_grad():  # the check's reference runs from the weights the step started from
                for n, p in net.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            plain = _reference_grads(target, net, window, half)
            names = [n for n in exact if grads.get(n) is not None and n in plain]
            flat = [torch.cat([d[n].flatten().double() for n in names]) for d in (grads, plain, exact)]
            cal = compare_calibrated(flat[0], flat[1], flat[2], factor, name="gradients")
            found.measure(float((flat[0] - flat[2]).abs().max()), cal.margin, cal.margin)
            if not cal.ok:
                c = scale_factor(flat[0], flat[2])
                scaled = (f"; they are {c:.4g}x the reference's: scaled (a window loss that is not the token mean, "
                          "or clipping applied while they were still scaled)") if c and abs(c - 1) > 1e-2 else ""
                found.fail(f"{variant} gradients vs float64: {cal}{scaled}")
            per = {n: compare_calibrated(grads[n], plain[n], exact[n], grad_factor, name=f"grad {n}") for n in names}
            for c in per.values():
                found.measure(max_rel=c.margin, margin=c.margin)
            far = sorted((n for n, c in per.items() if not c.ok), key=lambda n: -per[n].ratio)
            if far and cal.ok:
                found.fail(f"{variant}: gradients of {len(far)}/{len(per)} parameters too far from float64 "
                               f"({_names(far)}); worst, {far[0]}: {per[far[0]]}")
            if half == torch.float16:
                for p in _skip_problems(train_step, net, window):
                    found.fail(f"{variant}: {p}")
        ran = (f"{dtype_names((half,)) if half else '?'} autocast" if any(autocast_seen) else
               f"{dtype_names((half,)) if half else '?'} matmuls, no autocast")  # what really ran, not what was meant
        case = (f"{label}, {ran}, "
                f"{'+'.join(v for v, _ in variants)}, one window of 2 ragged sequences")
        found.entries.sort(key=lambda f: f.kind not in FAILING)  # failures first, then what went unexamined
        return found.result(NAME, case,
                           criterion=f"calibrated <= {factor:g}x (grads each <= {grad_factor:g}x); half matmuls, "
                                     "fp32 reductions, fp32 master" + (", GradScaler skip" if half == torch.float16
                                                                        else ""))
    except Exception as e:  # the implementation under test crashed: a failure, with its message
        found.raised(describe_exception(e), aborts=True)
        return found.result(NAME, case)


def _skip_problems(step: TrainStep, model: nn.Module, window: list[Batch]) -> list[str]:
    """fp16: a step whose gradients hold inf must leave every parameter bit-identical (GradScaler skips it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    handle = params[0].register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        step(model, opt, window, None)
    finally:
        handle.remove()
    changed = sum(not torch.equal(p, b) for p, b in zip(params, before))
    if changed:
        return [f"a step with inf gradients changed {changed}/{len(params)} trainable parameters (fp16 needs "
                "GradScaler, which skips such steps)"]
    return []
