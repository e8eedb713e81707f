"""The bug zoo: known-wrong implementations, one module per property, each of which that property's check must
catch (``llama-verify --mutants``, tests/verify/mutants/test_mutants.py).

The registry is explicit: :data:`MUTANTS` is built from the modules listed here, in this order, whatever was
imported before.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from . import grad_accum, gradient_checkpointing, kv_cache, lora_merge, mixed_precision
from .base import Mutant, Patch

PROPERTY_MODULES = (kv_cache, lora_merge, gradient_checkpointing, grad_accum, mixed_precision)


def _registry() -> dict[str, Mutant]:
    registry: dict[str, Mutant] = {}
    for module in PROPERTY_MODULES:
        for m in module.ZOO:
            if m.name in registry:
                raise ValueError(f"mutant {m.name!r} registered twice ({module.__name__})")
            registry[m.name] = m
    return registry


MUTANTS: dict[str, Mutant] = _registry()


@contextlib.contextmanager
def inject(name: str) -> Iterator[Mutant]:
    """Apply mutant ``name`` inside the block; the correct code is restored on exit, even on error."""
    if name not in MUTANTS:
        raise KeyError(f"unknown mutant {name!r}; known: {sorted(MUTANTS)}")
    with MUTANTS[name].applied() as m:
        yield m


def mutants_for(prop: Optional[str] = None) -> list[Mutant]:
    return [m for m in MUTANTS.values() if prop is None or m.prop == prop]


__all__ = ["MUTANTS", "Mutant", "PROPERTY_MODULES", "Patch", "inject", "mutants_for"]
