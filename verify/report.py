"""Run every check on one model, and every mutant against every check; print tables and JSON."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from llama_ref.formats.atomic import atomic_write
from llama_ref.model import Transformer

from .checks.gradient_checkpointing import check_gradient_checkpointing
from .checks.grad_accum import check_grad_accumulation
from .checks.kv_cache import check_kv_cache
from .checks.lora_merge import check_lora_merge
from .checks.mixed_precision import check_mixed_precision
from .checks.mixed_precision_step import check_mixed_precision_step
from .mutants import Mutant
from .result import CheckResult
from .targets.llama_ref import LlamaRefTarget
from .targets.spec import as_target

ModelFactory = Callable[..., Transformer]  # factory(**ModelArgs overrides) → a fresh model, same weights every call


@dataclass(frozen=True)
class Inputs:
    """What the checks share: a seed for random inputs and, where a tokenizer is known, real prompts."""

    seed: int = 0
    prompts: Optional[Sequence[Sequence[int]]] = None
    fail_fast: bool = False  # the checks that can stop at their first failing case do (a verdict, not a report)
    train_step: Optional[Callable[..., float]] = None  # the user's training step, for GA (verify.targets.base.TrainStep)
    mp_train_step: Optional[Callable[..., float]] = None  # the user's mixed-precision step (its autocast), for MP


# Above this many parameters a model is "real-size": GA and checkpointing check LoRA on a frozen base only (a full
# fine-tune's gradients, optimizer state and float64 copy need several times the model's memory; docs/verification.md
# has each check's measured peak on llama-3.2-1b).
LARGE_MODEL_PARAMS = 200_000_000


def _large(model: Any) -> bool:
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    return isinstance(module, torch.nn.Module) and sum(p.numel() for p in module.parameters()) > LARGE_MODEL_PARAMS


def _mixed_precision(model: Any, inputs: "Inputs", **components: Any) -> CheckResult:
    """The user's mixed-precision step where one is given; a foreign target's own step where it has one
    (transformers' Trainer with bf16); on a real-size llama_ref model its own Trainer as such a step, LoRA on a frozen
    base only (llama_ref's full check copies the model for each claim and trains it with AdamW); else llama_ref's
    full check."""
    if inputs.mp_train_step is not None:
        return check_mixed_precision_step(model, inputs.mp_train_step, seed=inputs.seed)
    if not components:
        target = as_target(model)
        half = "fp16" if target.limits.dtype == torch.float16 else "bf16"
        if hasattr(target, "mp_step") and not isinstance(target, LlamaRefTarget):
            return check_mixed_precision_step(target, target.mp_step(half), seed=inputs.seed,
                                              label=getattr(target, "mp_step_label", "its own step"))
        if hasattr(target, "mp_step") and _large(model):
            return check_mixed_precision_step(target, target.mp_step(half), full=False, seed=inputs.seed,
                                              label="llama_ref's Trainer as a step")
    return check_mixed_precision(model, dtype=_autocast_dtype(model), seed=inputs.seed, fail_fast=inputs.fail_fast,
                                 **components)


# check name -> check(model, inputs, **components): components are the implementation's parts under test
# (``Mutant.components``, e.g. ``trainer_cls``); without them, llama_ref's own.
CHECKS: dict[str, Callable[..., CheckResult]] = {
    "kv_cache": lambda model, inputs, **c: check_kv_cache(model, prompts=inputs.prompts, seed=inputs.seed, **c),
    "grad_accum": lambda model, inputs, **c: check_grad_accumulation(
        model, seed=inputs.seed, fail_fast=inputs.fail_fast, train_step=inputs.train_step,
        lora=(True,) if _large(model) else (False, True), **c),
    "lora_merge": lambda model, inputs, **c: check_lora_merge(model, seed=inputs.seed, **c),
    "mixed_precision": lambda model, inputs, **c: _mixed_precision(model, inputs, **c),
    "gradient_checkpointing": lambda model, inputs, **c: check_gradient_checkpointing(
        model, seed=inputs.seed, full_finetune=not _large(model), **c),
}

def _autocast_dtype(model: Any) -> torch.dtype:
    """fp16 for a model stored in fp16, else bf16: the MP check's autocast dtype."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None) if isinstance(
        model, torch.nn.Module) else None
    return torch.float16 if weight is not None and weight.dtype == torch.float16 else torch.bfloat16


# The implementation's parts each check takes (its keyword-only arguments naming a class or function, e.g.
# ``trainer_cls``): a mutant's component goes to every check that takes that part (a Trainer subclass to the GA and
# the MP check alike), not to its own property's check alone.
CHECK_PARTS: dict[str, frozenset[str]] = {
    name: frozenset(p for p, v in inspect.signature(fn).parameters.items()
                    if v.kind == v.KEYWORD_ONLY and (p.endswith("_cls") or p in ("half_base", "block_runner")))
    for name, fn in {"kv_cache": check_kv_cache, "grad_accum": check_grad_accumulation,
                     "lora_merge": check_lora_merge, "mixed_precision": check_mixed_precision,
                     "gradient_checkpointing": check_gradient_checkpointing}.items()}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The checks written on the target interface alone (they import nothing of llama_ref); mixed_precision still drives
# llama_ref's Trainer itself and is N/A on other targets.
TARGET_CHECKS = frozenset({"kv_cache", "lora_merge", "gradient_checkpointing", "grad_accum"})


def run_checks(factory: ModelFactory, inputs: Inputs, *, checks: Sequence[str] = tuple(CHECKS),
               dtypes: Sequence[str] = ("float32",), attn_impls: Sequence[str] = ("math",),
               device: str = "cpu") -> list[CheckResult]:
    """Every check × dtype × attention path on a fresh model from ``factory(attn_impl=…)``."""
    results = []
    for name in checks:
        for dtype in dtypes:
            for impl in attn_impls:
                model = factory(attn_impl=impl).to(device=device, dtype=DTYPES[dtype])
                result = CHECKS[name](model, inputs)
                result.case = f"{impl} {result.case}"
                results.append(result)
    return results


def run_target_checks(factory: Callable[[], Any], inputs: Inputs, *, checks: Sequence[str] = tuple(CHECKS),
                      dtypes: Sequence[Optional[str]] = (None,), device: Optional[str] = None) -> list[CheckResult]:
    """Every check × dtype on a fresh model from a user's ``factory()`` (moved to ``device``/dtype where given and
    it is an ``nn.Module``); a property the target cannot be asked is reported not applicable, with why."""
    results = []
    for name in checks:
        for dtype in dtypes:
            model = factory()
            if isinstance(model, torch.nn.Module) and (device or dtype):
                model = model.to(device=device, dtype=DTYPES[dtype] if dtype else None)
            target = as_target(model)
            why = target.not_applicable(name)
            results.append(CheckResult.na(name, why, str(target)) if why else CHECKS[name](target, inputs))
    return results


def kill_matrix(factory: ModelFactory, inputs: Inputs, mutants: Sequence[Mutant], *,
                checks: Sequence[str] = tuple(CHECKS), device: str = "cpu") -> dict[str, dict[str, CheckResult]]:
    """mutant name → check name → the check's result with that mutant injected (fp32). Only verdicts are read, so
    the checks stop at their first failing case (``Inputs.fail_fast``)."""
    inputs = dataclasses.replace(inputs, fail_fast=True)
    matrix: dict[str, dict[str, CheckResult]] = {}
    for m in mutants:
        row = {}
        for name in checks:
            model = factory(**m.model_overrides).to(device)
            components = {k: v for k, v in m.components.items() if k in CHECK_PARTS[name]}
            with m.applied(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the wrong code's own complaints (e.g. scheduler order)
                row[name] = CHECKS[name](model, inputs, **components)
        matrix[m.name] = row
    return matrix


def uncaught(matrix: dict[str, dict[str, CheckResult]], mutants: Sequence[Mutant]) -> list[str]:
    """Mutants whose own property's check still passed (or was not run)."""
    by_name = {m.name: m for m in mutants}
    return [name for name, row in matrix.items() if by_name[name].prop not in row or row[by_name[name].prop].ok]


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    for lib in ("transformers", "peft", "accelerate"):  # a transformers target's stack, where it is loaded
        if lib in sys.modules:
            env[lib] = getattr(sys.modules[lib], "__version__", "?")
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


WIDTH = 120  # the table fits a 120-column terminal; the notes below it say the rest
MAX_DETAILS = 6  # detail lines shown per result (``--json`` holds them all)


def _margin(r: CheckResult) -> str:
    if r.not_applicable or r.margin is None:
        return "-"
    return "inf" if r.margin == float("inf") else (f"{r.margin:.2f}" if r.margin < 100 else f"{r.margin:.1e}")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_results(results: Sequence[CheckResult]) -> str:
    """A table, one row per result (``margin``: the worst error ÷ what the criterion allows; above 1 fails), then
    per row what was judged how, why it does not apply, and what failed."""
    head = ("#", "check", "case", "max abs err", "margin", "verdict")
    cells = [(str(i), r.name, r.case, "-" if r.not_applicable else f"{r.max_abs:.2e}", _margin(r), r.verdict)
             for i, r in enumerate(results, 1)]
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    widths[2] = max(len(head[2]), min(widths[2], WIDTH - (sum(widths) - widths[2]) - 2 * (len(head) - 1)))
    text = _table([head] + [tuple(_cut(c, widths[2]) if i == 2 else c for i, c in enumerate(row)) for row in cells])
    notes = []
    for i, r in enumerate(results, 1):
        lines = ([f"not applicable: {r.not_applicable}"] if r.not_applicable else
                 [f"judged by: {r.criterion or r.tol}"] + ([f"raised {r.error}"] if r.error else []))
        shown = r.details[:MAX_DETAILS]
        lines += shown + ([f"… and {len(r.details) - len(shown)} more (--json has them all)"]
                          if len(r.details) > len(shown) else [])
        notes.append(f"[{i}] {r.name} {r.verdict}: {r.case}")
        notes += [f"    {line}" for line in lines]
    return text + "\n\n" + "\n".join(notes)


def format_kill_matrix(matrix: dict[str, dict[str, CheckResult]], mutants: Sequence[Mutant]) -> str:
    checks = sorted({c for row in matrix.values() for c in row})
    by_name = {m.name: m for m in mutants}
    rows = [("mutant", "property", *checks, "verdict")]
    for name, row in matrix.items():
        cells = []
        for c in checks:
            r = row.get(c)
            cells.append("-" if r is None else ("passes" if r.ok else ("FAILS (raised)" if r.error else "FAILS")))
        own = row.get(by_name[name].prop)
        rows.append((name, by_name[name].prop, *cells, "caught" if own is not None and not own.ok else "MISSED"))
    return _table(rows)


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first the header) as left-aligned columns under a rule."""
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (llama_ref's one atomic writer: all of the file or none of it)."""
    atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
