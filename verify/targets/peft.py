"""PEFT's LoRA as the checks read it: its ``lora.Linear`` layers through PEFT's own tensors and hyper-parameters,
a PeftModel as the merge check drives it, and LoRA applied with ``get_peft_model(model, LoraConfig(...))``.

PEFT is imported lazily; its classes are told by name (nothing imported to recognise them).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .lora import LoRALayerView, ModuleLoRATarget

# llama_ref's (Meta's) module names → transformers' Llama names, for the checks' default LoRA targets
META_TO_HF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
              "w3": "up_proj"}


def is_peft_model(obj: Any) -> bool:
    return any(c.__name__ == "PeftModel" and c.__module__.split(".")[0] == "peft" for c in type(obj).__mro__)


class PeftLoRALayerView(LoRALayerView):
    """One PEFT ``lora.Linear`` (its ``adapter``), read live through PEFT's own tensors and hyper-parameters."""

    def __init__(self, name: str, module: nn.Module, adapter: str, use_rslora: bool):
        super().__init__(name, module)
        self.adapter, self._use_rslora = adapter, use_rslora

    @property
    def weight(self) -> torch.Tensor:
        return self.module.get_base_layer().weight

    @property
    def lora_A(self) -> torch.Tensor:
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> torch.Tensor:
        return self.module.lora_B[self.adapter].weight

    @property
    def rank(self) -> int:
        return int(self.module.r[self.adapter])

    @property
    def alpha(self) -> float:
        return float(self.module.lora_alpha[self.adapter])

    @property
    def use_rslora(self) -> bool:
        own = getattr(self.module, "use_rslora", None)
        return bool(own[self.adapter]) if isinstance(own, dict) and self.adapter in own else self._use_rslora

    @property
    def dropout(self) -> float:
        return float(getattr(self.module.lora_dropout[self.adapter], "p", 0.0))

    @property
    def merged(self) -> bool:
        return bool(self.module.merged)

    @property
    def merges_on_eval(self) -> None:
        return None  # PEFT merges on request only

    def set_merges_on_eval(self, on: bool) -> None:
        pass

    def merge(self) -> None:
        self.module.merge(adapter_names=[self.adapter])


def peft_layers(model: nn.Module) -> list[PeftLoRALayerView]:
    """Every PEFT LoRA Linear of ``model`` (a PeftModel) for its active adapter, in order."""
    if not is_peft_model(model):
        return []
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    rslora = bool(getattr(model.peft_config[adapter], "use_rslora", False))
    return [PeftLoRALayerView(n, m, adapter, rslora) for n, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and adapter in m.lora_A
            and hasattr(m, "get_base_layer")]


def _seeded(generator: Optional[torch.Generator]) -> contextlib.AbstractContextManager:
    """The global RNG (which PEFT draws ``A`` from) forked and seeded from ``generator``."""
    fork = torch.random.fork_rng(devices=[])
    if generator is None:
        return fork

    @contextlib.contextmanager
    def seeded():
        with fork:
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
            yield
    return seeded()


def apply_peft_lora(model: nn.Module, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                    use_rslora: bool = False, generator: Optional[torch.Generator] = None) -> nn.Module:
    """``get_peft_model(model, LoraConfig(...))`` on ``targets`` (Meta's names translated; None: "all-linear"),
    ``A`` drawn from ``generator``; the base frozen by PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("LoRA on a transformers model needs PEFT: pip install peft") from e
    modules: Any = "all-linear" if targets is None else sorted({META_TO_HF.get(t, t) for t in targets})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                        target_modules=modules, task_type="CAUSAL_LM")
    with _seeded(generator):
        return get_peft_model(model, config)


class PeftLoRATarget(ModuleLoRATarget):
    """A PeftModel as the merge check drives it (:class:`verify.targets.base.LoRATarget`)."""

    no_gradient = None

    def __init__(self, module: nn.Module, description: str):
        self.module, self.description = module, description
        self.layers = peft_layers(module)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=tokens, use_cache=False).logits

    def base_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        was = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), self.module.disable_adapter():
                return self.module(input_ids=tokens, use_cache=False).logits
        finally:
            self.module.train(was)

    def unloaded_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Eval logits of ``merge_and_unload()`` applied to a copy (the plain transformers model it returns)."""
        plain = copy.deepcopy(self.module).merge_and_unload().eval()
        with torch.no_grad():
            return plain(input_ids=tokens, use_cache=False).logits

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def merge(self) -> None:
        self.module.merge_adapter()

    def unmerge(self) -> None:
        self.module.unmerge_adapter()

