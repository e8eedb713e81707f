"""Property 5's GradScaler claims (fp16): a step whose gradients hold inf, then NaN, is skipped with parameters and
AdamW state bit-identical, reported skipped and the scale lowered, the next finite step taken, and the LR schedule
counts only the steps taken; gradients are unscaled before clipping (:mod:`verify.checks.mixed_precision`)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from llama_ref.model import Transformer
from llama_ref.train.optim import make_scheduler
from llama_ref.train.trainer import Trainer

from ..compare import compare_calibrated
from ..oracles import clip_coefficient, lr_factor, total_grad_norm
from ..result import name_list as _names
from .mixed_precision_base import (FACTORS, NAME, SKIP_LR, SKIP_WARMUP, Batch, ClaimFindings, float64_window,
                                   plain_window, random_batch)


def scaler_skip_claim(model: Transformer, g: torch.Generator, device: torch.device, found: ClaimFindings,
                      trainer_cls: type[Trainer] = Trainer) -> None:
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
        if not step(random_batch(test.params, g, device)).skipped:
            break
    victim = list(params)[len(params) // 2]
    for bad in (float("inf"), float("nan")):
        before = {n: p.detach().clone() for n, p in params.items()}
        state = copy.deepcopy(opt.state_dict()["state"])
        scale = trainer.scaler.get_scale()
        row0 = torch.tensor([0], device=device)
        handle = params[victim].register_hook(lambda grad, bad=bad: grad.index_fill(0, row0, bad))
        try:
            result = step(random_batch(test.params, g, device))
        finally:
            handle.remove()
        what = f"a step with {bad} in {victim}.grad"
        changed = [n for n, p in params.items() if not torch.equal(p, before[n])]
        if changed:
            broken = [n for n in changed if not bool(params[n].isfinite().all())]
            found.fail(f"{what} changed parameters: {_names(changed)}"
                       + (f" ({len(broken)} of them now non-finite)" if broken else ""))
            return
        if not same_state(state, opt.state_dict()["state"]):
            found.fail(f"{what} changed the optimizer state")
        if not result.skipped:
            found.fail(f"{what} was not reported skipped (StepResult.skipped is False)")
        if not trainer.scaler.get_scale() < scale:
            found.fail(f"{what} did not lower the scale ({scale:g} -> {trainer.scaler.get_scale():g})")
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(16):  # the lowered scale may still overflow: GradScaler lowers it again
        if not step(random_batch(test.params, g, device)).skipped:
            break
    if all(torch.equal(p, before[n]) for n, p in params.items()):
        found.fail("no finite step was taken after the two skipped ones (16 tries)")
    _schedule_problems(results, found)


def _schedule_problems(results: Sequence, found: ClaimFindings) -> None:
    """Each step's lr against the oracle's warm-up factor at the number of steps taken before it."""
    taken, wrong = 0, []
    for i, r in enumerate(results):
        want = SKIP_LR * lr_factor(taken, "constant", SKIP_WARMUP, SKIP_WARMUP)
        if abs(r.lr - want) > 1e-9 * SKIP_LR:
            wrong.append(f"step {i + 1} ({taken} taken before it) used lr {r.lr:.4g}, the schedule gives {want:.4g}")
        taken += not r.skipped
    if wrong:
        found.fail(f"the LR schedule does not count optimizer steps actually taken (GradScaler skipped "
                   f"{sum(r.skipped for r in results)} of {len(results)}): {_names(wrong, 3)}")


def same_state(a: dict, b: dict) -> bool:
    """Two optimizer ``state_dict()["state"]`` bit-identical: the same keys, every tensor ``torch.equal``."""
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


def unscale_clip_claim(model: Transformer, window: list[Batch], found: ClaimFindings,
                       trainer_cls: type[Trainer] = Trainer) -> None:
    """fp16 + GradScaler, SGD (lr 1), clipping at a quarter of the true norm, one window of two micro-batches: the
    reported pre-clip norm and the clipped update calibrated against float64 (not 65536 times them)."""
    factor = FACTORS[NAME]
    _, ref_grads, _ = float64_window(model, window)
    _, plain_grads, _ = plain_window(model, window, torch.float16)
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
        found.fail("GradScaler skipped 16 attempts at a finite window")
        return

    def update(grads, norm):
        coef = clip_coefficient(norm, clip)  # clip_grad_norm_'s definition, restated by the oracle
        return torch.cat([-coef * grads[n].detach().double().flatten() for n in names])
    test_update = torch.cat([(params[n].detach().double() - before[n].double()).flatten() for n in names])
    checks = {
        "grad_norm": compare_calibrated(torch.tensor(float(result.grad_norm or 0.0), dtype=torch.float64),
                                        torch.tensor(plain_norm), torch.tensor(ref_norm), factor,
                                        floor=torch.finfo(torch.float16).eps * ref_norm, name="grad_norm"),
        "clipped update": compare_calibrated(test_update, update(plain_grads, plain_norm),
                                             update(ref_grads, ref_norm), factor, name="clipped update"),
    }
    if result.grad_norm is None:
        found.fail("StepResult.grad_norm is None with clipping on")
    for key, c in checks.items():
        if not found.calibrated(NAME, f"scaler {key}", c):
            found.fail(f"{key} vs float64 (pre-clip norm {ref_norm:.4g}, clip {clip:.4g}, StepResult.grad_norm "
                       f"{result.grad_norm}): {c}")
