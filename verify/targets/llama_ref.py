# Over 350 lines: one adapter for llama_ref, each property's operations on its own model and parts.
"""The target for this project's own model: ``llama_ref.model.Transformer`` (the default of every check).

The only module of ``verify/`` that the checks reach ``llama_ref`` through. The parts under test can be swapped
for another implementation's (the bug zoo's components): ``cache_cls`` (a ``KVCache`` subclass),
``generator_cls`` (a ``Llama`` subclass, whose ``step_logits`` feeds each decode step to the model) and
``block_runner`` (how a block is run, checkpointed or not), ``trainer_cls`` (a ``Trainer`` subclass: the
training loop the GA check drives) and ``head_cls`` (an ``nn.Linear`` subclass for the output head, given the tied
weight: property 9's).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from llama_ref.generation import Llama
from llama_ref.kv_cache import KVCache
from llama_ref.lora import ALL_TARGETS, LoRALinear, apply_lora_to_llama
from llama_ref.loss import chunked_cross_entropy, linear_cross_entropy, token_loss_sum
from llama_ref.model import BlockRunner, Transformer
from llama_ref.train.optim import make_scheduler
from llama_ref.train.packing import packed_micro_batches
from llama_ref.train.trainer import PACKING, Trainer

from .base import Target, copy_sharing_weights
from .protocols import Batch, Limits, Reported
from .lora import LoralibTarget
from .loss_kernel import LossKernel, torch_linear_cross_entropy


def is_llama_ref(obj: Any) -> bool:
    return isinstance(obj, Transformer)


@dataclass(frozen=True)
class _NoStops:
    """A vocabulary without stop tokens, so every generation runs its full length."""

    n_words: int
    stop_tokens: frozenset = frozenset()


class LlamaRefTarget(Target):
    policies = None  # any: set_gradient_checkpointing parses the policy itself
    own_train_loop = True  # llama_ref.train.trainer.Trainer
    checkpoints_in_eval = True  # set_gradient_checkpointing does not depend on the module mode: checked in eval too

    def __init__(self, model: Transformer, *, cache_cls: Optional[type[KVCache]] = None,
                 generator_cls: Optional[type[Llama]] = None, block_runner: Optional[BlockRunner] = None,
                 trainer_cls: Optional[type[Trainer]] = None, head_cls: Optional[type[torch.nn.Linear]] = None):
        self.model = model
        self.head_cls = head_cls
        self.block_runner = block_runner
        self.trainer_cls = trainer_cls or Trainer
        self.cache_cls = cache_cls
        self.generator_cls = generator_cls or Llama
        p = model.params
        self.description = f"llama_ref Transformer (dim {p.dim}, {p.n_layers} layers, {p.attn_impl} attention)"

    def not_applicable(self, prop: str) -> Optional[str]:
        return None

    @property
    def limits(self) -> Limits:
        p, w = self.model.params, self.model.output.weight
        return Limits(p.vocab_size, p.max_batch_size, p.max_seq_len, w.dtype, w.device)

    @contextlib.contextmanager
    def kv_session(self) -> Iterator[None]:
        model = self.model
        was_training, kv_before, cls_before = model.training, model.kv_caching, model.kv_cache_cls
        model.eval()
        model.kv_caching = False  # a fresh cache of the class under test
        model.kv_cache_cls = self.cache_cls or cls_before
        model.kv_caching = True
        try:
            yield
        finally:
            model.train(was_training)
            model.kv_caching = False
            model.kv_cache_cls = cls_before
            model.kv_caching = kv_before

    def logits(self, tokens: torch.Tensor, start_pos: int, *, kv_caching: bool) -> torch.Tensor:
        model = self.model
        with torch.no_grad():
            if kv_caching:
                if not model.kv_caching:
                    raise RuntimeError("cached logits asked outside kv_session(): the model holds no cache")
                return model(tokens, start_pos)
            if start_pos != 0:
                raise ValueError(f"uncached logits start at position 0, not {start_pos}")
            caches = [layer.attention.kv_cache for layer in model.layers]
            for layer in model.layers:  # the switch is the cache's presence: set aside, neither read nor written
                layer.attention.kv_cache = None
            try:
                return model(tokens, 0)
            finally:
                for layer, cache in zip(model.layers, caches):
                    layer.attention.kv_cache = cache

    def generate(self, prompts: Sequence[Sequence[int]], max_gen_len: int, *, kv_caching: bool
                 ) -> tuple[list[list[int]], list[list[float]]]:
        llm = self.generator_cls(self.model, _NoStops(self.model.vocab_size))  # type: ignore[arg-type]
        tokens, logprobs = llm.generate(prompts, max_gen_len, temperature=0.0, logprobs=True, kv_caching=kv_caching)
        return tokens, logprobs or []

    def _base_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The untouched model's uncached logits in eval mode (its mode restored)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.logits(tokens, 0, kv_caching=False)
        finally:
            self.model.train(was_training)

    def lora_target(self, *, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float, use_rslora: bool,
                    layer_cls: Optional[type] = None, generator: Optional[torch.Generator] = None) -> LoralibTarget:
        lora = copy.deepcopy(self.model)
        lora.kv_caching = False
        apply_lora_to_llama(lora, rank, alpha, dropout, ALL_TARGETS if targets is None else targets, merge_weights=True,
                            use_rslora=use_rslora, layer_cls=layer_cls or LoRALinear, generator=generator)
        return LoralibTarget(lora, lambda m, tokens: m(tokens), description=self.description,
                             base=self._base_logits)

    # ---- property 4 ----------------------------------------------------------------------------------------------

    def fresh_model(self) -> Transformer:
        """A copy for one run: cache off, the block runner under test in place (TrainingCopies.fresh_model)."""
        return self._copy(copy.deepcopy(self.model))

    def fresh_lora_model(self, targets: Optional[Sequence[str]], rank: int, alpha: float, dropout: float,
                         generator: torch.Generator) -> Transformer:
        # The base is frozen by the adapters: read, never written, so the copy's parameters share its storage.
        model = self._copy(copy_sharing_weights(self.model))
        apply_lora_to_llama(model, rank, alpha, dropout, ALL_TARGETS if targets is None else targets,
                            generator=generator)
        return model

    def _copy(self, model: Transformer) -> Transformer:
        model.kv_caching = False
        if self.block_runner is not None:
            model.block_runner = self.block_runner
        return model

    def blocks(self, model: Transformer) -> Sequence[torch.nn.Module]:
        return list(model.layers)

    def set_checkpointing(self, model: Transformer, policy: Optional[str], mode: Optional[str] = None) -> None:
        model.set_gradient_checkpointing(policy)  # one mode: non-reentrant, RNG preserved

    def checkpointed_blocks(self, model: Transformer) -> frozenset[int]:
        return frozenset(model.checkpointed_layers)

    def train_logits(self, model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens)

    # ---- property 2 ----------------------------------------------------------------------------------------------

    def step_driver(self, model: Transformer, optimizer: torch.optim.Optimizer, *, clip: Optional[float],
                    schedule: str, total_steps: int, warmup: int) -> "_TrainerDriver":
        return _TrainerDriver(self.trainer_cls(model, optimizer, clip=clip,
                                               scheduler=make_scheduler(optimizer, schedule, total_steps, warmup)))


    def mp_step(self, precision: str = "bf16") -> Callable[..., float]:
        """llama_ref's own mixed-precision step as a :class:`verify.targets.base.TrainStep`: ``Trainer`` with
        ``precision`` (its autocast, its GradScaler for fp16), for the step-based MP check on a real-size model."""
        trainer_cls = self.trainer_cls
        scales: dict[int, dict] = {}  # GradScaler's state per model, across calls (its scale falls after a skip)

        def step(model, optimizer, window, max_norm):
            trainer = trainer_cls(model, optimizer, precision=precision, clip=max_norm)
            if trainer.scaler is not None and id(model) in scales:
                trainer.scaler.load_state_dict(scales[id(model)])
            loss = trainer.step(window).loss
            if trainer.scaler is not None:
                scales[id(model)] = trainer.scaler.state_dict()
            return loss
        return step


    # ---- property 8 ----------------------------------------------------------------------------------------------

    def loss_kernels(self) -> dict[str, LossKernel]:
        """llama_ref's chunked loss (``--loss-chunk``), its fused one (``--fused-loss``) and torch's
        ``linear_cross_entropy`` (unavailable below torch 2.13)."""
        return {"chunked": LossKernel.from_function(chunked_cross_entropy, "llama_ref chunked (--loss-chunk)"),
                "fused": LossKernel.from_function(linear_cross_entropy, "llama_ref fused (--fused-loss)"),
                "torch": torch_linear_cross_entropy()}

    def output_weight(self) -> torch.Tensor:
        return self.model.output.weight

    def kernel_model_loss(self, tokens: torch.Tensor, labels: torch.Tensor, kernel: Optional[Callable[..., Any]], *,
                          float64: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = self._copy(copy.deepcopy(self.model)).train()
        if float64:
            model.double()
        if kernel is None:
            loss = token_loss_sum(model(tokens, 0), labels)
        else:
            loss = model(tokens, 0, labels=labels, loss_kernel=kernel)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


    # ---- property 7 ----------------------------------------------------------------------------------------------

    def pack(self, documents: Sequence[dict[str, torch.Tensor]], row_len: int, n_micro: int
             ) -> list[dict[str, torch.Tensor]]:
        """llama_ref's packer (``llama_ref.train.packing``)."""
        return packed_micro_batches(list(documents), row_len, n_micro)

    def batch_logits(self, batch: dict[str, torch.Tensor], *, float64: bool = False) -> torch.Tensor:
        model = self._training_copy(float64).eval()
        with torch.no_grad():
            return model(batch["input_ids"], 0, **{k: batch[k] for k in PACKING if k in batch})

    def batch_loss_and_grads(self, batch: dict[str, torch.Tensor], *, float64: bool = False
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = self._training_copy(float64)
        loss = self.trainer_cls(model, torch.optim.SGD(model.parameters(), lr=0.0)).loss_sum(batch)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def train_window(self, window: Sequence[dict[str, torch.Tensor]], *, float64: bool = False
                     ) -> tuple[float, int, dict[str, torch.Tensor]]:
        """Its ``Trainer`` (``trainer_cls``), one step of SGD at learning rate 1 without clipping: the gradient it
        stepped with is the parameters' change."""
        model = self._training_copy(float64)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = self.trainer_cls(model, torch.optim.SGD(model.parameters(), lr=1.0)).step(list(window))
        after = dict(model.named_parameters())
        return result.loss, result.n_tokens, {n: before[n] - after[n].detach() for n in before}

    def _training_copy(self, float64: bool) -> Transformer:
        model = self._copy(copy.deepcopy(self.model)).train()
        return model.double() if float64 else model


    # ---- property 9 ----------------------------------------------------------------------------------------------

    def tied_model(self) -> Transformer:
        model = self._copy(copy.deepcopy(self.model)).train()
        if self.head_cls is not None:
            head = self.head_cls(model.params.dim, model.vocab_size, bias=False, device="meta")
            head.weight = model.output.weight
            model.output = head
        return model

    def vocab_matrices(self, model: Transformer) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return model.tok_embeddings.weight, model.output.weight, model.params.tie_embeddings

    def embed(self, model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.tok_embeddings(tokens.to(model.tok_embeddings.weight.device))

    def head(self, model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.output(hidden)

    def tied_logits(self, model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
        model.train()  # adapters unmerged; llama_ref has no dropout but LoRA's, which the transforms set to 0
        with torch.no_grad():
            return model(tokens.to(model.tok_embeddings.weight.device), 0)

    def tied_grads(self, model: Transformer, tokens: torch.Tensor, *, untie: bool = False, float64: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed next-token loss's gradients of ``tok_embeddings.weight`` and ``output.weight``; ``untie``: the
        head a plain ``nn.Linear`` holding a copy of the weight."""
        m = copy.deepcopy(model).train()
        if untie:
            head = torch.nn.Linear(m.params.dim, m.vocab_size, bias=False, device="meta")
            head.weight = torch.nn.Parameter(m.tok_embeddings.weight.detach().clone())
            m.output = head
        if float64:
            m.double()
        for p in m.parameters():
            p.requires_grad_(True)
        tokens = tokens.to(m.tok_embeddings.weight.device)
        m(tokens, 0, labels=tokens).backward()
        return m.tok_embeddings.weight.grad, m.output.weight.grad

    def adapter_grads(self, model: Transformer, tokens: torch.Tensor, *, reference: bool = False,
                      float64: bool = False) -> dict[str, torch.Tensor]:
        """The trainable parameters' gradients of the summed next-token loss; ``reference``: from the model with both
        vocabulary matrices replaced by the kept-tied adapter's effective matrix (formed through the adapted module:
        the head run on the identity, or the embedding looked up for every token) — its update used by both uses,
        whatever the other module does."""
        from llama_ref.lora.tied import TiedEmbedding, TiedHead
        m = copy.deepcopy(model).train()
        if float64:
            m.double()
        tokens = tokens.to(m.tok_embeddings.weight.device)
        params = {n: p for n, p in m.named_parameters() if p.requires_grad}
        if not reference:
            m(tokens, 0, labels=tokens).backward()
            return {n: p.grad for n, p in params.items()}
        w = m.tok_embeddings.weight
        if isinstance(m.tok_embeddings, TiedEmbedding):
            shared = m.output(torch.eye(w.shape[1], dtype=w.dtype, device=w.device)).T
        elif isinstance(m.output, TiedHead):
            shared = m.tok_embeddings(torch.arange(w.shape[0], device=w.device)[None])[0]
        else:
            raise NotImplementedError("no adapter kept tied")
        m.tok_embeddings = torch.nn.Embedding(*w.shape, device="meta")
        m.output = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        loss = torch.func.functional_call(m, {"tok_embeddings.weight": shared, "output.weight": shared}, (tokens, 0),
                                          {"labels": tokens})
        loss.backward()
        return {n: p.grad for n, p in params.items()}

    def transform(self, model: Transformer, name: str) -> Transformer:
        """llama_ref's own: ``save_load`` (``save_checkpoint`` → ``load_model``), ``materialize`` (built on the meta
        device, ``to_empty``, ``tie_weights``, the state loaded), ``resize`` (``resize_token_embeddings`` to 8 more
        tokens), ``lora:output`` / ``lora:tok_embeddings`` (``:kept``: ``keep_tied``; rank 4, alpha 8, no dropout,
        the adapters drawn non-zero), ``merge`` (``merge_and_unload``)."""
        import tempfile

        from llama_ref.formats import meta as meta_format
        from llama_ref.lora import apply as lora_apply
        from llama_ref.vocab import resize_token_embeddings
        if name == "save_load":
            with tempfile.TemporaryDirectory() as d:
                meta_format.save_checkpoint(model, d)
                out = meta_format.load_model(d, max_seq_len=model.params.max_seq_len,
                                             max_batch_size=model.params.max_batch_size,
                                             attn_impl=model.params.attn_impl)
        elif name == "materialize":
            w = model.tok_embeddings.weight
            with torch.device("meta"):
                out = Transformer(model.params.replace(kv_caching=False)).to(w.dtype)
            out = out.to_empty(device=w.device)
            out.tie_weights()
            out.load_state_dict(model.state_dict())
        elif name == "resize":
            out = resize_token_embeddings(copy.deepcopy(model), model.vocab_size + 8)
        elif name.startswith("lora:"):
            out = copy.deepcopy(model)
            g = torch.Generator().manual_seed(0)
            lora_apply.apply_lora_to_llama(out, 4, 8, 0.0, (name.split(":")[1],), keep_tied=name.endswith(":kept"),
                                           generator=g)
            with torch.no_grad():
                for n, p in out.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif name == "merge":
            out = lora_apply.merge_and_unload(copy.deepcopy(model))
        elif name.startswith("full:"):
            raise NotImplementedError("llama_ref trains a vocabulary matrix through LoRA (targets output, "
                                      "tok_embeddings) or with the whole model; a trainable copy of one module is "
                                      "PEFT's modules_to_save")
        else:
            raise NotImplementedError(f"no transform {name!r} here")
        out.kv_caching = False
        return out.train()

    def parameter_count(self, model: Transformer) -> int:
        from llama_ref.lora import apply as lora_apply
        return lora_apply.count_parameters(model)[1]

class _TrainerDriver:
    """``Trainer`` as the GA check drives it: its own ``windows`` and its own schedule (the check's ``lr`` is only
    what it must have arrived at)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def windows(self, micro: Sequence[Batch], ga: int) -> list[list[Batch]]:
        return list(self.trainer.windows(iter(micro), ga))

    def step(self, window: Sequence[Batch], lr: float) -> Reported:
        r = self.trainer.step(window)
        return Reported(r.loss, r.n_tokens, r.grad_norm, r.lr)
