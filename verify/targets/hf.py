# Over 350 lines: one adapter for one stack — each property through transformers' and PEFT's own code paths.
"""The target for the stack most users fine-tune with: a transformers causal LM (``PreTrainedModel``) or a PEFT
``PeftModel`` around one.

* KV cache: ``use_cache=False`` against chunked forwards through ``past_key_values`` (a cache of the class
  transformers makes by default, ``DynamicCache``, or ``cache_cls``) with explicit ``cache_position`` and
  ``position_ids``; transformers' own ``generate`` (greedy, left-padded ragged prompts, ``attention_mask``) with
  ``use_cache`` on and off. A transformers cache is made per sequence: a call at position 0 starts a new one, as
  ``generate`` does.
* LoRA: PEFT's ``LoraConfig`` on the requested modules (default ``"all-linear"``); its layers read through PEFT's own
  tensors (``lora_A[adapter].weight``, ``r``, ``lora_alpha``, ``use_rslora``); ``merge_adapter`` / ``unmerge_adapter``
  / ``merge_and_unload``; the base model through ``disable_adapter()``.
* Gradient checkpointing: transformers' switch (``activation_checkpointing_enable`` where it exists, else
  ``gradient_checkpointing_enable``) with ``use_reentrant`` False and True; "every:K" where the switch takes
  ``every_n_layers``. transformers checkpoints in train mode only (``GradientCheckpointingLayer``).
* Gradient accumulation and mixed precision: transformers' own ``Trainer`` (:mod:`verify.targets.hf_trainer`).

transformers and PEFT are imported lazily; nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .base import Target, copy_sharing_weights, parametrised_child
from .hf_tied import HFTiedEmbeddings
from .protocols import Limits
from .peft import PeftLoRALayerView, PeftLoRATarget, is_peft_model, apply_peft_lora, peft_layers

GC_MODES = ("use_reentrant=False", "use_reentrant=True")


def _is(obj: Any, package: str, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.split(".")[0] == package for c in type(obj).__mro__)


def is_hf_model(obj: Any) -> bool:
    """A transformers ``PreTrainedModel`` or a PEFT ``PeftModel`` (told by class, nothing imported)."""
    return _is(obj, "transformers", "PreTrainedModel") or is_peft_model(obj)


def pretrained(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (itself, or a PeftModel's base model)."""
    return model.get_base_model() if is_peft_model(model) else model


def _forward_takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(pretrained(model).forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model: nn.Module) -> str:
    """The forward's name for the cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if _forward_takes(model, "cache") else "past_key_values"


def new_cache(model: nn.Module, cache_cls: Optional[type] = None):
    """An empty cache of ``cache_cls`` (default transformers' ``DynamicCache``) for ``model``."""
    if cache_cls is None:
        from transformers import DynamicCache
        cache_cls = DynamicCache
    try:
        return cache_cls(config=pretrained(model).config)
    except TypeError:  # transformers 4.x: DynamicCache() takes no config
        return cache_cls()


def _every_n_layers_supported(model: nn.Module) -> bool:
    fn = getattr(pretrained(model), "activation_checkpointing_enable", None) or pretrained(
        model).gradient_checkpointing_enable
    try:
        return "every_n_layers" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class HFTarget(HFTiedEmbeddings, Target):
    """A transformers causal LM or a PeftModel; ``cache_cls`` the KV cache class under test (default
    transformers' ``DynamicCache``), ``trainer_cls`` the ``transformers.Trainer`` (sub)class the GA and MP checks run,
    ``input_require_grads``: what transformers does for a reentrant checkpoint under a frozen embedding (its
    ``enable_input_require_grads``; False undoes it, the zoo's reentrant-with-frozen-base)."""

    own_train_loop = True  # transformers' Trainer
    checkpoints_in_eval = False  # transformers' GradientCheckpointingLayer checkpoints in train mode only
    gc_modes = GC_MODES
    mp_step_label = "transformers' Trainer (bf16=True: accelerate's autocast)"

    def __init__(self, model: nn.Module, *, cache_cls: Optional[type] = None, trainer_cls: Optional[type] = None,
                 input_require_grads: bool = True, max_batch_size: int = 8, packed_mask: Optional[str] = None):
        if not is_hf_model(model):
            raise TypeError(f"{type(model).__qualname__} is neither a transformers PreTrainedModel nor a PeftModel")
        self.model, self.cache_cls, self.trainer_cls = model, cache_cls, trainer_cls
        self.input_require_grads = input_require_grads
        if packed_mask not in (None, "all-ones"):
            raise ValueError(f"packed_mask is None (no attention mask beside position_ids) or 'all-ones', "
                             f"got {packed_mask!r}")
        self.packed_mask = packed_mask  # property 7: what goes beside the packed rows' position_ids
        self._max_batch_size = max_batch_size
        self._cache = None
        inner = pretrained(model)
        what = f"PeftModel({type(inner).__name__})" if is_peft_model(model) else type(inner).__name__
        cfg = inner.config
        self.description = (f"transformers {what} (hidden {getattr(cfg, 'hidden_size', '?')}, "
                            f"{getattr(cfg, 'num_hidden_layers', '?')} layers, "
                            f"{getattr(cfg, '_attn_implementation', '?')} attention)")
        self.policies = ("all", "every:2", "every:3") if _every_n_layers_supported(model) else ("all",)

    def not_applicable(self, prop: str) -> Optional[str]:
        if prop == "gradient_checkpointing" and not getattr(pretrained(self.model), "supports_gradient_checkpointing",
                                                            False):
            return f"{type(pretrained(self.model)).__name__} does not support gradient checkpointing"
        if prop == "packing" and not _forward_takes(self.model, "position_ids"):
            return f"{type(pretrained(self.model)).__name__}.forward takes no position_ids: no padding-free path"
        if prop in ("kv_cache", "lora_merge", "gradient_checkpointing", "grad_accum", "mixed_precision",
                    "loss_kernel", "packing", "tied_embeddings"):
            return None
        return f"the transformers adapter offers no operations for {prop}"

    @property
    def limits(self) -> Limits:
        cfg = pretrained(self.model).config
        weight = next(p for p in self.model.parameters() if p.is_floating_point())
        return Limits(int(cfg.vocab_size), self._max_batch_size, int(getattr(cfg, "max_position_embeddings", 2048)),
                      weight.dtype, weight.device)

    # ---- property 1 ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def kv_session(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        self._cache = None
        try:
            yield
        finally:
            self._cache = None
            self.model.train(was_training)

    def logits(self, tokens: torch.Tensor, start_pos: int, *, kv_caching: bool) -> torch.Tensor:
        if not kv_caching:
            if start_pos != 0:
                raise ValueError(f"uncached logits start at position 0, not {start_pos}")
            with torch.no_grad():
                return self.model(input_ids=tokens, use_cache=False).logits
        if start_pos == 0 or self._cache is None:
            self._cache = new_cache(self.model, self.cache_cls)
        held = self._cache.get_seq_length()
        if held != start_pos:
            raise ValueError(f"a cached call at position {start_pos}, but the cache holds {held} positions")
        pos = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)
        with torch.no_grad():
            return self.model(input_ids=tokens, use_cache=True, cache_position=pos,
                              position_ids=pos[None].expand(tokens.shape[0], -1),
                              **{cache_argument(self.model): self._cache}).logits

    def generate(self, prompts: Sequence[Sequence[int]], max_gen_len: int, *, kv_caching: bool
                 ) -> tuple[list[list[int]], list[list[float]]]:
        """transformers' ``generate``: greedy, prompts left-padded (id 0) under an ``attention_mask``, no stop token,
        exactly ``max_gen_len`` new tokens; the log-probabilities from its raw ``logits``."""
        device = self.limits.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
        extra = {cache_argument(self.model): new_cache(self.model, self.cache_cls)} if (
            kv_caching and self.cache_cls is not None) else {}
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                      max_new_tokens=max_gen_len, min_new_tokens=max_gen_len, use_cache=kv_caching,
                                      return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                                      eos_token_id=None, num_beams=1, **extra)
        new = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).double()  # (B, n, V)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])[..., 0]
        return new.tolist(), logprobs.cpu().tolist()

    # ---- property 3 ----------------------------------------------------------------------------------------------

    def lora_target(self, *, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float, use_rslora: bool,
                    layer_cls: Optional[type] = None, generator: Optional[torch.Generator] = None) -> PeftLoRATarget:
        if layer_cls is not None:
            raise ValueError("layer_cls is swapped into llama_ref's model; a transformers model takes PEFT's layers")
        if is_peft_model(self.model):
            model = copy.deepcopy(self.model)
        else:
            model = apply_peft_lora(copy.deepcopy(self.model), targets, rank, alpha, dropout, use_rslora, generator)
        return PeftLoRATarget(model, self.description)

    def lora_layers(self, model: nn.Module) -> list[PeftLoRALayerView]:
        return peft_layers(model)

    # ---- property 4 (and the training copies of 2 and 5) ---------------------------------------------------------

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def fresh_lora_model(self, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                         generator: torch.Generator) -> nn.Module:
        if is_peft_model(self.model):  # its own adapters; the frozen base shared, only read
            return copy_sharing_weights(self.model, {id(p) for p in self.model.parameters() if not p.requires_grad})
        return apply_peft_lora(copy_sharing_weights(self.model), targets, rank, alpha, dropout, generator=generator)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder layers: the ``ModuleList`` of ``num_hidden_layers`` modules."""
        n = int(pretrained(model).config.num_hidden_layers)
        for m in pretrained(model).modules():
            if isinstance(m, nn.ModuleList) and len(m) == n:
                return list(m)
        raise TypeError(f"{type(pretrained(model)).__name__} has no ModuleList of its {n} decoder layers")

    def recompute_probes(self, model: nn.Module) -> list[nn.Module]:
        """Per block, the module whose calls count its forwards: its first child holding parameters (``self_attn``).
        transformers 5 checkpoints a layer's ``forward``, not its ``__call__``, so hooks on the layer itself run once
        whether or not it is recomputed; its children are called again by the recomputation."""
        probes = []
        for i, block in enumerate(self.blocks(model)):
            child = parametrised_child(block)
            if child is None:
                raise TypeError(f"decoder layer {i} has no child module with parameters to count its forwards on")
            probes.append(child)
        return probes

    def set_checkpointing(self, model: nn.Module, policy: Optional[str], mode: Optional[str] = None) -> None:
        inner = pretrained(model)
        if policy is None:
            disable = getattr(inner, "activation_checkpointing_disable", None) or inner.gradient_checkpointing_disable
            disable()
            return
        reentrant = (mode or GC_MODES[0]) == "use_reentrant=True"
        kwargs: dict[str, Any] = {}
        if policy != "all":
            kind, _, k = policy.partition(":")
            if kind != "every" or policy not in self.policies:
                raise ValueError(f"policy {policy!r}: transformers' switch offers {list(self.policies)}")
            kwargs["every_n_layers"] = int(k)
        enable = getattr(inner, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": reentrant}, **kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **kwargs)
        if not self.input_require_grads and hasattr(inner, "_require_grads_hook"):  # set where transformers enabled it
            inner.disable_input_require_grads()

    def checkpointed_blocks(self, model: nn.Module) -> Optional[frozenset[int]]:
        flags = [getattr(b, "gradient_checkpointing", None) for b in self.blocks(model)]
        if not all(isinstance(f, bool) for f in flags):
            return None  # transformers 4.x: one switch on the model
        return frozenset(i for i, f in enumerate(flags) if f)

    def train_logits(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens, use_cache=False).logits

    # ---- properties 2 and 5: transformers' Trainer ----------------------------------------------------------------

    def step_driver(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, clip: Optional[float],
                    schedule: str, total_steps: int, warmup: int):
        """transformers' Trainer, one ``train()`` per window; the rate of each step is the check's (``schedule``,
        ``total_steps`` and ``warmup`` are what it follows), set on ``optimizer``."""
        from .hf_trainer import TrainerDriver
        return TrainerDriver(model, optimizer, clip, trainer_cls=self.trainer_cls)

    def mp_step(self, precision: str = "bf16"):
        from .hf_trainer import TrainerStep
        return TrainerStep(precision=precision, trainer_cls=self.trainer_cls)

    # ---- property 7 ----------------------------------------------------------------------------------------------

    def pack(self, documents: Sequence[dict[str, torch.Tensor]], row_len: int, n_micro: int
             ) -> list[dict[str, torch.Tensor]]:
        """transformers' own padding-free collator, ``DataCollatorWithFlattening``: each micro-batch's documents
        (the window's, in order, dealt into ``n_micro`` groups) flattened into one row with ``position_ids``
        restarting per document and each document's first label replaced by -100. It knows no row length."""
        from transformers import DataCollatorWithFlattening
        collator = DataCollatorWithFlattening(return_position_ids=True)
        docs = list(documents)
        n = min(n_micro, len(docs))
        base, extra = divmod(len(docs), n)
        out, start = [], 0
        for m in range(n):
            take = base + (m < extra)
            flat = collator([{"input_ids": d["input_ids"].tolist(), "labels": d["labels"].tolist()}
                             for d in docs[start:start + take]], return_tensors="pt")
            out.append({"input_ids": flat["input_ids"], "labels": flat["labels"],
                        "positions": flat["position_ids"]})
            start += take
        return out

    def _packed_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        # use_cache=False, as in training: with a cache made for the call transformers does not look for packed rows
        inputs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
        if "positions" in batch:  # the padding-free path: position_ids, and no mask or an all-ones one beside them
            inputs["position_ids"] = batch["positions"].to(device)
            if self.packed_mask == "all-ones":
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    def batch_logits(self, batch: dict[str, torch.Tensor], *, float64: bool = False) -> torch.Tensor:
        model = copy.deepcopy(self.model).eval()
        if float64:
            model.double()
        with torch.no_grad():
            return model(**self._packed_inputs(batch)).logits

    def batch_loss_and_grads(self, batch: dict[str, torch.Tensor], *, float64: bool = False
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The model's own loss of the batch, ``labels`` given and ``num_items_in_batch=1`` (so the sum)."""
        model = copy.deepcopy(self.model).eval()
        if float64:
            model.double()
        kwargs = {"num_items_in_batch": 1} if (_forward_takes(model, "num_items_in_batch")
                                               or _forward_takes_kwargs(model)) else {}
        out = model(**self._packed_inputs(batch), labels=batch["labels"].to(next(model.parameters()).device),
                    **kwargs)
        loss = out.loss if kwargs else out.loss * int((batch["labels"][:, 1:] != -100).sum())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def train_window(self, window: Sequence[dict[str, torch.Tensor]], *, float64: bool = False
                     ) -> tuple[float, int, dict[str, torch.Tensor]]:
        """transformers' ``Trainer`` (``trainer_cls``) over the window's micro-batches (:func:`verify.targets.
        hf_trainer.packed_window`): the loss it reports, the ``num_items_in_batch`` it counts, the gradient it
        stepped with."""
        from .hf_trainer import packed_window
        model = copy.deepcopy(self.model).train()
        if float64:
            model.double()
        micro = [{**self._packed_inputs(b), "labels": b["labels"]} for b in window]
        return packed_window(model, micro, trainer_cls=self.trainer_cls)

    # ---- property 8 ----------------------------------------------------------------------------------------------

    def loss_kernels(self) -> dict[str, Any]:
        """transformers' causal-LM loss (its ``fixed_cross_entropy``, with ``num_items_in_batch``)."""
        from .loss_kernel import transformers_causal_lm_loss
        return {"transformers": transformers_causal_lm_loss()}

    def kernel_model_loss(self, tokens: torch.Tensor, labels: torch.Tensor, kernel: Optional[Any], *,
                          float64: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Plain: the logits of ``model(input_ids=…)`` and the summed next-token cross-entropy formed here. With
        ``kernel``: the model's own loss path — ``model(input_ids=…, labels=…, num_items_in_batch=1)``, so that its
        loss is the sum — with its ``loss_function`` replaced by one that calls ``kernel`` on the hidden states its
        ``lm_head`` receives, as a fused-loss patch does; a forward that drops ``num_items_in_batch`` shows as a
        mean."""
        model = copy.deepcopy(self.model).eval()  # eval: no dropout, so the two paths see the same function
        if float64:
            model.double()
        inner = pretrained(model)
        if kernel is None:
            logits = model(input_ids=tokens).logits[:, :-1].flatten(0, 1)
            loss = torch.nn.functional.cross_entropy(logits if float64 else logits.float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100, reduction="sum")
        else:
            head = inner.get_output_embeddings()
            if not isinstance(head, nn.Linear):
                raise NotImplementedError(f"its output head is a {type(head).__qualname__}, not a Linear")
            if not (_forward_takes(model, "num_items_in_batch") or _forward_takes_kwargs(model)):
                raise NotImplementedError("its forward takes no num_items_in_batch (transformers 4.46+)")
            seen: dict[str, torch.Tensor] = {}
            hook = head.register_forward_hook(lambda m, args, out: seen.__setitem__("hidden", args[0]))

            def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
                shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index).flatten()
                total = kernel(seen["hidden"].flatten(0, 1), head.weight, shifted, reduction="sum")
                count = num_items_in_batch if num_items_in_batch is not None else (shifted != ignore_index).sum()
                return total / count
            try:
                inner.loss_function = loss_function
            except AttributeError:  # a transformers whose loss_function property has no setter
                raise NotImplementedError(f"transformers {_version()}'s loss_function cannot be replaced") from None
            try:
                loss = model(input_ids=tokens, labels=labels, num_items_in_batch=1).loss
            finally:
                hook.remove()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _forward_takes_kwargs(model: nn.Module) -> bool:
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(pretrained(model).forward).parameters.values())
    except (TypeError, ValueError):
        return False


def _version() -> str:
    import transformers
    return transformers.__version__

