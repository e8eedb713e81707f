"""Property 3: merging LoRA changes nothing but speed.

With the adapters' ``B`` drawn non-zero (a fresh ``B = 0`` would hide every merge bug) and ``alpha ≠ r`` (so that
``alpha/r``, ``r/alpha`` and ``alpha`` differ), on every adapted layer — with llama_ref, every target of every
block, non-square ``wk``/``wv`` under GQA and the FFN included:

* a fresh adapter gives the base model's logits, merged and unmerged;
* only LoRA parameters are trainable, and (where the forward lets a gradient through) in train mode every one of
  them receives a gradient (non-zero, finite) and nothing else does;
* the merged weight equals ``W + (alpha/r)·B·A`` computed here independently in float64 from the layer's
  ``lora_alpha`` and ``r`` (on the weights, not only on outputs); for a fused adapter whose update is not one
  ``B·A`` (litgpt's query/key/value LoRA), ``W`` plus the update its unmerged forward adds, measured in float64 on
  the identity (:meth:`~verify.targets.protocols.LoRALayer.effective_update`): the merge is checked, its alpha/r
  is not, and a note says so;
* merged logits equal unmerged logits in eval mode (dropout inactive), calibrated: merged may be at most
  ``CALIBRATION_FACTORS["lora_merge"]`` times further from a float64 unmerged reference than the larger of
  unmerged's error and that of a right merge formed here (``W + (alpha/r)·B·A`` stored in the dtype, run with the
  adapter off) from its float64 self — what merging must cost where ``ΔW`` dominates ``W``;
* merging twice, and ``eval()`` twice, leave ``W + (alpha/r)·B·A``; ``unmerge`` and ``train()`` restore ``W``.

Memory: the check works on one copy of the model (and its adapted weights once more); its float64 reference is that
copy converted in place at the end, so the peak is about 3x the model's fp32 bytes beside the caller's model.

The check runs on a target (:class:`verify.targets.protocols.LoRACapable`): llama_ref's model, to which it applies the
adapters asked for, or a model that comes with loralib-shaped LoRA layers (a Meta-style fork's); a model without
any is "not applicable". The claims about ``eval()``/``train()`` merging apply to layers with loralib's
``merge_weights`` switch.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from ..compare import compare, compare_calibrated, row_scale
from ..findings import Findings
from ..result import CheckResult, describe_exception
from ..result import name_list as _names
from ..targets.base import why_not
from ..targets.protocols import LoRACapable, LoRALayer, LoRATarget, missing_members
from ..targets.lora import describe_layers, draw_nonzero_b
from ..targets.spec import as_target
from ..tolerances import CALIBRATION_FACTORS, Tolerance, tolerance

NAME = "lora_merge"
PROTOCOLS = (LoRACapable,)  # what the check reads of a target (and of what lora_target returns: LoRATarget)


def scaling(layer: LoRALayer) -> float:
    """The scaling a right merge uses, from the layer's hyper-parameters: ``alpha / r`` (``alpha / sqrt(r)`` with
    rsLoRA). Computed here, never read from the layer: it is part of what is checked."""
    return layer.alpha / (math.sqrt(layer.rank) if layer.use_rslora else layer.rank)


def weight_tolerance(dtype: torch.dtype, rank: int) -> Tolerance:
    """Derived, not measured, for the scale ``|W| + s·|B|·|A|``: ``Δ = s·B·A`` summed over ``rank`` terms in fp32
    is off by at most ~(rank/2 + 1)·eps32 of ``s·|B|·|A|``; ``W + Δ`` is rounded once to ``dtype`` (eps/2 of
    |W + Δ|), the float64 expectation once more (eps/2), and on unmerge ``(W + Δ) − Δ`` once more (eps/2)."""
    return Tolerance((rank / 2 + 2) * torch.finfo(dtype).eps, 0.0)


@torch.no_grad()
def _update(layer: LoRALayer, fused: dict[str, tuple[torch.Tensor, torch.Tensor]],
            absolute: bool = False) -> torch.Tensor:
    """The update a right merge adds to the layer's ``W``, in float64: ``(alpha/r)·B·A`` formed here from the
    layer's hyper-parameters; for a fused layer (in ``fused``: its update and magnitude, measured on the unmerged
    layer by :meth:`~verify.targets.protocols.LoRALayer.effective_update`), that. With ``absolute``, the magnitude
    the update's rounding error scales with (``(alpha/r)·|B|·|A|``)."""
    if layer.name in fused:
        return fused[layer.name][1 if absolute else 0]
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    return scaling(layer) * ((b.abs() @ a.abs()) if absolute else (b @ a))


def _fused_updates(layers: Iterable[LoRALayer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Name → (update, magnitude) of each layer whose update is not one ``B·A``, measured while it is unmerged."""
    out = {}
    for layer in layers:
        measure = getattr(layer, "effective_update", None)  # optional: absent, the update is one B·A
        update = measure() if callable(measure) else None
        if update is not None:
            out[layer.name] = (update, measure(absolute=True))
    return out


@torch.no_grad()
def _right_merge_logits(lora: Any, layers: Iterable[Any], w0: Optional[dict[str, torch.Tensor]],
                        tokens: torch.Tensor, fused: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The logits of a right merge, independent of the implementation's merge and of its forward through the
    adapter: each adapted weight set to ``W + (alpha/r)·B·A`` (a fused layer's measured update) formed in float64
    (``W`` from ``w0`` where given, else the layer's own) and stored in the layer's dtype, the adapter path off
    (``B = 0``). With ``w0``, the layers are restored (``W`` from ``w0``, ``B`` as it was) afterwards; without, they
    are left merged with ``B = 0``: call it last."""
    layers = list(layers)
    saved = []
    for layer in layers:
        w = w0[layer.name] if w0 is not None else layer.weight
        b = layer.lora_B
        saved.append(b.clone() if w0 is not None else None)
        layer.weight.copy_(w.double() + _update(layer, fused))
        b.zero_()
    logits = lora.logits(tokens)
    if w0 is not None:
        for layer, b in zip(layers, saved):
            layer.lora_B.copy_(b)
            layer.weight.copy_(w0[layer.name])
    return logits


def check_lora_merge(model: Any, tokens: Optional[torch.Tensor] = None, *,
                     targets: Optional[Iterable[str]] = None, rank: int = 4, alpha: Optional[float] = None,
                     dropout: float = 0.1, use_rslora: bool = False, seed: int = 0,
                     lora_layer_cls: Optional[type] = None) -> CheckResult:
    """Check property 3 on a copy of ``model`` — a target or a model :func:`verify.targets.spec.as_target` adapts —
    which is left untouched.

    With llama_ref's model, LoRA goes on as the adapter arguments below say; a model that comes adapted is checked
    with its own adapters.

    Args:
        model: llama_ref's ``Transformer``, a model with loralib-shaped LoRA layers, another model ``as_target``
            adapts, or a target (:class:`verify.targets.protocols.LoRACapable`). A target missing a member of
            ``PROTOCOLS`` gives a not-applicable result naming the member, as does one whose ``lora_target()``
            returns an object short of a :class:`~verify.targets.protocols.LoRATarget` or ``LoRALayer`` member
            (e.g. ``LoRALayer.alpha``), or one without LoRA layers.
        tokens: token ids (B, L), moved to the target's device. Default: random ids drawn from ``seed``, B =
            min(2, max_batch_size), L = min(16, max_seq_len).
        targets: names of the projections adapted in every block (default: every Linear of every block).
        rank: the adapters' rank r.
        alpha: the adapters' alpha; default ``3·rank`` (≠ rank, so that alpha/r, r/alpha and alpha differ).
        dropout: the adapters' dropout probability (inactive in eval mode, where logits are compared).
        use_rslora: scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.
        seed: seed of the tokens, the adapters' ``A`` and non-zero ``B``, and the gradient check's data.
        lora_layer_cls: a ``LoRALinear`` subclass: the layer under test (None: llama_ref's own).

    Returns:
        The result: ``max_abs`` the largest difference of any comparison (fresh adapter vs base logits, merged or
        unmerged weights vs ``W + (alpha/r)·B·A`` or ``W``, and max |merged − unmerged| logits), ``max_rel`` the
        largest elementwise relative one, ``margin`` the worst of the elementwise margins and the logits'
        calibrated ratio ÷ ``CALIBRATION_FACTORS["lora_merge"]`` (that ratio is in ``criterion``).
    """
    target = as_target(model)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    lim = target.limits
    tol = tolerance(lim.dtype, NAME)
    factor = CALIBRATION_FACTORS[NAME]
    alpha = 3 * rank if alpha is None else alpha
    g = torch.Generator().manual_seed(seed)
    if tokens is None:
        tokens = torch.randint(0, lim.vocab_size, (min(2, lim.max_batch_size), min(16, lim.max_seq_len)), generator=g)
    tokens = tokens.to(lim.device)
    found = Findings()
    case = str(target)

    try:
        lora = target.lora_target(targets=None if targets is None else tuple(targets), rank=rank, alpha=alpha,
                                  dropout=dropout, use_rslora=use_rslora, layer_cls=lora_layer_cls, generator=g)
        incomplete = missing_members(lora, (LoRATarget,)) or next(
            (missing_members(layer, (LoRALayer,)) for layer in lora.layers
             if missing_members(layer, (LoRALayer,))), [])
        if incomplete:  # the target's own object, not the model, is short of a member: nothing to judge
            return CheckResult.na(NAME, f"the target's lora_target() returned an object without "
                                        f"{', '.join(incomplete)} (verify.targets.protocols)", str(target))
        layers = {layer.name: layer for layer in lora.layers}
        d = describe_layers(layers.values())
        case = (f"targets={d['targets']} r={d['r']} alpha={d['alpha']}{d['rslora']} dropout={d['dropout']} "
                f"{str(lim.dtype).replace('torch.', '')}")
        w_tol = weight_tolerance(lim.dtype, max(layer.rank for layer in layers.values()))
        base_logits = lora.base_logits(tokens)

        # A fresh adapter is the base model, merged (eval) and unmerged (train mode, dropout on the zero update).
        with torch.no_grad():
            lora.train(False)
            found.compared("fresh adapter, eval (merged where eval() merges), vs base",
                   compare(lora.logits(tokens), base_logits, tol, "fresh logits", scale=row_scale(base_logits)))
            lora.train(True)
            found.compared("fresh adapter, train mode (unmerged), vs base",
                   compare(lora.logits(tokens), base_logits, tol, "fresh logits", scale=row_scale(base_logits)))
        still = [n for n, layer in layers.items() if layer.merged]
        if still:
            found.fail("train() left layers merged: " + _names(still))

        draw_nonzero_b(layers.values(), g)
        fused = _fused_updates(layers.values())
        if fused:
            case += f" fused {len(fused)}/{len(layers)}"
            found.note(f"{_names(sorted(fused))}: the update is not one B·A (a fused adapter); their merged weights "
                       "are compared with the update their unmerged forward adds, measured in float64 — their "
                       "alpha/r is not checked on the weights")

        for problem in _trainable_problems(lora):
            found.fail(problem)
        if lora.no_gradient is None:
            for problem in _gradient_problems(lora, tokens, g):
                found.fail(problem)

        # Merged vs unmerged, on the weights and on outputs. Memory: the copy, its target weights once more (w0), and
        # at the end the copy itself in float64 (no second copy): about 3x the model at the peak.
        modes = {n: layer.merges_on_eval for n, layer in layers.items()}
        case += f" eval-merge {sum(bool(m) for m in modes.values())}/{len(modes)}"  # how many the eval() claims see
        for layer in layers.values():
            layer.set_merges_on_eval(False)
        lora.train(False)
        w0 = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        with torch.no_grad():
            unmerged = lora.logits(tokens)
            lora.merge()
            merged = lora.logits(tokens)

        def expected(n: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
            """``W + s·B·A`` (a fused layer's update) in float64 rounded to the weights' dtype, and the magnitude its
            error scales with."""
            return ((w0[n].double() + _update(layer, fused)).to(lim.dtype),
                    w0[n].double().abs() + _update(layer, fused, absolute=True))

        def check_merged(label: str) -> None:
            for n, layer in layers.items():
                want, scale = expected(n, layer)
                what = "W + the unmerged layer's update" if n in fused else "W + (alpha/r)·B·A"
                found.compared(f"{n} {label} vs {what}", compare(layer.weight, want, w_tol, f"{n} merged", scale=scale))

        check_merged("merged weight")
        if lora.unloaded_logits is not None:  # PEFT's merge_and_unload(): the plain model it hands back
            found.compared("merge_and_unload() logits vs merged", compare(lora.unloaded_logits(tokens), merged, tol, "unloaded logits",
                                                                  scale=row_scale(merged)))
        lora.merge()
        for n, layer in layers.items():
            layer.set_merges_on_eval(bool(modes[n]))
        lora.train(False)
        check_merged("after merging twice / eval() twice")

        no_unmerge = getattr(lora, "unmerge_missing", None)  # optional: a library without unmerge says why
        undos = [("unmerge", lora.unmerge)] if not no_unmerge else []
        if any(modes.values()):
            undos.append(("train() after eval()", lambda: lora.train(True)))
        for label, undo in undos:
            undo()
            for n, layer in layers.items():
                if label == "unmerge" or modes[n]:
                    scale = expected(n, layer)[1]
                    found.compared(f"{n} after {label} vs W", compare(layer.weight, w0[n], w_tol, f"{n} restored", scale=scale))
            lora.train(False)
            for n, layer in layers.items():  # merged again for the next round
                if not modes[n]:
                    layer.merge()

        # The exact answer: the unmerged model (W restored bit for bit) in float64, in place of the copy — or, where
        # the library cannot unmerge, in place of a second copy holding the same adapters.
        if no_unmerge:
            found.not_applicable(f"unmerge claims not checked: {no_unmerge}")
            lora = _same_adapters(target.lora_target(targets=None if targets is None else tuple(targets), rank=rank,
                                                     alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                                     layer_cls=lora_layer_cls, generator=torch.Generator()), lora)
            layers = {layer.name: layer for layer in lora.layers}
        else:
            lora.unmerge()
        for n, layer in layers.items():
            layer.set_merges_on_eval(False)
            with torch.no_grad():
                layer.weight.copy_(w0[n])
        lora.train(False)
        right = _right_merge_logits(lora, layers.values(), w0, tokens, fused)
        w0.clear()  # the fp32 copies go before the float64 conversion
        with torch.no_grad():
            reference = lora.to_float64().logits(tokens)
            right_exact = _right_merge_logits(lora, layers.values(), None, tokens, fused)  # last: it leaves B = 0
        # Merged may be at most `factor` times further from the exact answer than the larger of: the unmerged
        # path's own error, and the error of a right merge (formed here, run in the dtype) from its float64 self.
        # The second is what merging must cost: the logits of W + ΔW are worse conditioned when ΔW dominates W
        # (small r, large alpha/r), however right the merge (measured: ``verify.tolerances``,
        # ``CALIBRATION_FACTORS["lora_merge"]``).
        own = float((right.double() - right_exact.double()).norm())
        cal = compare_calibrated(merged, unmerged, reference, factor,
                                 floor=max(own, torch.finfo(merged.dtype).eps * float(reference.norm())),
                                 name="merged logits")
        # shown: max |merged - unmerged|; judged: the calibrated ratio
        found.measure(float((merged.double() - unmerged.double()).abs().max()), margin=cal.margin)
        if not cal.ok:
            found.fail(f"merged logits vs the float64 unmerged reference: {cal}")
        criterion = (f"calibrated {cal.ratio:.2f}x <= {factor:g}x (of the larger of unmerged's error and a right "
                     f"merge's); W rtol={w_tol.rtol:.1e}; fresh {tol}")
        if lora.no_gradient:
            found.not_applicable(f"gradient claims not applicable: {lora.no_gradient}")
        return found.result(NAME, case, tol, criterion)
    except Exception as e:  # the implementation under test crashed: a failure, with its message
        found.raised(describe_exception(e), aborts=True)
        return found.result(NAME, case, tol)


@torch.no_grad()
def _same_adapters(fresh: LoRATarget, like: LoRATarget) -> LoRATarget:
    """``fresh`` (a second, unmerged copy) with the ``A`` and ``B`` of ``like``'s layers, layer for layer."""
    if [layer.name for layer in fresh.layers] != [layer.name for layer in like.layers]:
        raise RuntimeError("a second lora_target() copy has other LoRA layers than the first")
    for mine, theirs in zip(fresh.layers, like.layers):
        mine.lora_A.copy_(theirs.lora_A)
        mine.lora_B.copy_(theirs.lora_B)
    return fresh


def _trainable_problems(lora: LoRATarget) -> list[str]:
    """Only the adapters' ``lora_A``/``lora_B`` are trainable (``requires_grad``), every one of them."""
    lora_names = set(lora.lora_parameter_names())
    params = dict(lora.named_parameters())
    problems = []
    base_trainable = [n for n, p in params.items() if n not in lora_names and p.requires_grad]
    if base_trainable:
        problems.append(f"base parameters trainable: {_names(base_trainable)}")
    frozen = [n for n in sorted(lora_names) if not params[n].requires_grad]
    if frozen:
        problems.append(f"LoRA parameters frozen: {_names(frozen)}")
    return problems


def _gradient_problems(lora: LoRATarget, tokens: torch.Tensor, g: torch.Generator) -> list[str]:
    """Train-mode backward: LoRA parameters get finite, non-zero gradients; nothing else gets any."""
    lora.train(True)
    lora.zero_grad()
    logits = lora.logits(tokens)
    weights = torch.randn(logits.shape, generator=g).to(logits.device)
    (logits * weights).sum().backward()
    problems = []
    lora_names = set(lora.lora_parameter_names())
    params = dict(lora.named_parameters())
    with_grad = [n for n, p in params.items() if n not in lora_names and p.grad is not None]
    if with_grad:
        problems.append(f"base parameters with a gradient: {_names(with_grad)}")
    missing = [n for n in sorted(lora_names) if params[n].grad is None]
    zero = [n for n in sorted(lora_names) if params[n].grad is not None and not bool(params[n].grad.ne(0).any())]
    nonfinite = [n for n in sorted(lora_names) if params[n].grad is not None and not bool(params[n].grad.isfinite().all())]
    for label, names in (("no gradient", missing), ("an all-zero gradient", zero), ("a non-finite gradient", nonfinite)):
        if names:
            problems.append(f"LoRA parameters with {label}: {_names(names)}")
    lora.zero_grad()
    return problems
