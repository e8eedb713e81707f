"""Property 9 on transformers + PEFT: a model with ``tie_word_embeddings`` through transformers' and PEFT's own code —
``save_pretrained`` → ``from_pretrained``, a model built on the meta device, ``to_empty`` and ``tie_weights``,
``resize_token_embeddings``, LoRA on ``lm_head`` or ``embed_tokens`` (``get_peft_model``; kept tied with PEFT's
``ensure_weight_tying``, which ties an adapter from the embedding's side), ``merge_and_unload`` — a mixin of
:class:`verify.targets.hf.HFTarget`.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from .base import summed_next_token_loss
from .peft import is_peft_model

TIED_LORA = {"output": "lm_head", "tok_embeddings": "embed_tokens"}


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_peft_model(model) else model


def _base(module: nn.Module) -> nn.Module:
    """The module a PEFT layer wraps (a LoRA layer's base layer, a ``ModulesToSaveWrapper``'s original module;
    itself where it wraps none)."""
    if hasattr(module, "get_base_layer"):
        return module.get_base_layer()
    return getattr(module, "original_module", module)


class HFTiedEmbeddings:
    """:class:`verify.targets.protocols.TiedEmbeddingsTarget` for an HFTarget (``self.model``)."""

    model: nn.Module

    def tied_model(self) -> nn.Module:
        return copy.deepcopy(self.model).train()

    def vocab_matrices(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
        inner = _inner(model)
        return (_base(inner.get_input_embeddings()).weight, _base(inner.get_output_embeddings()).weight,
                bool(getattr(inner.config, "tie_word_embeddings", False)))

    def embed(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _inner(model).get_input_embeddings()(tokens.to(_device(model)))

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _inner(model).get_output_embeddings()(hidden)

    def tied_logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        model.train()  # PEFT's adapters unmerged; the transforms' adapters and the test models have no dropout
        with torch.no_grad():
            return model(input_ids=tokens.to(_device(model)), use_cache=False).logits

    def tied_grads(self, model: nn.Module, tokens: torch.Tensor, *, untie: bool = False, float64: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed next-token loss's gradients of the input and output embeddings' weights; ``untie``: the head a
        plain ``nn.Linear`` holding a copy of the weight."""
        m = copy.deepcopy(model).train()
        inner = _inner(m)
        if untie:
            weight = inner.get_input_embeddings().weight
            head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            head.weight = nn.Parameter(weight.detach().clone())
            inner.set_output_embeddings(head)
        if float64:
            m.double()
        for p in m.parameters():
            p.requires_grad_(True)
        tokens = tokens.to(_device(m))
        summed_next_token_loss(m(input_ids=tokens, use_cache=False).logits, tokens).backward()
        return inner.get_input_embeddings().weight.grad, inner.get_output_embeddings().weight.grad

    def transform(self, model: nn.Module, name: str) -> nn.Module:
        """transformers' and PEFT's own: ``save_load`` (``save_pretrained`` → ``from_pretrained``), ``materialize``
        (its class built on the meta device, ``to_empty``, ``tie_weights``, the state loaded), ``resize``
        (``resize_token_embeddings``, 8 more tokens), ``lora:output`` / ``lora:tok_embeddings`` (``get_peft_model``
        on ``lm_head`` / ``embed_tokens``, rank 4, alpha 8, no dropout, adapters drawn non-zero; ``:kept`` with
        ``ensure_weight_tying``), ``full:output`` / ``full:tok_embeddings`` (``modules_to_save``, the copy moved as
        training would), ``merge`` (``merge_and_unload``; on the model itself where PEFT's tied adapters,
        views of each other, cannot be deep-copied)."""
        inner = _inner(model)
        if name == "save_load":
            with tempfile.TemporaryDirectory() as d:
                inner.save_pretrained(d)
                dtype = {"dtype" if _takes_dtype() else "torch_dtype": inner.dtype}  # the attention as it was too
                out = type(inner).from_pretrained(d, attn_implementation=inner.config._attn_implementation, **dtype)
        elif name == "materialize":
            with torch.device("meta"):
                out = type(inner)(copy.deepcopy(inner.config)).to(inner.dtype)
            out = out.to_empty(device=inner.device)
            out.tie_weights()
            out.load_state_dict(inner.state_dict())
            with torch.no_grad():  # non-persistent buffers (RoPE's inv_freq) are in no state dict: as a recipe
                source = dict(inner.named_buffers())  # re-initialises them after to_empty
                for n, b in out.named_buffers():
                    b.copy_(source[n])
        elif name == "resize":
            out = copy.deepcopy(inner)
            out.resize_token_embeddings(out.config.vocab_size + 8)
        elif name.startswith("lora:"):
            out = self._lora(model, name)
        elif name.startswith("full:"):
            out = self._modules_to_save(model, TIED_LORA[name.split(":")[1]])
        elif name == "merge":
            if not is_peft_model(model):
                raise NotImplementedError("merge_and_unload is PEFT's: the model has no adapters")
            try:
                model = copy.deepcopy(model)
            except RuntimeError:  # PEFT's tied adapters (ensure_weight_tying) are views: no deepcopy; merged in place
                pass
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT's warning about merging tied adapters: what is checked
                out = model.merge_and_unload()
        else:
            raise NotImplementedError(f"no transform {name!r} here")
        return out.train()

    def _lora(self, model: nn.Module, name: str) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        module, kept = TIED_LORA[name.split(":")[1]], name.endswith(":kept")
        if kept and module == "lm_head":
            raise NotImplementedError("PEFT ties an adapter from the embedding's side (ensure_weight_tying with "
                                      "embed_tokens targeted); an lm_head adapter it does not keep tied")
        options: dict[str, Any] = {"ensure_weight_tying": True} if kept else {}
        if kept and "ensure_weight_tying" not in LoraConfig.__dataclass_fields__:
            raise NotImplementedError("this PEFT has no ensure_weight_tying (added in 0.18)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about adapters on tied layers: what is checked
            out = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                  target_modules=[module], **options))
        return _moved(out, "lora_", replace=True)

    def _modules_to_save(self, model: nn.Module, module: str) -> nn.Module:
        """PEFT's ``modules_to_save=[module]`` (a trainable copy of the whole module; a fresh LoRA adapter on
        ``q_proj``, which changes nothing, beside it), the copy moved as training would move it."""
        from peft import LoraConfig, get_peft_model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                  target_modules=["q_proj"], modules_to_save=[module]))
        return _moved(out, ".modules_to_save.", replace=False)

    def parameter_count(self, model: nn.Module) -> int:
        return int(_inner(model).num_parameters())


def _moved(model: nn.Module, marker: str, *, replace: bool) -> nn.Module:
    """``model`` with every parameter whose name holds ``marker`` drawn N(0, 0.01) (``replace``; adapters drawn
    non-zero) or moved by that much (a trained copy), from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if marker in n:
                noise = torch.randn(p.shape, generator=g) * 0.1
                p.copy_(noise) if replace else p.add_(noise)
    return model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _takes_dtype() -> bool:
    """transformers 5 names ``from_pretrained``'s dtype argument ``dtype``; 4.x ``torch_dtype``."""
    import transformers
    return int(transformers.__version__.split(".")[0]) >= 5
