"""What each check detects: every claim's detection threshold, measured by putting an error of a controlled size at
a controlled place (:class:`verify.compare.Probe`) into the comparisons that judge the claim.

A claim fails when its comparison's error exceeds an allowance taken from ``verify.tolerances`` — elementwise,
``atol + rtol·magnitude`` at the element; calibrated, ``factor·max(||plain − reference||, floor)`` over the whole
tensor. :data:`CLAIMS` lists, per check, the comparisons (by name), where the error is put and the arguments of
one quick run on the embedded default model; :func:`allowance` words each allowance from the tolerance table, so
that changing a tolerance changes the table in ``docs/verification.md`` (a test compares them).

``python -m verify.thresholds`` re-measures every claim: the smallest multiple of its allowance that fails the
check (bisected), and the error that is on the default model. The tests (tests/verify/test_thresholds.py) require
PASS at half the allowance and FAIL at twice it, for every claim.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .compare import Probe, probing
from .result import CheckResult
from .tolerances import CALIBRATION_FACTORS, tolerance


@dataclass(frozen=True)
class Claim:
    """One claim of one check: the comparisons judging it (``names``, a regular expression over the names passed to
    :func:`verify.compare.compare` / ``compare_calibrated``), where the error goes and how the check is run."""

    key: str  # "<property>.<claim>"
    names: str
    what: str  # what is compared, in words
    place: Optional[tuple[int, ...]] = None  # index into each compared tensor; None: its largest |expected|
    where: str = "the element of largest |expected|"  # the place, in words
    factor: Optional[str] = None  # CALIBRATION_FACTORS key (calibrated claims); None: elementwise
    dtype: torch.dtype = torch.float32  # the tolerance's dtype (elementwise claims)
    scale: str = "|expected|"  # the magnitude of the elementwise relative term
    rule: Optional[Callable[[], str]] = None  # the allowance in words, where it is not tolerance(dtype, check)
    baseline: str = "‖plain − float64‖"  # a calibrated claim's baseline error
    passes_at: float = 0.5  # the multiple the tests require PASS at (the correct code's own error sits below it)
    run: str = ""  # key of RUNS: how the check is run
    kwargs: dict = field(default_factory=dict)

    @property
    def check(self) -> str:
        return self.key.split(".")[0]


def allowance(claim: Claim) -> str:
    """The claim's allowance, worded from ``verify.tolerances`` (the numbers a tolerance change moves)."""
    if claim.factor is not None:
        return f"‖error‖ ≤ {CALIBRATION_FACTORS[claim.factor]:g}·max({claim.baseline}, floor)"
    if claim.rule is not None:
        return claim.rule()
    tol = tolerance(claim.dtype, claim.check)
    return f"|error| ≤ {tol.atol:.1e} + {tol.rtol:.1e}·{claim.scale}"


def _lora_weights() -> str:
    from .checks.lora_merge import weight_tolerance
    tol = weight_tolerance(torch.float32, 4)  # the check's default rank
    return f"|error| ≤ {tol.rtol:.1e}·(|W| + (alpha/r)·|B|·|A|) (rank 4: (r/2 + 2)·eps)"


def _model(dtype: torch.dtype = torch.float32):
    from llama_ref.default import default_model
    return default_model().to(dtype)


def _kv(dtype: torch.dtype) -> Callable[..., CheckResult]:
    def run(**kwargs: Any) -> CheckResult:
        from .checks.kv_cache import check_kv_cache
        return check_kv_cache(_model(dtype), **kwargs)
    return run


def _ga(**kwargs: Any) -> CheckResult:
    from .checks.grad_accum import check_grad_accumulation
    return check_grad_accumulation(_model(), **kwargs)


def _lora(**kwargs: Any) -> CheckResult:
    from .checks.lora_merge import check_lora_merge
    return check_lora_merge(_model(), **kwargs)


def _gc(**kwargs: Any) -> CheckResult:
    from .checks.gradient_checkpointing import check_gradient_checkpointing
    return check_gradient_checkpointing(_model(), **kwargs)


def _mp(**kwargs: Any) -> CheckResult:
    from .checks.mixed_precision import check_mixed_precision
    return check_mixed_precision(_model(), **kwargs)


def _packing(**kwargs: Any) -> CheckResult:
    from .checks.packing import check_packing
    return check_packing(_model(), **kwargs)


def _loss(**kwargs: Any) -> CheckResult:
    from .checks.loss_kernel import check_loss_kernel
    return check_loss_kernel(_model(), **{"kernel": "fused", **kwargs})


def _dist(**kwargs: Any) -> CheckResult:
    from .checks.distributed import Case, check_distributed
    return check_distributed(_model(), **{"world_sizes": (2,), "cases": [Case("ddp", "full")], **kwargs})


def _tied(**kwargs: Any) -> CheckResult:
    from llama_ref.default import default_model

    from .checks.tied_embeddings import check_tied_embeddings
    return check_tied_embeddings(default_model(tie_embeddings=True), **kwargs)


RUNS: dict[str, Callable[..., CheckResult]] = {
    "kv_cache": _kv(torch.float32), "kv_cache bf16": _kv(torch.bfloat16), "grad_accum": _ga, "lora_merge": _lora,
    "gradient_checkpointing": _gc, "mixed_precision": _mp, "packing": _packing, "loss_kernel": _loss,
    "tied_embeddings": _tied, "distributed": _dist,
}
_LOGITS = "max(|expected|, the row's largest |logit|)"
_LARGE = "‖one large batch − float64‖"
_LARGE_GRADS = "‖the large batch's gradients − float64‖"
_SINGLE = "‖single process − float64‖"

CLAIMS: tuple[Claim, ...] = (
    Claim("kv_cache.logits", "logits", "cached vs uncached teacher-forced logits, every batch size and chunking",
          (-1, 1, 0), "last row, position 1, logit 0", scale=_LOGITS, run="kv_cache"),
    Claim("kv_cache.causal", "causal", "uncached logits of the first half, later tokens changed vs not", (0, -1, 0),
          "row 0, the half's last position, logit 0", scale=_LOGITS, run="kv_cache"),
    Claim("kv_cache.logprobs", "logprobs", "cached vs uncached log-probabilities of greedy generation",
          (-1,), "each row's last generated token", scale="the row's largest |logit|", run="kv_cache"),
    Claim("kv_cache.logits_bf16", "logits", "the same, bf16 weights", (-1, 1, 0), "last row, position 1, logit 0",
          dtype=torch.bfloat16, scale=_LOGITS, run="kv_cache bf16"),
    Claim("grad_accum.loss", "loss", "the window's logged loss vs the float64 oracle's", (), "the scalar",
          run="grad_accum"),
    Claim("grad_accum.lr", "lr", "the learning rate reported and stepped with vs the scheduler's", (), "the scalar",
          dtype=torch.float64, run="grad_accum"),
    Claim("grad_accum.grads", "grads", "accumulated gradients vs one large batch (all parameters, flattened)",
          (-1,), "the last element", factor="grad_accum", baseline=_LARGE, run="grad_accum"),
    Claim("grad_accum.params", "params", "parameters after the step vs the large batch's", (0,), "the first element",
          factor="grad_accum", baseline=_LARGE, run="grad_accum"),
    Claim("grad_accum.grad_norm", "grad_norm", "the reported pre-clip gradient norm", (), "the scalar",
          factor="grad_accum", baseline=_LARGE_GRADS, run="grad_accum"),
    Claim("lora_merge.fresh", "fresh logits", "a fresh adapter's logits (eval and train mode) vs the base model",
          (0, -1, 0), "row 0, last position, logit 0", scale=_LOGITS, run="lora_merge"),
    Claim("lora_merge.weights", r".* merged", "each merged weight vs W + (alpha/r)·B·A (merged, twice, by eval())",
          (-1, 0), "last row, column 0", rule=_lora_weights, run="lora_merge"),
    Claim("lora_merge.restored", r".* restored", "each weight after unmerge / train() vs the original W",
          (0, -1), "row 0, last column", rule=_lora_weights, run="lora_merge"),
    Claim("lora_merge.logits", "merged logits", "merged vs unmerged logits, both against float64", (0, 0, 0),
          "row 0, position 0, logit 0", factor="lora_merge",
          baseline="‖unmerged − float64‖, ‖a right merge − its float64‖", run="lora_merge"),
    Claim("gradient_checkpointing.loss", "loss", "checkpointed vs plain loss, every policy", (), "the scalar",
          run="gradient_checkpointing"),
    Claim("gradient_checkpointing.logits", "logits", "checkpointed vs plain logits", (-1, -1, -1),
          "last row, position, logit", run="gradient_checkpointing"),
    Claim("gradient_checkpointing.grads", "grad .*", "each parameter's gradient, checkpointed vs plain",
          None, "each gradient's largest element", run="gradient_checkpointing"),
    Claim("mixed_precision.logits", "logits", "autocast logits vs the plain half path, against float64", (0, 0, 0),
          "row 0, position 0, logit 0", factor="mixed_precision", run="mixed_precision"),
    Claim("mixed_precision.loss", "loss", "autocast loss, the same way", (), "the scalar", factor="mixed_precision",
          run="mixed_precision"),
    Claim("mixed_precision.grads", "grad .*", "each trainable parameter's gradient, the same way", None,
          "each gradient's largest element", factor="mixed_precision_grad", run="mixed_precision"),
    Claim("mixed_precision.grad_norm", "grad_norm", "GradScaler's pre-clip norm (fp16), the same way", (),
          "the scalar", factor="mixed_precision", run="mixed_precision"),
    Claim("mixed_precision.update", "clipped update", "the clipped update GradScaler applies (fp16)", (0,),
          "the first element", factor="mixed_precision", run="mixed_precision"),
    Claim("mixed_precision.rmsnorm", "RMSNorm", "RMSNorm of half activations of ±512 vs float64", (0, 0, 0),
          "row 0, position 0, channel 0", rule=lambda: "|error| ≤ 2·eps(half)·|expected| + tiny(half)",
          run="mixed_precision"),
    Claim("mixed_precision.rope", "rope", "half-weight logits at far positions vs float64, against near ones",
          (0, -1, 0), "row 0, last position, logit 0", factor="mixed_precision_rope",
          baseline="‖error at positions 0-31‖", run="mixed_precision",
          passes_at=0.75),  # correct half weights sit at 0.9-1.1x their baseline: 0.5·2 = 1x is not below them
    Claim("mixed_precision.curve", "curve", "the mixed-precision loss curve vs fp32", (-1,), "the last step",
          factor="mixed_precision_curve",
          baseline="‖fp32 from half-rounded weights − fp32‖", run="mixed_precision"),
    Claim("mixed_precision.step", "gradients", "a foreign step's gradients (llama_ref's Trainer as one), flattened",
          (0,), "the first element", factor="mixed_precision", run="mixed_precision", kwargs={"full": False}),
    Claim("packing.logits", "document logits", "each document's logits from the packed rows vs the padded batch, "
          "against float64", None, "its largest |expected|", factor="packing",
          baseline="‖padded − float64‖", run="packing"),
    Claim("packing.isolation", "isolation", "the other documents' logits of a row with one document's tokens changed "
          "vs unchanged", None, "the largest |expected|", scale=_LOGITS, run="packing"),
    Claim("packing.loss", "loss", "the packed rows' summed loss vs the padded batch's, against float64", (),
          "the scalar", factor="packing", baseline="‖padded − float64‖", run="packing"),
    Claim("packing.grads", "grad .*", "every gradient, from the packed rows and from the training loop's packed "
          "window, the same way", None, "each gradient's largest element", factor="packing",
          baseline="‖padded − float64‖", run="packing"),
    Claim("packing.window_loss", "window loss", "the loop's reported loss over the packed micro-batches vs the "
          "padded batch's", (), "the scalar", factor="packing", baseline="‖padded − float64‖", run="packing"),
    Claim("loss_kernel.loss", r"reduction=.* loss", "the kernel's loss (per token for none) vs cross_entropy in "
          "float64, every reduction, chunking and softcap", None, "its largest |expected|", factor="loss_kernel",
          baseline="‖plain cross_entropy − float64‖", run="loss_kernel"),
    Claim("loss_kernel.grads", r"reduction=.* grad [HWb]", "the gradients of H, W and b, the same way", None,
          "each gradient's largest element", factor="loss_kernel", baseline="‖plain − float64‖",
          run="loss_kernel"),
    Claim("loss_kernel.accumulation", r"accumulation .*", "three micro-batches with num_items_in_batch: summed "
          "losses and accumulated gradients vs the window's", None, "the largest element", factor="loss_kernel",
          baseline="‖plain − float64‖", run="loss_kernel"),
    Claim("loss_kernel.model", r"the kernel in the model: .*", "the model with the kernel in place: its loss and "
          "every trainable gradient vs its plain forward's, against float64", None, "the largest element",
          factor="loss_kernel", baseline="‖plain forward − float64‖", run="loss_kernel"),
    Claim("tied_embeddings.gradient", "tied gradient", "the tied weight's gradient vs an untied copy's two uses "
          "summed, against that copy in float64 (the model, after save/load, materialise, resize)", None,
          "its largest |expected|", factor="tied_embeddings", baseline="‖untied copy − float64‖",
          run="tied_embeddings"),
    Claim("tied_embeddings.adapter_gradient", "tied adapter gradient", "a kept-tied adapter's gradients vs those of "
          "its update used by both uses, against those in float64", None, "each gradient's largest element",
          factor="tied_embeddings", baseline="‖reference − float64‖", run="tied_embeddings"),
    Claim("tied_embeddings.logits", "tied logits", "logits after a merge vs before it, and of the old vocabulary after "
          "a resize", (0, 0, 0), "row 0, position 0, logit 0", scale=_LOGITS, run="tied_embeddings"),
    Claim("tied_embeddings.follower", "tied follower", "a kept-tied adapter's other module vs the adapted one, row "
          "by row (before and after the merge)", (0, 0), "row 0, element 0",
          scale="max(|expected|, the row's largest |element|)", run="tied_embeddings"),
    Claim("distributed.loss", "loss", "each rank's window loss vs the single process's float64 loss (DDP, 2 ranks)",
          (), "the scalar, every rank", run="distributed"),
    Claim("distributed.grads", "grads", "each rank's stepped gradients vs the single process's large batch", (-1,),
          "the last element, every rank", factor="grad_accum", baseline=_SINGLE, run="distributed"),
    Claim("distributed.params", "params", "each rank's parameters after the step, the same way", (0,),
          "the first element, every rank", factor="grad_accum", baseline=_SINGLE, run="distributed"),
    Claim("distributed.grad_norm", "grad_norm", "each rank's pre-clip norm, the same way", (), "the scalar, every rank",
          factor="grad_accum", baseline="|single process's norm − float64's|", run="distributed"),
)
CLAIMS_BY_KEY = {c.key: c for c in CLAIMS}


def probe(claim: Claim, multiple: Optional[float], **kwargs: Any) -> tuple[CheckResult, Probe]:
    """Run ``claim``'s check with an error of ``multiple`` × the allowance in its comparisons (None: none, only
    recorded)."""
    p = Probe(claim.names, multiple, claim.place)
    with probing(p):
        result = RUNS[claim.run](**{**claim.kwargs, **kwargs})
    return result, p


def threshold(claim: Claim, lo: float = 0.25, hi: float = 4.0, steps: int = 8) -> tuple[float, Probe]:
    """The smallest multiple of the allowance at which the check fails (bisected between ``lo`` and ``hi``), and the
    probe of the first failing run at it. Raises if ``lo`` fails or ``hi`` passes."""
    if not probe(claim, lo)[0].ok or probe(claim, hi)[0].ok:
        raise RuntimeError(f"{claim.key}: no threshold between {lo} and {hi} times the allowance")
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if not probe(claim, mid)[0].ok else (mid, hi)
    return hi, probe(claim, hi)[1]


def rows(claims: Sequence[Claim] = CLAIMS) -> list[str]:
    """The documented columns of each claim (what, where, allowance): docs/verification.md carries them."""
    return [f"| `{c.key}` | {_cell(c.what)} | {_cell(c.where)} | {_cell(allowance(c))} |" for c in claims]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar inside a Markdown table cell


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verify.thresholds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--claim", action="append", choices=sorted(CLAIMS_BY_KEY), help="only these (repeatable)")
    args = parser.parse_args(argv)
    claims = [CLAIMS_BY_KEY[k] for k in args.claim] if args.claim else list(CLAIMS)
    print("| claim | compared | where the error is put | allowance (verify/tolerances.py) "
          "| fails at (× allowance) | the error at that multiple, default model |")
    print("|---|---|---|---|---|---|")
    for c, row in zip(claims, rows(claims)):
        t0 = time.perf_counter()
        k, p = threshold(c)
        hit = next(h for h in p.hits if h.at is not None)
        size = (f"‖error‖ {hit.error:.2e} = {hit.error / hit.magnitude:.1e} of ‖float64‖ ({hit.name})" if c.factor
                else f"{hit.error:.2e} where the magnitude is {hit.magnitude:.2e} ({hit.name})")
        print(f"{row} {k:.2f} | {size} |", flush=True)
        print(f"  {c.key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
