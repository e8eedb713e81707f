"""LoRA layers as the merge check sees them, on any model: loralib's shape, recognised by what a layer has.

loralib (Hu et al.'s reference code), this project's ``LoRALinear`` and most hand-written adapters (the seed
report's among them) share one shape: a Linear-like module with the base ``weight`` (out, in), the adapter's
``lora_A`` (r, in) and ``lora_B`` (out, r) tensors, its ``r`` and ``lora_alpha``, a ``merged`` flag and
``merge()`` / ``unmerge()``; with ``merge_weights`` set, ``eval()`` merges and ``train()`` unmerges. The check
computes the scaling from ``lora_alpha`` and ``r`` itself (``alpha / r``, or ``alpha / sqrt(r)`` where the layer
says ``use_rslora``), never from the layer's own ``scaling``: that is what it checks.

:class:`LoralibTarget` is the :class:`verify.targets.base.LoRATarget` for a model holding such layers; the adapters
make one from a fresh copy (llama_ref's with the adapters the check asks for, a foreign model with its own).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # forward(module, tokens) → uncached logits (B, L, V)


def is_loralib_layer(m: nn.Module) -> bool:
    """Does ``m`` have loralib's shape: ``weight``, ``lora_A``, ``lora_B`` tensors, an int ``r``, a numeric
    ``lora_alpha``, a bool ``merged`` and callable ``merge`` / ``unmerge``?"""
    tensors = all(isinstance(getattr(m, a, None), torch.Tensor) for a in ("weight", "lora_A", "lora_B"))
    r, alpha = getattr(m, "r", None), getattr(m, "lora_alpha", None)
    return (tensors and isinstance(r, int) and not isinstance(r, bool) and isinstance(alpha, (int, float))
            and isinstance(getattr(m, "merged", None), bool)
            and callable(getattr(m, "merge", None)) and callable(getattr(m, "unmerge", None)))


def loralib_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name → module of every loralib-shaped layer of ``model``, in order."""
    return {name: m for name, m in model.named_modules() if is_loralib_layer(m)}


def merge_only_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name → module of every adapted layer of ``model`` that merges but cannot unmerge — litgpt's ``LoRALinear``
    and its fused query/key/value ``LoRAQKVLinear``: ``lora_A``, ``lora_B`` tensors, an int ``r`` > 0, a numeric
    ``lora_alpha``, a bool ``merged``, a callable ``merge`` and no ``unmerge``, the base weight as ``weight`` or
    ``linear.weight`` — in order."""
    return {name: m for name, m in model.named_modules()
            if all(isinstance(getattr(m, a, None), torch.Tensor) for a in ("lora_A", "lora_B"))
            and isinstance(getattr(m, "r", None), int) and not isinstance(m.r, bool) and m.r > 0
            and isinstance(getattr(m, "lora_alpha", None), (int, float))
            and isinstance(getattr(m, "merged", None), bool) and callable(getattr(m, "merge", None))
            and not callable(getattr(m, "unmerge", None)) and isinstance(_base_weight(m), torch.Tensor)}


def _base_weight(m: nn.Module) -> Optional[torch.Tensor]:
    """The layer's base weight (out, in): its own ``weight``, or that of the Linear it wraps (litgpt's ``linear``)."""
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    inner = getattr(m, "linear", None)
    return inner.weight if isinstance(inner, nn.Linear) else None


class LoRALayerView:
    """One adapted layer, read live: its tensors, hyper-parameters and state, and its merge operations."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    @property
    def weight(self) -> torch.Tensor:
        return _base_weight(self.module)

    @torch.no_grad()
    def effective_update(self, absolute: bool = False) -> Optional[torch.Tensor]:
        """None where the update is one ``B·A`` (``lora_A`` (r, in), ``lora_B`` (out, r)). Otherwise — a fused
        adapter such as litgpt's ``LoRAQKVLinear``, one ``lora_A``/``lora_B`` pair for the enabled parts of q, k
        and v, grouped and zero-padded into the fused output — the (out, in) update its *unmerged* forward adds to
        ``x·Wᵀ``, measured in float64 by running a float64 copy of the layer, in eval mode, on the identity basis:
        ``layer(I) − I·Wᵀ − bias``. Nothing of the layer's merge is used, so it is what a merge must add. With
        ``absolute``, the same with ``|A|`` and ``|B|``: the magnitude the update's rounding error scales with."""
        w, a, b, r = self.weight, self.lora_A, self.lora_B, self.rank
        if tuple(a.shape) == (r, w.shape[1]) and tuple(b.shape) == (w.shape[0], r):
            return None
        if self.merged:
            raise ValueError(f"{self.name} is merged: its update is measured on the unmerged layer")
        m = copy.deepcopy(self.module).double()
        if getattr(m, "merge_weights", None) is True:
            m.merge_weights = False  # eval() must not fold the update into W: it is what is measured
        m.eval()
        if absolute:
            m.lora_A.abs_()
            m.lora_B.abs_()
        eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device).unsqueeze(0)
        inner = getattr(m, "linear", m)
        out = m(eye)[0] - torch.nn.functional.linear(eye, inner.weight, getattr(inner, "bias", None))[0]
        return (out.abs() if absolute else out).T.contiguous()

    @property
    def lora_A(self) -> torch.Tensor:
        return self.module.lora_A

    @property
    def lora_B(self) -> torch.Tensor:
        return self.module.lora_B

    @property
    def rank(self) -> int:
        return self.module.r

    @property
    def alpha(self) -> float:
        return float(self.module.lora_alpha)

    @property
    def use_rslora(self) -> bool:
        return bool(getattr(self.module, "use_rslora", False))

    @property
    def dropout(self) -> float:
        """The probability of the dropout on the adapter's input (``lora_dropout.p``; 0 without one)."""
        return float(getattr(getattr(self.module, "lora_dropout", None), "p", 0.0))

    @property
    def merged(self) -> bool:
        return self.module.merged

    @property
    def merges_on_eval(self) -> Optional[bool]:
        """loralib's ``merge_weights`` (eval() merges, train() unmerges); None where the layer has no such switch."""
        on = getattr(self.module, "merge_weights", None)
        return on if isinstance(on, bool) else None

    def set_merges_on_eval(self, on: bool) -> None:
        if self.merges_on_eval is not None:
            self.module.merge_weights = on

    def merge(self) -> None:
        self.module.merge()

    def unmerge(self) -> None:
        unmerge = getattr(self.module, "unmerge", None)
        if not callable(unmerge):
            raise NotImplementedError(f"{self.name} ({type(self.module).__qualname__}) has no unmerge")
        unmerge()


def layer_views(model: nn.Module) -> list[LoRALayerView]:
    """Every loralib-shaped layer of ``model`` as a :class:`LoRALayerView`, in order."""
    return [LoRALayerView(n, m) for n, m in loralib_layers(model).items()]


def draw_nonzero_b(layers: Iterable[LoRALayerView], generator: torch.Generator) -> None:
    """``B ~ N(0, 1/r)`` from ``generator``, in place: with a fresh ``B = 0`` the update ``B·A`` is zero, ``A`` gets
    no gradient and a merge bug does not show."""
    with torch.no_grad():
        for layer in layers:
            b = layer.lora_B
            b.copy_((torch.randn(b.shape, generator=generator) / math.sqrt(layer.rank)).to(b))


def draw_nonzero_zeros(model: torch.nn.Module, generator: torch.Generator) -> list[str]:
    """Every trainable tensor of ``model`` that is all zero (an adapter's fresh ``B`` where its layers are not of
    loralib's shape: torchtune's ``lora_b``, litgpt's ``lora_B``) drawn ``N(0, 1/fan_in)`` from ``generator``, in
    place, for the same reason as :func:`draw_nonzero_b`; their names."""
    drawn = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.numel() and not bool(p.any()):
                p.copy_((torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1])).to(p))
                drawn.append(name)
    return drawn


def describe_layers(layers: Iterable[LoRALayerView]) -> dict[str, str]:
    """The adapters' hyper-parameters for a case label: ``targets`` (the layers' own names, e.g. ``wq,wv``), ``r``,
    ``alpha`` and ``dropout`` (their distinct values, ``/``-joined) and ``rslora`` (`` rslora`` or empty)."""
    layers = list(layers)
    return {"targets": ",".join(dict.fromkeys(layer.name.rsplit(".", 1)[-1] for layer in layers)),
            "r": "/".join(map(str, sorted({layer.rank for layer in layers}))),
            "alpha": "/".join(f"{a:g}" for a in sorted({layer.alpha for layer in layers})),
            "dropout": "/".join(f"{p:g}" for p in sorted({layer.dropout for layer in layers})),
            "rslora": " rslora" if any(layer.use_rslora for layer in layers) else ""}


class ModuleLoRATarget:
    """What a :class:`verify.targets.base.LoRATarget` over one ``nn.Module`` (``self.module``, its ``self.layers``)
    does the same way whatever its layers are: the float64 conversion, the adapters' parameter names, gradients."""

    module: nn.Module
    layers: list
    unmerge_missing: Optional[str] = None  # the library unmerges

    def to_float64(self):
        """This model converted to float64 in place (modes and flags as they are): the exact answer, without a
        second copy of the model. The last use of the target: its fp32 state is gone."""
        self.module.double()  # in place: the layers' views still see them
        return self

    def lora_parameter_names(self) -> list[str]:
        params = {id(p): n for n, p in self.module.named_parameters()}
        return [params[id(t)] for layer in self.layers for t in (layer.lora_A, layer.lora_B) if id(t) in params]

    def named_parameters(self):
        return self.module.named_parameters()

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)


class LoralibTarget(ModuleLoRATarget):
    """A model with loralib-shaped LoRA layers, as the merge check drives it (:class:`verify.targets.base.LoRATarget`).

    ``forward(module, tokens)`` gives the uncached logits; ``base`` (optional) the same model without adapters,
    for the fresh-adapter claim — without it, the base is this model with every ``lora_A`` set to zero (the update
    ``B·A·x`` is then zero whatever ``B`` holds). ``no_gradient`` says why a backward cannot reach the parameters
    (a forward under ``inference_mode``), None where it can. ``find_layers`` finds the adapted layers (default
    :func:`loralib_layers`; :func:`merge_only_layers` for litgpt's, with ``unmerge_missing`` saying why there is no
    unmerge).
    """

    unloaded_logits = None  # loralib has no merge-and-unload of its own

    def __init__(self, module: nn.Module, forward: Forward, *, description: str,
                 base: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, no_gradient: Optional[str] = None,
                 find_layers: Callable[[nn.Module], dict[str, nn.Module]] = loralib_layers,
                 unmerge_missing: Optional[str] = None):
        self.module, self._forward, self.description = module, forward, description
        self._base, self.no_gradient, self._find = base, no_gradient, find_layers
        self.unmerge_missing = unmerge_missing
        self.layers = [LoRALayerView(n, m) for n, m in find_layers(module).items()]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Uncached logits in the model's current mode; with autograd where the forward allows it."""
        return self._forward(self.module, tokens)

    def base_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits of the model without its adapters, in eval mode, without gradient."""
        if self._base is not None:
            with torch.no_grad():
                return self._base(tokens)
        bare = copy.deepcopy(self.module)
        bare_layers = self._find(bare)
        for m in bare_layers.values():
            if getattr(m, "merge_weights", None) is True:
                m.merge_weights = False  # eval() must not fold anything into W
        bare.eval()
        with torch.no_grad():
            for name, m in bare_layers.items():
                if m.merged:
                    raise ValueError(f"{name} came merged: the model without adapters cannot be recovered")
                m.lora_A.zero_()
            return self._forward(bare, tokens)

    def train(self, mode: bool = True) -> None:
        """The model's own mode switch (loralib layers merge on eval() and unmerge on train())."""
        self.module.train(mode)

    def merge(self) -> None:
        for layer in self.layers:
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers:
            layer.unmerge()



# ---- adapters merged as a state dict (torchtune's) ------------------------------------------------------------------

def state_dict_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name → module of every adapter kept as ``lora_a``/``lora_b`` Linear modules with ``rank``, ``alpha`` and a
    ``disabled`` switch (torchtune's ``LoRALinear``), in order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_a", None), nn.Linear) and isinstance(getattr(m, "lora_b", None), nn.Linear)
            and isinstance(getattr(m, "weight", None), torch.Tensor) and isinstance(getattr(m, "disabled", None), bool)
            and isinstance(getattr(m, "rank", None), int) and isinstance(getattr(m, "alpha", None), (int, float))}


class StateDictLoRALayer:
    """One such adapter, read live (:class:`verify.targets.protocols.LoRALayer`); merged by its target, as a state
    dict: it has no merge or unmerge of its own, and its mode merges nothing."""

    merges_on_eval = None
    use_rslora = False

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    weight = property(lambda self: self.module.weight)
    lora_A = property(lambda self: self.module.lora_a.weight)  # (r, in)
    lora_B = property(lambda self: self.module.lora_b.weight)  # (out, r)
    rank = property(lambda self: int(self.module.rank))
    alpha = property(lambda self: float(self.module.alpha))
    dropout = property(lambda self: float(getattr(getattr(self.module, "dropout", None), "p", 0.0)))
    merged = property(lambda self: self.module.disabled)  # the merged weight in place, the adapter path off

    def set_merges_on_eval(self, on: bool) -> None:
        pass

    def merge(self) -> None:
        raise NotImplementedError(f"{self.name}: merged as a state dict, by its target")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{self.name}: a state-dict merge has no unmerge")


class StateDictMergeTarget(ModuleLoRATarget):
    """A model whose adapters the library merges as a state dict (:class:`verify.targets.protocols.LoRATarget`):
    ``merge_fn(state_dict, rank=, alpha=)`` returns the merged state dict (torchtune's ``get_merged_lora_ckpt``),
    whose adapted weights are put in place with every adapter switched off — the model that checkpoint loads into.
    Merged once, the state dict the function sees next is the merged one (no adapter keys), as a second merge of a
    merged checkpoint would be. There is no unmerge (``unmerge_missing`` says so)."""

    unloaded_logits = None

    def __init__(self, module: nn.Module, forward: Forward, merge_fn: Callable[..., dict], *, description: str,
                 unmerge_missing: str, no_gradient: Optional[str] = None):
        self.module, self._forward, self._merge_fn = module, forward, merge_fn
        self.description, self.unmerge_missing, self.no_gradient = description, unmerge_missing, no_gradient
        self.layers = [StateDictLoRALayer(n, m) for n, m in state_dict_lora_layers(module).items()]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(self.module, tokens)

    def base_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        bare = copy.deepcopy(self.module).eval()
        for m in state_dict_lora_layers(bare).values():
            m.disabled = True
        with torch.no_grad():
            return self._forward(bare, tokens)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @torch.no_grad()
    def merge(self) -> None:
        ranks, alphas = {layer.rank for layer in self.layers}, {layer.alpha for layer in self.layers}
        if len(ranks) != 1 or len(alphas) != 1:
            raise ValueError(f"adapters of several ranks {sorted(ranks)} or alphas {sorted(alphas)}: one state-dict "
                             "merge takes one of each")
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        if any(layer.merged for layer in self.layers):  # the merged checkpoint: no adapter keys left
            state = {k: v for k, v in state.items() if ".lora_a." not in k and ".lora_b." not in k}
        merged = self._merge_fn(state, rank=ranks.pop(), alpha=alphas.pop())
        for layer in self.layers:
            layer.module.weight.copy_(merged[f"{layer.name}.weight"])
            layer.module.disabled = True

    def unmerge(self) -> None:
        raise NotImplementedError(self.unmerge_missing)
