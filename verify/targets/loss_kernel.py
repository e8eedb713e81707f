"""Loss kernels as property 8's check sees them: a function of the final hidden states, the output weight and the
labels that computes the cross-entropy loss — chunked, fused with the projection, or plain.

The documented signature (``llama-verify --loss-fn PATH.py:FN``)::

    fn(hidden, weight, labels, *, reduction="mean", ...) -> loss

``hidden`` (N, D), ``weight`` (V, D), ``labels`` (N,) class ids already shifted (row i predicts ``labels[i]``), -100
where ignored; ``reduction`` ``"mean"``, ``"sum"`` or ``"none"`` (N per-token losses, 0 where ignored), as
``torch.nn.functional.cross_entropy``. A reduction the kernel does not implement raises ``NotImplementedError``
(that reduction is then not checked, and the result says so). Optional keywords, recognised by name:
``bias`` (V,), ``chunk_size`` (rows per chunk: the check sweeps it), ``num_items_in_batch`` (with ``"mean"``, the
denominator: the window's target count under accumulation) and ``softcap`` (logits ``c·tanh(z/c)``). What the
kernel does not take is not asked of it, and the result names it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100
OPTIONAL = ("bias", "chunk_size", "num_items_in_batch", "softcap")


@dataclass(frozen=True)
class LossKernel:
    """A loss implementation under test and the keywords it takes; ``unavailable`` says why it cannot be checked
    here (the check is then not applicable, naming it)."""

    name: str
    fn: Optional[Callable[..., torch.Tensor]]
    takes: frozenset[str] = frozenset()  # of OPTIONAL
    unavailable: Optional[str] = None

    @classmethod
    def from_function(cls, fn: Callable[..., torch.Tensor], name: Optional[str] = None) -> "LossKernel":
        """The kernel ``fn``, its optional keywords read from its signature; TypeError naming what is missing."""
        label = name or getattr(fn, "__qualname__", repr(fn))
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError) as e:
            raise TypeError(f"loss kernel {label}: its signature cannot be read ({e})") from None
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        variadic = any(p.kind == p.VAR_POSITIONAL for p in params.values())
        if len(positional) < 3 and not variadic:
            raise TypeError(f"loss kernel {label}: takes {len(positional)} positional arguments; the signature is "
                            "fn(hidden, weight, labels, *, reduction='mean', ...)")
        if "reduction" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"loss kernel {label}: has no `reduction` keyword; the signature is "
                            "fn(hidden, weight, labels, *, reduction='mean', ...)")
        return cls(label, fn, frozenset(k for k in OPTIONAL if k in params))

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 reduction: str = "mean", **options: Any) -> torch.Tensor:
        """The kernel with the options it takes (those left None are not passed); asking one it does not take is a
        ValueError (the check never does)."""
        given = {k: v for k, v in options.items() if v is not None}
        extra = sorted(set(given) - self.takes)
        if extra:
            raise ValueError(f"loss kernel {self.name} takes no {', '.join(extra)}")
        if self.fn is None:
            raise RuntimeError(f"loss kernel {self.name} is unavailable: {self.unavailable}")
        return self.fn(hidden, weight, labels, reduction=reduction, **given)

    def __str__(self) -> str:
        return self.name


def torch_linear_cross_entropy() -> LossKernel:
    """``torch.nn.functional.linear_cross_entropy`` (torch 2.13+), chunked by its ``LinearCrossEntropyOptions``
    (``batch_chunk_size``); unavailable on an older torch."""
    name = "torch.nn.functional.linear_cross_entropy"
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options is None:
        return LossKernel(name, None, unavailable=f"torch {torch.__version__} has no linear_cross_entropy "
                                                  "(it appeared in torch 2.13)")

    def kernel(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=None):
        return fn(hidden, weight, labels, linear_bias=bias, reduction=reduction, ignore_index=IGNORE_INDEX,
                  options=options() if chunk_size is None else options(batch_chunk_size=chunk_size))
    return LossKernel(name, kernel, frozenset({"bias", "chunk_size"}))


def transformers_causal_lm_loss() -> LossKernel:
    """transformers' causal-LM loss as its models compute it: the logits upcast to fp32 and its
    ``fixed_cross_entropy`` — the mean over the targets, or with ``num_items_in_batch`` their sum over that count
    (``ForCausalLMLoss``, transformers 4.46+); the labels given already shifted. Unavailable without it."""
    name = "transformers fixed_cross_entropy (ForCausalLMLoss)"
    try:
        from transformers.loss.loss_utils import fixed_cross_entropy
    except ImportError:
        import importlib.metadata as md
        try:
            version = md.version("transformers")
        except md.PackageNotFoundError:
            return LossKernel(name, None, unavailable="transformers is not installed")
        return LossKernel(name, None, unavailable=f"transformers {version} has no loss_utils.fixed_cross_entropy "
                                                  "(num_items_in_batch arrived in 4.46)")

    def kernel(hidden, weight, labels, *, reduction="mean", bias=None, num_items_in_batch=None):
        if reduction != "mean":
            raise NotImplementedError("transformers' causal-LM loss is the mean over the targets (or their sum over "
                                      "num_items_in_batch)")
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        return fixed_cross_entropy(logits, labels, num_items_in_batch=num_items_in_batch, ignore_index=IGNORE_INDEX)
    return LossKernel(name, kernel, frozenset({"bias", "num_items_in_batch"}))

