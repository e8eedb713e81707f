"""What a mutant is: a known-wrong implementation that real code shipped (its origin says where), the property
whose check must catch it, and how it is put in place for the length of a ``with`` block. The zoo itself is
``verify.mutants``: one module per property, gathered in an explicit registry."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional
from unittest import mock

Patch = tuple[Any, str, Any]  # (object, attribute, replacement)


@dataclass(frozen=True)
class Mutant:
    name: str
    prop: str  # the property (check name) that must catch it
    description: str
    origin: str
    patches: Callable[[], list[Patch]] = list  # name bindings replaced, only where the product has no seam
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Injected components, passed to the checks as keyword arguments (``check(model, **m.components)``): a
    # ``trainer_cls`` (a Trainer subclass overriding the one decision it gets wrong), ``cache_cls``, ``generator_cls``,
    # ``block_runner``, ``lora_layer_cls`` or ``half_base``.
    components: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def applied(self) -> Iterator["Mutant"]:
        """The mutant in place inside the block; the correct code is restored on exit, even on error."""
        with contextlib.ExitStack() as stack:
            for target, attr, replacement in self.patches():
                if not hasattr(target, attr):
                    raise AttributeError(f"mutant {self.name!r} patches {target!r}.{attr}, which does not exist")
                stack.enter_context(mock.patch.object(target, attr, replacement))
            yield self


def collector(zoo: list[Mutant], prop: str) -> Callable[..., Callable[[Any], Any]]:
    """A decorator ``@mutant(name, description, origin, component=None, **model_overrides)`` adding property
    ``prop``'s mutants to the list ``zoo`` of their module (nothing global: the registry in ``verify.mutants`` lists
    the modules). It decorates the component itself (``component="trainer_cls"``: a Trainer subclass, given to the
    checks as that keyword) or, without ``component``, a function returning the patches."""
    def mutant(name: str, description: str, origin: str, component: Optional[str] = None, **model_overrides: Any):
        def add(obj: Any) -> Any:
            if component is None:
                zoo.append(Mutant(name, prop, description, origin, obj, dict(model_overrides)))
            else:
                zoo.append(Mutant(name, prop, description, origin, model_overrides=dict(model_overrides),
                                  components={component: obj}))
            return obj
        return add
    return mutant
