"""From what the user names to a target: ``--target SPEC`` and the adapter chosen by what a factory returns.

A SPEC is ``llama_ref`` (the embedded default model), ``PATH.py:FACTORY`` or ``package.module:FACTORY``; the
factory, called with no arguments, returns a fresh model (the same weights every call) or a ready target. A
``PATH.py`` is imported with its directory on ``sys.path``, so that it can import the modules beside it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from .base import Target


def as_target(obj: Any, **parts: Any) -> Target:
    """``obj`` as a target: a target as it is, llama_ref's ``Transformer`` (with ``parts`` swapped in: ``cache_cls``,
    ``generator_cls``, ``block_runner``), a transformers ``PreTrainedModel`` or PEFT ``PeftModel``, a Meta-style
    model, or one of the input_pos family (gpt-fast, litgpt, torchtune shapes). Anything else: TypeError naming what
    it lacks."""
    parts = {k: v for k, v in parts.items() if v is not None}
    if isinstance(obj, Target):
        if parts:
            raise ValueError(f"{', '.join(sorted(parts))}: parts are swapped into a model, not into a ready target")
        return obj
    from .llama_ref import LlamaRefTarget, is_llama_ref
    if is_llama_ref(obj):
        return LlamaRefTarget(obj, **parts)
    from .hf import HFTarget, is_hf_model
    if is_hf_model(obj):
        if parts:
            raise ValueError(f"{', '.join(sorted(parts))}: parts of llama_ref's Transformer; give HFTarget(model, "
                             "cache_cls=..., trainer_cls=...) instead")
        return HFTarget(obj)
    from .meta_style import MetaStyleTarget, meta_style_problems
    if parts:
        raise ValueError(f"{', '.join(sorted(parts))}: parts of llama_ref's Transformer, not of "
                         f"{type(obj).__qualname__}")
    problems = meta_style_problems(obj)
    if not problems:
        return MetaStyleTarget(obj)
    from .input_pos import InputPosTarget, input_pos_problems
    family = input_pos_problems(obj)
    if not family:
        return InputPosTarget(obj)
    raise TypeError(f"{type(obj).__qualname__} is not a model verify can adapt: neither llama_ref's Transformer, "
                    f"a transformers/PEFT model, Meta-style, which needs {'; '.join(problems)}, nor of the input_pos "
                    f"family, which needs {'; '.join(family)} (or write a target: docs/verify-your-model.md)")


def load_factory(spec: str, what: str = "target") -> Callable[..., Any]:
    """The callable a SPEC names (``PATH.py:FACTORY`` or ``package.module:FACTORY``); ValueError naming ``what`` it
    is for, the SPEC and what is wrong with it."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"{what} {spec!r}: expected PATH.py:FACTORY or package.module:FACTORY")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{what} {spec!r}: no such file {where}")
        module_name = f"_llama_verify_target_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"{what} {spec!r}: cannot load {where} as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look their module up by name
        if str(path.resolve().parent) not in sys.path:  # it imports the modules beside it (the user's model.py)
            sys.path.insert(0, str(path.resolve().parent))
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ValueError(f"{what} {spec!r}: importing {where} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"{what} {spec!r}: cannot import {where}: {e}") from e
    factory = getattr(module, name, None)
    if factory is None:
        raise ValueError(f"{what} {spec!r}: {where} has no {name}")
    if not callable(factory):
        raise ValueError(f"{what} {spec!r}: {name} is a {type(factory).__name__}, not a callable")
    return factory


def load_loss_fn(spec: str) -> Any:
    """``PATH.py:FN`` or ``package.module:FN``: the user's loss kernel (:class:`verify.targets.loss_kernel.LossKernel`,
    its keywords read from its signature); ValueError or TypeError naming what is wrong."""
    from .loss_kernel import LossKernel
    return LossKernel.from_function(load_factory(spec, "loss function"), name=spec)


def load_packed_forward(spec: str) -> Any:
    """``PATH.py:FN`` or ``package.module:FN``: the user's packed forward (:mod:`verify.targets.packed_forward`),
    its signature checked now; ValueError or TypeError naming what is wrong."""
    import functools

    from .packed_forward import packed_keywords
    fn = load_factory(spec, "packed forward")
    packed_keywords(fn, spec)
    wrapped = functools.wraps(fn)(functools.partial(fn))
    wrapped.spec = spec.replace("\\", "/").rsplit("/", 1)[-1]  # type: ignore[attr-defined]  # FILE.py:FN in results
    return wrapped
