"""Every check reads a target through its property's declared protocol and nothing else: each check runs on a
recording proxy of each adapter (llama_ref's, Meta-style, transformers'), and every member it touched must be
declared in ``verify.targets.protocols`` — on the target, on the LoRA copy it makes and on their LoRA layers. A check
made to read an undeclared member fails the same assertion (shown below, not by hand)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch

from llama_ref.default import default_model
from verify.properties import PROPERTIES, Inputs
from verify.targets.base import Target
from verify.targets.protocols import LoRALayer, LoRATarget, StepDriver, members
from verify.targets.spec import as_target

from .targets import seed_style, train_steps

# What a nested object returned by a target member is read as.
NESTED = {"lora_target": LoRATarget, "lora_layers": LoRALayer, "step_driver": StepDriver, "layers": LoRALayer,
          "to_float64": LoRATarget}


class _Reads:
    """Every member read, as ``Protocol.member`` → the protocols that may declare it."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}

    def add(self, protocol: type, name: str) -> None:
        self.seen.setdefault(protocol.__name__, set()).add(name)

    def undeclared(self, protocols: dict[str, tuple[type, ...]]) -> list[str]:
        out = []
        for owner, names in self.seen.items():
            declared = set().union(*(members(p) for p in protocols[owner]))
            out += [f"{owner}.{n}" for n in sorted(names - declared)]
        return out


def _wrap(value: Any, protocol: type, reads: _Reads) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_Recording(v, protocol, reads) for v in value)
    return None if value is None else _Recording(value, protocol, reads)


class _Recording:
    """A stand-in for ``inner`` that records each member read (as ``protocol``'s) and hands back what the real one
    would, nested objects wrapped in turn."""

    _OWN = frozenset({"_inner", "_protocol", "_reads", "__class__", "__dict__"})

    def __init__(self, inner: Any, protocol: type, reads: _Reads):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_protocol", protocol)
        object.__setattr__(self, "_reads", reads)

    def __getattribute__(self, name: str) -> Any:
        if name in _Recording._OWN:
            return object.__getattribute__(self, name)
        inner, protocol, reads = (object.__getattribute__(self, n) for n in ("_inner", "_protocol", "_reads"))
        reads.add(protocol, name)
        value = getattr(inner, name)
        if name in NESTED:
            nested = NESTED[name]
            if callable(value) and name != "layers":
                return functools.wraps(value)(lambda *a, **k: _wrap(value(*a, **k), nested, reads))
            return _wrap(value, nested, reads)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_inner"), name, value)

    def __str__(self) -> str:
        return str(object.__getattribute__(self, "_inner"))


class _RecordingTarget(_Recording, Target):
    """The proxy of a whole target: a ``Target`` to the checks, which take it as it is."""


def _target_proxy(model: Any, protocol: type, reads: _Reads) -> _RecordingTarget:
    return _RecordingTarget(as_target(model), protocol, reads)


def _run(name: str, model: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    prop = PROPERTIES[name]
    reads = _Reads()
    (top,) = prop.protocols
    result = prop.check(_target_proxy(model, top, reads), **kwargs)
    allowed = {top.__name__: prop.protocols, "LoRATarget": (LoRATarget,), "LoRALayer": (LoRALayer,),
               "StepDriver": (StepDriver,)}
    return result, reads.undeclared(allowed)


def _hf():
    pytest.importorskip("peft")
    from verify.oracle_hf import default_hf_model
    return default_hf_model()


CHEAP: dict[str, dict[str, Any]] = {  # every code path that reads the target, at the least cost
    "kv_cache": dict(max_gen_len=3),
    "lora_merge": dict(),
    "gradient_checkpointing": dict(policies=("all",), autocast_dtype=None),
    "grad_accum": dict(n_sequences=2, steps=1, stream_ga=None, optimizer="sgd"),
    "mixed_precision": dict(steps=1),
}
ADAPTERS: dict[str, tuple[Callable[[], Any], dict[str, dict[str, Any]]]] = {
    "llama_ref": (default_model, {}),
    "meta_style": (seed_style.make_trainable, {
        "gradient_checkpointing": dict(policies=("seed",)),
        "grad_accum": dict(train_step=train_steps.token_mean_step),
        "mixed_precision": dict(train_step=train_steps.autocast_step(torch.bfloat16))}),
    "hf": (_hf, {"mixed_precision": dict(full=False),
                 "gradient_checkpointing": dict(full_finetune=False)}),
}


@pytest.mark.parametrize("check", list(CHEAP))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_every_check_reads_only_what_its_protocol_declares(adapter, check):
    make, extra = ADAPTERS[adapter]
    result, undeclared = _run(check, make(), **{**CHEAP[check], **extra.get(check, {})})
    assert not undeclared, f"{check} on {adapter} read undeclared members: {undeclared}"
    assert result.verdict == "PASS", result  # the paths that read the target really ran


def test_a_check_reading_an_undeclared_member_is_caught(monkeypatch):
    from verify.checks import kv_cache
    real = kv_cache.compare

    def peeking(*args, **kwargs):  # the check, made to peek at a member its protocol does not list
        peeking.target.model  # noqa: B018
        return real(*args, **kwargs)
    monkeypatch.setattr(kv_cache, "compare", peeking)
    reads = _Reads()
    peeking.target = _target_proxy(default_model(), PROPERTIES["kv_cache"].protocols[0], reads)
    kv_cache.check_kv_cache(peeking.target, max_gen_len=1)
    assert reads.undeclared({"KVCacheTarget": PROPERTIES["kv_cache"].protocols}) == ["KVCacheTarget.model"]


def test_the_record_of_property_6_reads_only_the_model(monkeypatch):
    import verify.properties as P
    seen = []
    monkeypatch.setattr(P, "check_distributed", lambda model, **kw: seen.append(model) or "ran")
    reads = _Reads()
    model = default_model()
    assert P.PROPERTIES["distributed"](_target_proxy(model, P.PROPERTIES["distributed"].protocols[0], reads),
                                       Inputs()) == "ran"
    assert seen == [model] and reads.undeclared({"DistributedTarget": P.PROPERTIES["distributed"].protocols}) == []
