"""Property 3: merging LoRA changes nothing but speed.

With the adapters' ``B`` drawn non-zero (a fresh ``B = 0`` would hide every merge bug) and ``alpha ≠ r`` (so that
``alpha/r``, ``r/alpha`` and ``alpha`` differ), on every target of every block — non-square ``wk``/``wv`` under GQA
and the FFN included:

* a fresh adapter (B = 0) gives the base model's logits, merged and unmerged;
* in train mode only LoRA parameters receive gradients, and every one of them does (non-zero, finite);
* the merged weight equals ``W + (alpha/r)·B·A`` computed here independently in float64 (on the weights, not
  only on outputs);
* merged logits equal unmerged logits in eval mode (dropout > 0 but inactive), calibrated: merged may be at
  most ``CALIBRATION_FACTORS["lora_merge"]`` times further from a float64 unmerged reference than unmerged is;
* merging twice, and ``eval()`` twice, are no-ops; ``unmerge`` and ``train()`` restore ``W``.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Optional

import torch

from llama_ref.lora import ALL_TARGETS, LoRALinear, apply_lora_to_llama, lora_layers, merge_lora, unmerge_lora
from llama_ref.model import Transformer

from ..compare import compare, compare_calibrated, row_scale
from ..result import CheckResult
from ..result import name_list as _names
from ..tolerances import CALIBRATION_FACTORS, Tolerance, tolerance

NAME = "lora_merge"


def weight_tolerance(dtype: torch.dtype, rank: int) -> Tolerance:
    """Derived, not measured, for the scale ``|W| + s·|B|·|A|``: ``Δ = s·B·A`` summed over ``rank`` terms in fp32
    is off by at most ~(rank/2 + 1)·eps32 of ``s·|B|·|A|``; ``W + Δ`` is rounded once to ``dtype`` (eps/2 of
    |W + Δ|), the float64 expectation once more (eps/2), and on unmerge ``(W + Δ) − Δ`` once more (eps/2)."""
    return Tolerance((rank / 2 + 2) * torch.finfo(dtype).eps, 0.0)


def check_lora_merge(model: Transformer, tokens: Optional[torch.Tensor] = None, *,
                     targets: Iterable[str] = ALL_TARGETS, rank: int = 4, alpha: Optional[float] = None,
                     dropout: float = 0.1, use_rslora: bool = False, seed: int = 0,
                     lora_layer_cls: type[LoRALinear] = LoRALinear) -> CheckResult:
    """Check property 3 on copies of ``model`` (which is left untouched), with LoRA on ``targets``.

    ``alpha`` defaults to ``3·rank`` (≠ rank); ``tokens`` (B, L) to random ids drawn from ``seed``;
    ``lora_layer_cls`` is the adapter layer under test (a ``LoRALinear`` subclass; llama_ref's own by default).
    """
    p = model.params
    dtype = model.output.weight.dtype
    device = model.output.weight.device
    tol = tolerance(dtype, NAME)
    w_tol = weight_tolerance(dtype, rank)
    factor = CALIBRATION_FACTORS[NAME]
    alpha = 3 * rank if alpha is None else alpha
    scaling = alpha / (math.sqrt(rank) if use_rslora else rank)  # the definition, not the layer's property
    g = torch.Generator().manual_seed(seed)
    if tokens is None:
        tokens = torch.randint(0, p.vocab_size, (min(2, p.max_batch_size), min(16, p.max_seq_len)), generator=g)
    tokens = tokens.to(device)
    targets = tuple(targets)
    case = (f"targets={','.join(targets)} r={rank} alpha={alpha:g}{' rslora' if use_rslora else ''} "
            f"dropout={dropout:g} {str(dtype).replace('torch.', '')}")
    details: list[str] = []
    worst = [0.0, 0.0]

    def record(label: str, c) -> None:
        worst[0], worst[1] = max(worst[0], c.max_abs), max(worst[1], c.max_rel)
        if not c.ok:
            details.append(f"{label}: {c}")

    try:
        base = copy.deepcopy(model).eval()
        base.kv_caching = False
        with torch.no_grad():
            base_logits = base(tokens)
        del base
        lora = copy.deepcopy(model)
        lora.kv_caching = False
        apply_lora_to_llama(lora, rank, alpha, dropout, targets, merge_weights=True, use_rslora=use_rslora,
                            layer_cls=lora_layer_cls, generator=g)
        layers = dict(lora_layers(lora))

        # A fresh adapter is the base model, merged (eval) and unmerged (train mode, dropout on the zero update).
        with torch.no_grad():
            record("fresh adapter, merged, vs base", compare(lora.eval()(tokens), base_logits, tol, "logits",
                                                             scale=row_scale(base_logits)))
            record("fresh adapter, unmerged, vs base", compare(lora.train()(tokens), base_logits, tol, "logits",
                                                               scale=row_scale(base_logits)))
        if any(layer.merged for layer in layers.values()):
            details.append("train() left layers merged: " + ", ".join(n for n, l in layers.items() if l.merged))

        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) / math.sqrt(rank))

        details += _gradient_problems(lora, tokens, g)

        # Merged vs unmerged, on outputs and on the weights themselves.
        for layer in layers.values():
            layer.merge_weights = False
        lora.eval()
        w0 = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        with torch.no_grad():
            reference = copy.deepcopy(lora).double()(tokens)  # unmerged, float64: the exact answer
            unmerged = lora(tokens)
            merge_lora(lora)
            merged = lora(tokens)
        cal = compare_calibrated(merged, unmerged, reference, factor)
        worst[0] = max(worst[0], float((merged.double() - unmerged.double()).abs().max()))  # shown, judged by cal
        if not cal.ok:
            details.append(f"merged logits vs the float64 unmerged reference: {cal}")
        scales = {}
        for n, layer in layers.items():
            a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
            expected = (w0[n].double() + scaling * (b @ a)).to(dtype)
            scales[n] = w0[n].double().abs() + scaling * (b.abs() @ a.abs())
            record(f"{n} merged weight vs W + (alpha/r)·B·A", compare(layer.weight, expected, w_tol, n, scale=scales[n]))

        snapshot = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        merge_lora(lora)
        for layer in layers.values():
            layer.merge_weights = True
        lora.eval()
        changed = [n for n, layer in layers.items() if not torch.equal(layer.weight, snapshot[n])]
        if changed:
            details.append(f"merging twice / eval() twice changed the weights of {_names(changed)}")

        for label, undo in (("unmerge", lambda: unmerge_lora(lora)), ("train() after eval()", lora.train)):
            undo()
            for n, layer in layers.items():
                record(f"{n} after {label} vs W", compare(layer.weight, w0[n], w_tol, n, scale=scales[n]))
            lora.eval()  # merged again for the next round
        criterion = f"calibrated {cal.ratio:.2f}x <= {factor:g}x; W rtol={w_tol.rtol:.1e}; fresh {tol}"
        return CheckResult(NAME, not details, worst[0], worst[1], tol, details, case, criterion=criterion)
    except Exception as e:  # the implementation under test crashed: a failure, with its message
        return CheckResult(NAME, False, float("inf"), float("inf"), tol, details, case,
                           error=f"{type(e).__name__}: {e}")


def _gradient_problems(model: Transformer, tokens: torch.Tensor, g: torch.Generator) -> list[str]:
    """Train-mode backward: LoRA parameters get finite, non-zero gradients; nothing else gets any."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    weights = torch.randn(logits.shape, generator=g).to(logits.device)
    (logits * weights).sum().backward()
    problems = []
    lora_names = {f"{n}.{w}" for n, m in model.named_modules() if isinstance(m, LoRALinear) for w in ("lora_A", "lora_B")}
    frozen_trainable = [n for n, p in model.named_parameters() if n not in lora_names and (p.requires_grad or p.grad is not None)]
    if frozen_trainable:
        problems.append(f"base parameters trainable or with a gradient: {_names(frozen_trainable)}")
    params = dict(model.named_parameters())
    missing = [n for n in sorted(lora_names) if params[n].grad is None]
    zero = [n for n in sorted(lora_names) if params[n].grad is not None and not bool(params[n].grad.ne(0).any())]
    nonfinite = [n for n in sorted(lora_names) if params[n].grad is not None and not bool(params[n].grad.isfinite().all())]
    for label, names in (("no gradient", missing), ("an all-zero gradient", zero), ("a non-finite gradient", nonfinite)):
        if names:
            problems.append(f"LoRA parameters with {label}: {_names(names)}")
    model.zero_grad(set_to_none=True)
    return problems
