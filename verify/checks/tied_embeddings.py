"""Property 9: tied embeddings stay tied and trained right — through LoRA, merge, save → load, materialisation and
vocabulary resize.

A tied model's output head *is* its input embedding. On the target's tied model and after each transform it supports
(:data:`TRANSFORMS`; one it lacks is said, not failed):

1. **the tie**: the two matrices are one parameter, or the configuration says untied (and then both exist):
   "configured tied, weights differ" is always a failure — so are two parameters over one storage, which autograd
   trains apart; an adapter kept tied must still be tied after its merge;
2. **the logits**: unchanged by save → load and by materialisation (bit-exact), by a merge (at the dtype's tolerance,
   on the row's scale), and, for the old vocabulary, by a resize;
3. **the gradient**: the tied weight's equals the embedding-path gradient plus the head-path gradient, from an untied
   copy (calibrated against that copy in float64, ``CALIBRATION_FACTORS["tied_embeddings"]``) — on the model, after
   save → load, materialisation and resize; and an adapter kept tied gets the gradient of its update used by both
   uses (the model with both matrices replaced by the adapted module's effective matrix, formed through it);
4. **an adapter on one matrix** (LoRA, or a trainable copy of the module, PEFT's ``modules_to_save``, changed as
   training would): leaves the other module unchanged (bit-exact) unless kept tied, where the other follows it (the
   embedding looks up the head's adapted rows, or the head projects with the adapted table) — before and after the
   merge;
5. **the parameter count** counts a tied tensor once.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..compare import compare, compare_calibrated, row_scale
from ..findings import Findings
from ..result import CheckResult, describe_exception
from ..targets.base import why_not
from ..targets.protocols import TiedEmbeddingsTarget
from ..targets.spec import as_target
from ..tolerances import CALIBRATION_FACTORS, Tolerance, tolerance

NAME = "tied_embeddings"
PROTOCOLS = (TiedEmbeddingsTarget,)
EXACT = Tolerance(0.0, 0.0)
LORA = tuple(f"lora:{m}{k}" for m in ("output", "tok_embeddings") for k in ("", ":kept"))
FULL = ("full:output", "full:tok_embeddings")  # a trainable copy of one matrix (PEFT's modules_to_save), trained
TRANSFORMS = ("save_load", "materialize", "resize") + LORA + FULL + ("merge",)


def _shared(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One parameter: two Parameters over one storage (what ``load_state_dict(assign=True)`` leaves) are two leaves
    whose gradients autograd keeps apart, so each is trained by one use only."""
    return a is b


def _distinct_elements(model: Any) -> Optional[int]:
    """The parameters' elements, a tensor shared by two modules counted once (None: not an nn.Module)."""
    if not isinstance(model, torch.nn.Module):
        return None
    seen, n = set(), 0
    for _, p in model.named_parameters(remove_duplicate=False):
        key = (p.data_ptr(), tuple(p.shape), p.device)
        if key not in seen:
            seen.add(key)
            n += p.numel()
    return n


def check_tied_embeddings(model: Any, *, seed: int = 0, transforms: Optional[tuple[str, ...]] = None,
                          head_cls: Optional[type] = None) -> CheckResult:
    """Check property 9 on ``model`` (a target, or a model :func:`as_target` adapts).

    Args:
        model: llama_ref's ``Transformer`` (configured tied) or a target offering
            :class:`verify.targets.protocols.TiedEmbeddingsTarget`.
        seed: seed of the tokens.
        transforms: the transforms to run (default: every one of :data:`TRANSFORMS`).
        head_cls: with llama_ref's model, an ``nn.Linear`` subclass for the output head under test (the zoo's).

    Returns:
        The result: ``max_abs`` the largest difference measured, ``margin`` the worst error ÷ its allowance.
    """
    target = as_target(model, head_cls=head_cls)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    lim = target.limits
    tol, factor = tolerance(lim.dtype, NAME), CALIBRATION_FACTORS[NAME]
    found = Findings()
    asked = TRANSFORMS if transforms is None else tuple(transforms)
    unknown = [t for t in asked if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown transform(s) {unknown}; choose from {list(TRANSFORMS)}")
    case = f"{str(lim.dtype).replace('torch.', '')}"
    try:
        base = target.tied_model()
        emb, head, configured = target.vocab_matrices(base)
        if not configured:
            return CheckResult.na(NAME, "the model is configured untied (nothing shared to keep): property 9 asks a "
                                        "tied model (llama-verify --tied; ModelArgs(tie_embeddings=True))",
                                  str(target))
        tokens = torch.randint(0, lim.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
        _tie(found, "the model", emb, head, configured)
        _count(target, found, "the model", base)
        _grads(target, found, "the model", base, tokens, factor)
        logits = target.tied_logits(base, tokens)
        ran: list[str] = []
        for name in ("save_load", "materialize", "resize"):
            if name not in asked:
                continue
            after = _transform(target, found, base, name)
            if after is None:
                continue
            ran.append(name)
            _tie(found, f"after {name}", *target.vocab_matrices(after))
            _count(target, found, f"after {name}", after)
            new = target.tied_logits(after, tokens)
            if name == "resize":
                found.compared("logits of the old vocabulary after resize", compare(
                    new[..., :lim.vocab_size], logits, tol, "tied logits", scale=row_scale(logits)))
            else:
                found.compared(f"logits after {name}", compare(new, logits, EXACT, "tied logits exact"))
            _grads(target, found, f"after {name}", after, tokens, factor)
        for name in LORA + FULL:
            if name in asked and _lora(target, found, base, name, tokens, tol, "merge" in asked):
                ran.append(name + ("+merge" if "merge" in asked else ""))
        case += f" B=2 T=12, transforms: {', '.join(ran) or 'none'}"
        return found.result(NAME, case, tol, f"tie: one parameter, or configured untied; logits exact (save/load, "
                                             f"materialise) or {tol} (merge, resize); gradients calibrated <= "
                                             f"{factor:g}x the untied copy's distance from float64")
    except Exception as e:
        found.raised(describe_exception(e), aborts=True)
        return found.result(NAME, case, tol)


def _transform(target: Any, found: Findings, model: Any, name: str) -> Any:
    try:
        return target.transform(model, name)
    except NotImplementedError as e:
        found.not_applicable(f"{name} not checked: {e}")
        return None


def _tie(found: Findings, where: str, emb: torch.Tensor, head: torch.Tensor, configured: bool,
         must_share: bool = False) -> None:
    """Claim 1."""
    shared = _shared(emb, head)
    if configured and not shared:
        same = emb.shape == head.shape and bool(torch.equal(emb, head))
        storage = emb.data_ptr() == head.data_ptr()
        found.fail(f"{where}: configured tied, but the embedding and the head are two parameters"
                   + (" over one storage (each gets the gradient of one use)" if storage else
                      " (equal for now: each will train apart)" if same else " whose weights differ"))
    elif must_share and not shared:
        found.fail(f"{where}: an adapter kept tied, but the head and the embedding are two tensors after it")


def _count(target: Any, found: Findings, where: str, model: Any) -> None:
    """Claim 5."""
    want = _distinct_elements(model)
    if want is None:
        found.not_applicable("the parameter count not checked: the model is not an nn.Module")
        return
    got = target.parameter_count(model)
    if got != want:
        found.fail(f"{where}: the parameter count is {got:,}, the distinct parameters hold {want:,} elements"
                   + (" (the tied matrix counted twice)" if got - want == target.vocab_matrices(model)[0].numel()
                      else ""))


def _grads(target: Any, found: Findings, where: str, model: Any, tokens: torch.Tensor, factor: float) -> None:
    """Claim 3: the tied weight's gradient = the two uses' sum, from an untied copy."""
    g_emb, _ = target.tied_grads(model, tokens)
    plain = sum(target.tied_grads(model, tokens, untie=True))
    exact = sum(target.tied_grads(model, tokens, untie=True, float64=True))
    found.compared(f"{where}: the tied weight's gradient (the embedding's and the head's uses summed)",
                   compare_calibrated(g_emb, plain, exact, factor, name="tied gradient"))


def _adapter_grads(target: Any, found: Findings, where: str, model: Any, tokens: torch.Tensor) -> None:
    """Claim 3 for an adapter kept tied: its gradients are those of its update used by both uses (the model with
    both matrices replaced by the adapted module's effective matrix), calibrated against that in float64."""
    try:
        got = target.adapter_grads(model, tokens)
        plain = target.adapter_grads(model, tokens, reference=True)
        exact = target.adapter_grads(model, tokens, reference=True, float64=True)
    except NotImplementedError as e:
        found.not_applicable(f"{where}: the kept-tied adapter's gradient not checked: {e}")
        return
    factor = CALIBRATION_FACTORS[NAME]
    for n in exact:
        if got.get(n) is None:
            found.fail(f"{where}: the gradient of {n} is None")
            continue
        found.compared(f"{where}: the gradient of {n} (its update used by both uses)",
                       compare_calibrated(got[n], plain[n], exact[n], factor, name="tied adapter gradient"))


def _lora(target: Any, found: Findings, base: Any, name: str, tokens: torch.Tensor, tol: Tolerance,
          merge: bool) -> bool:
    """Claims 1, 4 (and 2 at the merge) for one adapter transform; False where the target has none."""
    adapted = _transform(target, found, base, name)
    if adapted is None:
        return False
    on_head, kept = name.split(":")[1] == "output", name.endswith(":kept")
    _tie(found, f"after {name}", *target.vocab_matrices(adapted))
    _follows(target, found, f"after {name}", base, adapted, tokens, on_head, kept, tol)
    if kept:
        _adapter_grads(target, found, f"after {name}", adapted, tokens)
    if not merge:
        return True
    before = target.tied_logits(adapted, tokens)  # before the merge: a target may merge in place (PEFT's views)
    merged = _transform(target, found, adapted, "merge")
    if merged is None:
        return False
    _tie(found, f"after {name} + merge", *target.vocab_matrices(merged), must_share=kept)
    _count(target, found, f"after {name} + merge", merged)
    _follows(target, found, f"after {name} + merge", base, merged, tokens, on_head, kept, tol)
    found.compared(f"logits after {name} + merge", compare(target.tied_logits(merged, tokens), before, tol,
                                                          "tied logits", scale=row_scale(before)))
    saved = _transform(target, found, merged, "save_load")
    if saved is not None:
        _tie(found, f"after {name} + merge + save_load", *target.vocab_matrices(saved))
        found.compared(f"logits after {name} + merge + save_load", compare(
            target.tied_logits(saved, tokens), target.tied_logits(merged, tokens), EXACT, "tied logits exact"))
    return True


def _rows(target: Any, model: Any, ids: torch.Tensor, dim: int, like: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding's rows for ``ids`` and the head's effective matrix's rows for them (the head run on the
    identity: what it projects with, adapter included), each (n, D)."""
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return target.embed(model, ids[None])[0], target.head(model, eye)[:, ids].T


def _follows(target: Any, found: Findings, where: str, base: Any, model: Any, tokens: torch.Tensor, on_head: bool,
             kept: bool, tol: Tolerance) -> None:
    """Claim 4: the module without the adapter unchanged (untied), or following the adapted one (kept tied)."""
    emb0 = target.vocab_matrices(base)[0]
    ids = tokens.unique().to(emb0.device)
    e0, h0 = _rows(target, base, ids, emb0.shape[1], emb0)
    e, h = _rows(target, model, ids, emb0.shape[1], emb0)
    adapted, adapted0, other, other0 = (h, h0, e, e0) if on_head else (e, e0, h, h0)
    if torch.equal(adapted, adapted0):  # the transform draws non-zero adapters (a trained copy moved)
        found.fail(f"{where}: the adapted module computes what the base did: its adapter is ignored")
    which = "embedding" if on_head else "head"
    if kept:
        found.compared(f"{where}: the {which} follows the adapter kept tied",
                       compare(other, adapted, tol, "tied follower", scale=row_scale(adapted)))
    else:
        found.compared(f"{where}: the {which} unchanged by an untied adapter", compare(other, other0, EXACT,
                                                                                     "tied other use"))
