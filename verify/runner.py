"""Running the checks: every property × dtype × attention path on fresh models, and every mutant against every
check (the kill matrix). What runs is read from the registry (:mod:`verify.properties`)."""
from __future__ import annotations

import dataclasses
import platform
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from .mutants import Mutant
from .properties import PROPERTIES, Inputs, default_names, get, results_of, worst_of
from .result import CheckResult
from .targets.base import cast_floating, why_not
from .targets.protocols import missing_members
from .targets.spec import as_target

ModelFactory = Callable[..., Any]  # factory(**ModelArgs overrides) → a fresh model, same weights every call

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PropertyUnavailable(ValueError):
    """A property the user asked for by name cannot be asked of the target: the usage error names what it lacks."""


def require(target: Any, names: Sequence[str]) -> None:
    """:class:`PropertyUnavailable` naming the first of properties ``names`` whose protocols ``target`` does not
    implement, and the members it lacks."""
    for name in names:
        missing = missing_members(target, get(name).protocols)
        if missing:
            raise PropertyUnavailable(f"property {name} needs {', '.join(missing)} of the target "
                                      f"(verify.targets.protocols); {target} does not offer "
                                      f"{'it' if len(missing) == 1 else 'them'}")


def run_checks(factory: ModelFactory, inputs: Inputs, *, checks: Optional[Sequence[str]] = None,
               dtypes: Sequence[str] = ("float32",), attn_impls: Sequence[str] = ("math",),
               device: str = "cpu") -> list[CheckResult]:
    """Every check × dtype × attention path on a fresh llama_ref model from ``factory(attn_impl=…)``."""
    results = []
    for name in checks if checks is not None else default_names():
        prop = get(name)
        for dtype in dtypes:
            for impl in attn_impls if prop.per_attn_impl else attn_impls[:1]:
                model = factory(attn_impl=impl).to(device=device, dtype=DTYPES[dtype])
                for result in results_of(prop(model, inputs)):
                    result.case = f"{impl} {result.case}"
                    results.append(result)
    return results


def run_target_checks(factory: Callable[[], Any], inputs: Inputs, *, checks: Optional[Sequence[str]] = None,
                      dtypes: Sequence[Optional[str]] = (None,), device: Optional[str] = None,
                      asked: bool = False) -> list[CheckResult]:
    """Every check × dtype on a fresh model from a user's ``factory()`` (moved to ``device``/dtype where given and
    it is an ``nn.Module``). The target is validated against each property's protocols first: a property it cannot
    be asked is reported not applicable, with why — or, where the user ``asked`` for these properties by name and
    the target lacks a member, :class:`PropertyUnavailable` naming the property and the member."""
    results = []
    for name in checks if checks is not None else default_names():
        prop = get(name)
        for dtype in dtypes:
            model = factory()
            if isinstance(model, torch.nn.Module) and (device or dtype):
                model = cast_floating(model.to(device=device), DTYPES[dtype]) if dtype else model.to(device=device)
            elif dtype or (device and not _on(model, torch.device(device))):
                # never silently ignored: a ready target's dtype and device are its own
                moved = device and not _on(model, torch.device(device))
                asked_for = " and ".join(f"--{k} {v}" for k, v in (("dtype", dtype), ("device", moved and device)) if v)
                raise ValueError(f"{asked_for}: the factory returned a ready target ({type(model).__qualname__}), "
                                 "whose model is not moved or converted here; convert it in the factory, or return "
                                 "the nn.Module")
            target = as_target(model)
            why = why_not(target, name, prop.protocols)
            if why and asked:
                require(target, [name])  # a member missing: a usage error naming it (else the target's own why)
            results.extend([CheckResult.na(name, why, str(target))] if why else results_of(prop(target, inputs)))
    return results


def _on(target: Any, device: torch.device) -> bool:
    """Whether a ready target's model is on ``device`` (True where it cannot say: its limits are validated, with a
    message, when a check asks them)."""
    try:
        where = torch.device(target.limits.device)
    except Exception:
        return True
    return where.type == device.type and device.index in (None, where.index)


def kill_matrix(factory: ModelFactory, inputs: Inputs, mutants: Sequence[Mutant], *,
                checks: Optional[Sequence[str]] = None, device: str = "cpu") -> dict[str, dict[str, CheckResult]]:
    """mutant name → check name → the check's result with that mutant injected (fp32): a mutant's components go to
    every check that takes that part (a Trainer subclass to the GA and the MP check alike). Only verdicts are read,
    so the checks stop at their first failing case (``Inputs.fail_fast``)."""
    inputs = dataclasses.replace(inputs, fail_fast=True)
    matrix: dict[str, dict[str, CheckResult]] = {}
    for m in mutants:
        row = {}
        for name in checks if checks is not None else default_names():
            prop = get(name)
            model = factory(**m.model_overrides).to(device)
            components = {k: v for k, v in m.components.items() if k in prop.parts}
            with m.applied(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the wrong code's own complaints (e.g. scheduler order)
                row[name] = worst_of(prop(model, inputs, **components))
        matrix[m.name] = row
    return matrix


def uncaught(matrix: dict[str, dict[str, CheckResult]], mutants: Sequence[Mutant]) -> list[str]:
    """Mutants whose own property's check still passed (or was not run)."""
    by_name = {m.name: m for m in mutants}
    return [name for name, row in matrix.items() if by_name[name].prop not in row or row[by_name[name].prop].ok]


def environment(device: str) -> dict[str, Any]:
    """What a result depends on besides the code: versions, device, threads, determinism and TF32 flags."""
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


__all__ = ["DTYPES", "Inputs", "ModelFactory", "PROPERTIES", "PropertyUnavailable", "environment", "require", "kill_matrix",
           "run_checks", "run_target_checks", "uncaught"]
