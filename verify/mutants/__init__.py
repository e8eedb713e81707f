"""The bug zoo: known-wrong implementations, one module per property, each of which that property's check must
catch (``llama-verify --mutants``, tests/verify/mutants/test_mutants.py).

The registry is derived from the properties' records (:data:`verify.properties.PROPERTIES`, each naming its zoo
module): :data:`MUTANTS` holds the mutants of every property of the default run, in the records' order, whatever was
imported before. Property 6's (``--distributed``) run in its own spawn (``verify.mutants.distributed.DIST_ZOO``) and
the transformers target's in ``verify.mutants.hf``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from .base import Mutant, Patch


def _registry() -> dict[str, Mutant]:
    from ..properties import PROPERTIES  # the records name these modules: imported when first asked, not at import
    registry: dict[str, Mutant] = {}
    for prop in PROPERTIES.values():
        if prop.opt_in is not None:
            continue
        for m in prop.zoo:
            if m.name in registry:
                raise ValueError(f"mutant {m.name!r} registered twice ({prop.name})")
            registry[m.name] = m
    return registry


def __getattr__(name: str) -> Any:
    """``MUTANTS`` (name → mutant) and ``PROPERTY_MODULES`` (the zoo modules, in order), read from the registry of
    properties at each access: a property registered later brings its zoo."""
    if name == "MUTANTS":
        return _registry()
    if name == "PROPERTY_MODULES":
        from ..properties import PROPERTIES
        return tuple(p.mutants for p in PROPERTIES.values() if p.mutants is not None and p.opt_in is None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def inject(name: str) -> Iterator[Mutant]:
    """Apply mutant ``name`` inside the block; the correct code is restored on exit, even on error."""
    mutants = _registry()
    if name not in mutants:
        raise KeyError(f"unknown mutant {name!r}; known: {sorted(mutants)}")
    with mutants[name].applied() as m:
        yield m


def mutants_for(prop: Optional[str] = None) -> list[Mutant]:
    """The mutants of property ``prop`` (all of the default run's when None)."""
    return [m for m in _registry().values() if prop is None or m.prop == prop]


__all__ = ["MUTANTS", "Mutant", "PROPERTY_MODULES", "Patch", "inject", "mutants_for"]
