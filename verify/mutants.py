"""The bug zoo: known-wrong implementations, injected one at a time, that each check must catch.

Every mutant is a bug that real code shipped (the origin says where), written as the smallest patch of
``llama_ref`` that reproduces it. ``inject(name)`` applies the patch for the duration of a ``with`` block;
``Mutant.model_overrides`` are ModelArgs changes the bug needs to be reachable (e.g. the SDPA path).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import torch
import torch.nn.functional as F

import llama_ref.lora as L
import llama_ref.model as M
from llama_ref.generation import Llama

Patch = tuple[Any, str, Any]  # (object, attribute, replacement)


@dataclass(frozen=True)
class Mutant:
    name: str
    prop: str  # the property (check name) that must catch it
    description: str
    origin: str
    patches: Callable[[], list[Patch]]
    model_overrides: dict[str, Any] = field(default_factory=dict)


MUTANTS: dict[str, Mutant] = {}


def mutant(name: str, prop: str, description: str, origin: str, **model_overrides: Any
           ) -> Callable[[Callable[[], list[Patch]]], Callable[[], list[Patch]]]:
    def register(fn: Callable[[], list[Patch]]) -> Callable[[], list[Patch]]:
        if name in MUTANTS:
            raise ValueError(f"mutant {name!r} registered twice")
        MUTANTS[name] = Mutant(name, prop, description, origin, fn, dict(model_overrides))
        return fn
    return register


@contextlib.contextmanager
def inject(name: str) -> Iterator[Mutant]:
    """Apply mutant ``name`` inside the block; the correct code is restored on exit, even on error."""
    if name not in MUTANTS:
        raise KeyError(f"unknown mutant {name!r}; known: {sorted(MUTANTS)}")
    m = MUTANTS[name]
    with contextlib.ExitStack() as stack:
        for target, attr, replacement in m.patches():
            if not hasattr(target, attr):
                raise AttributeError(f"mutant {name!r} patches {target!r}.{attr}, which does not exist")
            stack.enter_context(mock.patch.object(target, attr, replacement))
        yield m


def mutants_for(prop: Optional[str] = None) -> list[Mutant]:
    return [m for m in MUTANTS.values() if prop is None or m.prop == prop]


# --------------------------------------------------------------------------------------------------------------
# Property 1: KV cache
# --------------------------------------------------------------------------------------------------------------

def _ensure_cache_like(attn: M.Attention, xk: torch.Tensor) -> None:
    attn.ensure_cache(xk)


@mutant("seed_cache_batch_index", "kv_cache", "cache indexed `cache_k[:, bsz, start:end]` instead of `[:bsz, start:end]`",
        "the seed report's Attention.forward")
def _seed_cache_batch_index() -> list[Patch]:
    def update_cache(self, xk, xv, start_pos):
        bsz, seqlen = xk.shape[:2]
        _ensure_cache_like(self, xk)
        with torch.no_grad():
            self.cache_k[:, bsz, start_pos:start_pos + seqlen] = xk
            self.cache_v[:, bsz, start_pos:start_pos + seqlen] = xv
        return self.cache_k[:, bsz, :start_pos + seqlen], self.cache_v[:, bsz, :start_pos + seqlen]
    return [(M.Attention, "update_cache", update_cache)]


@mutant("cache_not_sliced_to_bsz", "kv_cache", "all max_batch_size cache rows read back, stale rows included",
        "caches sized for max_batch_size read without `[:bsz]` (Meta's code slices; ports often drop it)")
def _cache_not_sliced() -> list[Patch]:
    def update_cache(self, xk, xv, start_pos):
        bsz, seqlen = xk.shape[:2]
        _ensure_cache_like(self, xk)
        with torch.no_grad():
            self.cache_k[:bsz, start_pos:start_pos + seqlen] = xk
            self.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        return self.cache_k[:, :start_pos + seqlen], self.cache_v[:, :start_pos + seqlen]
    return [(M.Attention, "update_cache", update_cache)]


@mutant("cache_write_ignores_start_pos", "kv_cache", "new keys/values written at position 0 instead of start_pos",
        "cache updates written as `cache[:bsz, :seqlen] = xk` (offset bookkeeping lost in ring/static caches)")
def _cache_write_at_zero() -> list[Patch]:
    def update_cache(self, xk, xv, start_pos):
        bsz, seqlen = xk.shape[:2]
        _ensure_cache_like(self, xk)
        with torch.no_grad():
            self.cache_k[:bsz, :seqlen] = xk
            self.cache_v[:bsz, :seqlen] = xv
        return self.cache_k[:bsz, :start_pos + seqlen], self.cache_v[:bsz, :start_pos + seqlen]
    return [(M.Attention, "update_cache", update_cache)]


@mutant("rope_not_offset", "kv_cache", "RoPE of new tokens taken from position 0, not start_pos",
        "decode loops that slice `freqs_cis[:seqlen]` (rotary position ids not advanced with the cache)")
def _rope_not_offset() -> list[Patch]:
    original = M.Transformer.rotary_freqs

    def rotary_freqs(self, start_pos, seqlen, device, dtype=torch.float32):
        return original(self, 0, seqlen, device, dtype)
    return [(M.Transformer, "rotary_freqs", rotary_freqs)]


@mutant("mask_top_left", "kv_cache", "causal mask aligned top-left (a square mask) when start_pos > 0",
        "SDPA's `is_causal=True` with q_len != kv_len, and hand-written `triu(ones(T, S), 1)` masks")
def _mask_top_left() -> list[Patch]:
    def causal_mask(q_len, kv_len, device, dtype=torch.float32):
        if q_len == 1:
            return None
        return torch.triu(torch.full((q_len, kv_len), float("-inf"), device=device, dtype=dtype), diagonal=1)
    return [(M, "causal_mask", causal_mask)]


@mutant("mask_dropped_with_cache", "kv_cache", "no mask whenever the cache holds earlier tokens",
        "decoders that assume one new token per step once a cache exists (`if past: mask = None`)")
def _mask_dropped() -> list[Patch]:
    original = M.causal_mask

    def causal_mask(q_len, kv_len, device, dtype=torch.float32):
        return None if kv_len > q_len else original(q_len, kv_len, device, dtype)
    return [(M, "causal_mask", causal_mask)]


@mutant("mask_sees_next_token", "kv_cache", "causal mask off by one: each query also sees the next token",
        "`triu(..., diagonal=start_pos + 2)` off-by-one in hand-built masks")
def _mask_off_by_one() -> list[Patch]:
    def causal_mask(q_len, kv_len, device, dtype=torch.float32):
        if q_len == 1:
            return None
        mask = torch.full((q_len, kv_len), float("-inf"), device=device, dtype=dtype)
        return torch.triu(mask, diagonal=kv_len - q_len + 2)
    return [(M, "causal_mask", causal_mask)]


@mutant("keys_cached_before_rope", "kv_cache", "keys written to the cache before RoPE, current keys rotated",
        "attention layers calling `cache.update(k, v)` before `apply_rotary_emb`")
def _keys_cached_before_rope() -> list[Patch]:
    def forward(self, x, start_pos, freqs_cis, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.kv_caching:
            _ensure_cache_like(self, xk)
            with torch.no_grad():
                self.cache_k[:bsz, start_pos:start_pos + seqlen] = xk  # not yet rotated
                self.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        xq, xk = M.apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        if self.kv_caching:
            keys = torch.cat([self.cache_k[:bsz, :start_pos], xk], dim=1)
            values = self.cache_v[:bsz, :start_pos + seqlen]
        else:
            keys, values = xk, xv
        keys, values = M.repeat_kv(keys, self.n_rep), M.repeat_kv(values, self.n_rep)
        out = M.ATTENTION_IMPLS[self.attn_impl](xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                mask)
        return self.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, -1))
    return [(M.Attention, "forward", forward)]


@mutant("sdpa_is_causal", "kv_cache", "the SDPA path uses `is_causal=True` instead of the bottom-right mask",
        "fast-attention ports of Llama (is_causal is top-left aligned when q_len != kv_len)", attn_impl="sdpa")
def _sdpa_is_causal() -> list[Patch]:
    def attention_sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask is not None)
    return [(M, "ATTENTION_IMPLS", {**M.ATTENTION_IMPLS, "sdpa": attention_sdpa})]


@mutant("uncached_generate_new_tokens_only", "kv_cache",
        "uncached generation feeds only the new tokens (no cache to supply the past)",
        "the seed report's first uncached `generate` (the branch did not recompute tokens[:, :cur_pos])")
def _uncached_new_only() -> list[Patch]:
    def step_logits(self, tokens, prev_pos, cur_pos, kv_caching):
        return self.model(tokens[:, prev_pos:cur_pos], prev_pos)
    return [(Llama, "step_logits", step_logits)]


@mutant("cached_generate_start_pos_zero", "kv_cache", "cached decode steps passed start_pos=0",
        "generation loops calling `model(tokens[:, prev_pos:cur_pos], 0)`")
def _cached_start_pos_zero() -> list[Patch]:
    def step_logits(self, tokens, prev_pos, cur_pos, kv_caching):
        if kv_caching:
            return self.model(tokens[:, prev_pos:cur_pos], 0)
        return self.model(tokens[:, :cur_pos], 0)[:, prev_pos:]
    return [(Llama, "step_logits", step_logits)]


# --------------------------------------------------------------------------------------------------------------
# Property 3: LoRA merge
# --------------------------------------------------------------------------------------------------------------

@mutant("lora_scaling_r_over_alpha", "lora_merge", "scaling = r / alpha (invisible when alpha == r)",
        "LoRA ports that invert loralib's `lora_alpha / r`")
def _lora_scaling_inverted() -> list[Patch]:
    return [(L.LoRALinear, "scaling", property(lambda self: self.r / self.lora_alpha))]


@mutant("lora_scaling_alpha_only", "lora_merge", "scaling = alpha (the division by r forgotten)",
        "adapters whose update is multiplied by lora_alpha alone")
def _lora_scaling_alpha() -> list[Patch]:
    return [(L.LoRALinear, "scaling", property(lambda self: float(self.lora_alpha)))]


@mutant("lora_merge_without_scaling", "lora_merge", "merge adds B·A, the forward adds scaling·B·A",
        "merge code that forgets the scaling the forward applies")
def _lora_merge_unscaled() -> list[Patch]:
    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype))
        self.merged = True
    return [(L.LoRALinear, "merge", merge)]


@mutant("lora_merge_transposed", "lora_merge", "merge adds (B·A)ᵀ (right only for square targets, if at all)",
        "loralib's `fan_in_fan_out` transpose applied to a layer that does not need it")
def _lora_merge_transposed() -> list[Patch]:
    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.delta_weight().T.reshape(self.weight.shape)).to(self.weight.dtype))
        self.merged = True
    return [(L.LoRALinear, "merge", merge)]


@mutant("lora_unmerge_noop", "lora_merge", "unmerge clears the flag without subtracting",
        "train() after eval() leaving the update merged (and adding it again on the next eval)")
def _lora_unmerge_noop() -> list[Patch]:
    def unmerge(self):
        self.merged = False
    return [(L.LoRALinear, "unmerge", unmerge)]


@mutant("lora_unmerge_twice", "lora_merge", "unmerge subtracts the update twice",
        "unmerge written as `W -= 2 * delta` / run from both train() and an explicit call")
def _lora_unmerge_twice() -> list[Patch]:
    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - 2 * self.delta_weight()).to(self.weight.dtype))
        self.merged = False
    return [(L.LoRALinear, "unmerge", unmerge)]


@mutant("lora_dropout_in_eval", "lora_merge", "LoRA dropout applied whatever the mode",
        "`F.dropout(x, p)` (training=True by default) in the LoRA branch")
def _lora_dropout_in_eval() -> list[Patch]:
    original = L.LoRALinear.forward

    def forward(self, x):
        p = getattr(self.lora_dropout, "p", 0.0)
        if self.merged:
            return F.dropout(original(self, x), p, training=True)
        return original(self, F.dropout(x, p, training=True))  # base path gets it too: unmerged ≠ merged
    return [(L.LoRALinear, "forward", forward)]


@mutant("lora_merge_every_eval", "lora_merge", "eval() merges again even when already merged",
        "merge without the `merged` guard: every eval() adds the update once more")
def _lora_merge_unguarded() -> list[Patch]:
    @torch.no_grad()
    def merge(self):
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True
    return [(L.LoRALinear, "merge", merge)]


@mutant("lora_base_trainable", "lora_merge", "base weights left trainable",
        "mark_only_lora_as_trainable not called, or matching on a name that never occurs")
def _lora_base_trainable() -> list[Patch]:
    def mark_only_lora_as_trainable(model):
        return None
    return [(L, "mark_only_lora_as_trainable", mark_only_lora_as_trainable)]


@mutant("lora_b_not_zero_init", "lora_merge", "lora_B initialised like lora_A: a fresh adapter changes the model",
        "A/B initialisations swapped or both random")
def _lora_b_random() -> list[Patch]:
    original = L.LoRALinear.reset_lora_parameters

    def reset_lora_parameters(self, generator=None):
        original(self, generator)
        if not self.lora_B.is_meta:
            with torch.no_grad():
                bound = 1.0 / math.sqrt(self.r)
                self.lora_B.uniform_(-bound, bound, generator=generator)
    return [(L.LoRALinear, "reset_lora_parameters", reset_lora_parameters)]


# --------------------------------------------------------------------------------------------------------------
# Property 4: gradient checkpointing
# --------------------------------------------------------------------------------------------------------------

def _checkpointed_block(run_checkpoint: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A ``run_block`` whose checkpointed branch is ``run_checkpoint(layer, h, start_pos, freqs_cis, mask)``."""
    def run_block(layer, h, start_pos, freqs_cis, mask, checkpointed):
        if checkpointed and torch.is_grad_enabled():
            return run_checkpoint(layer, h, start_pos, freqs_cis, mask)
        return layer(h, start_pos, freqs_cis, mask)
    return run_block


class _HandRolledCheckpoint(torch.autograd.Function):
    """The hand-written reentrant checkpoint many repositories ship (guided-diffusion, Transformer Engine, PyTorch's
    own CheckpointFunction before it replayed autocast): forward under ``no_grad``; backward restores the RNG state,
    recomputes under ``enable_grad`` and differentiates the recomputed graph. The trainable parameters are passed as
    inputs, so a block whose input needs no gradient (frozen base + LoRA) still gets its gradients. What it gets
    wrong is the autocast state of the recomputation: ``recompute_autocast(device_type, forward_was_autocast)``."""

    @staticmethod
    def forward(ctx, run, recompute_autocast, h, *params):
        ctx.run, ctx.recompute_autocast = run, recompute_autocast
        ctx.autocast = torch.is_autocast_enabled(h.device.type)
        ctx.rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(h.device) if h.is_cuda else None
        ctx.save_for_backward(h, *params)
        with torch.no_grad():
            return run(h)

    @staticmethod
    def backward(ctx, grad_out):
        h, *params = ctx.saved_tensors
        h = h.detach().requires_grad_(ctx.needs_input_grad[2])
        with torch.random.fork_rng(devices=[h.device.index or 0] if h.is_cuda else []):
            torch.set_rng_state(ctx.rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, h.device)
            with torch.enable_grad(), ctx.recompute_autocast(h.device.type, ctx.autocast):
                out = ctx.run(h)
        inputs = ([h] if h.requires_grad else []) + params
        grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        h_grad = grads.pop(0) if h.requires_grad else None
        return (None, None, h_grad, *grads)


def _hand_rolled(recompute_autocast: Callable[[str, bool], Any]) -> Callable[..., torch.Tensor]:
    def run_checkpoint(layer, h, start_pos, freqs_cis, mask):
        params = [p for p in layer.parameters() if p.requires_grad]
        return _HandRolledCheckpoint.apply(lambda x: layer(x, start_pos, freqs_cis, mask), recompute_autocast, h,
                                           *params)
    return run_checkpoint


@mutant("gc_reentrant_frozen_inputs", "gradient_checkpointing",
        "reentrant checkpoint (use_reentrant=True): with a frozen base no block input requires grad, so the LoRA "
        "weights of checkpointed blocks get no gradient (or the backward has nothing to differentiate)",
        "the seed report; transformers' use_reentrant=True default under PEFT ('None of the inputs have "
        "requires_grad=True. Gradients will be None': lm-sys/FastChat#581, locuslab/open-unlearning#178, worked "
        "around by enable_input_require_grads in huggingface/peft#404)")
def _gc_reentrant() -> list[Patch]:
    def run_checkpoint(layer, h, start_pos, freqs_cis, mask):
        return M.checkpoint(layer, h, start_pos, freqs_cis, mask, use_reentrant=True)
    return [(M, "run_block", _checkpointed_block(run_checkpoint))]


@mutant("gc_rng_not_preserved", "gradient_checkpointing",
        "preserve_rng_state=False: the recomputation draws new dropout masks, so gradients belong to another sample "
        "than the loss",
        "allenai/OLMo-core#828 (preserve_rng_state hard-coded False), allenai/OLMo#702; custom checkpoints without "
        "an RNG restore (openai/guided-diffusion#167)")
def _gc_rng_not_preserved() -> list[Patch]:
    def run_checkpoint(layer, h, start_pos, freqs_cis, mask):
        return M.checkpoint(layer, h, start_pos, freqs_cis, mask, use_reentrant=False, preserve_rng_state=False)
    return [(M, "run_block", _checkpointed_block(run_checkpoint))]


@mutant("gc_mask_not_passed", "gradient_checkpointing",
        "checkpointed blocks called without the attention mask (mask=None): causal attention becomes bidirectional "
        "exactly where checkpointing is on",
        "timm's checkpoint_seq(blocks, x) forwards only x: masks ignored under gradient checkpointing "
        "(lightly-ai/lightly#2049)")
def _gc_mask_not_passed() -> list[Patch]:
    def run_checkpoint(layer, h, start_pos, freqs_cis, mask):
        return M.checkpoint(lambda x: layer(x, start_pos, freqs_cis, None), h, use_reentrant=False)
    return [(M, "run_block", _checkpointed_block(run_checkpoint))]


@mutant("gc_flag_ignored", "gradient_checkpointing",
        "the policy is parsed and stored, but run_block never checkpoints: gradients right, memory not saved",
        "verl's enable_gradient_checkpointing had no effect on the FSDP critic (verl-project/verl#26, fixed in #27)")
def _gc_flag_ignored() -> list[Patch]:
    def run_block(layer, h, start_pos, freqs_cis, mask, checkpointed):
        return layer(h, start_pos, freqs_cis, mask)
    return [(M, "run_block", run_block)]


@mutant("gc_policy_not_stored", "gradient_checkpointing",
        "set_gradient_checkpointing accepts the policy but sets a flag the forward never reads: no block selected",
        "transformers models that advertised supports_gradient_checkpointing while their forward never checkpointed "
        "(huggingface/transformers#27073)")
def _gc_policy_not_stored() -> list[Patch]:
    def set_gradient_checkpointing(self, policy):
        M.checkpoint_policy_layers(policy, self.n_layers)  # still validated
        self.gradient_checkpointing = policy is not None and policy != "none"
    return [(M.Transformer, "set_gradient_checkpointing", set_gradient_checkpointing)]


@mutant("gc_only_in_training", "gradient_checkpointing",
        "checkpointing gated on the module's training flag: a model trained in eval mode is silently not checkpointed",
        "diffusers' `if self.training and self.gradient_checkpointing` (huggingface/diffusers#9850, fixed in #9878)")
def _gc_only_in_training() -> list[Patch]:
    def run_block(layer, h, start_pos, freqs_cis, mask, checkpointed):
        if checkpointed and torch.is_grad_enabled() and layer.training:
            return M.checkpoint(layer, h, start_pos, freqs_cis, mask, use_reentrant=False)
        return layer(h, start_pos, freqs_cis, mask)
    return [(M, "run_block", run_block)]


@mutant("gc_recompute_outside_autocast", "gradient_checkpointing",
        "a hand-rolled checkpoint recomputes in backward outside the forward's autocast: under bf16 autocast the "
        "gradients come from an fp32 recomputation",
        "Transformer Engine's te.checkpoint (NVIDIA/TransformerEngine#787, fixed in #791); Megatron-LM "
        "tensor_parallel.checkpoint's FP8 autocast state (NVIDIA/Megatron-LM#7538)")
def _gc_recompute_outside_autocast() -> list[Patch]:
    return [(M, "run_block", _checkpointed_block(_hand_rolled(lambda device_type, was_on: contextlib.nullcontext())))]


@mutant("gc_recompute_default_autocast_dtype", "gradient_checkpointing",
        "the recomputation re-enters autocast with the default half dtype (float16, torch.cuda.amp.autocast()'s) "
        "after a bfloat16 forward",
        "PyTorch's CheckpointFunction before pytorch/pytorch#71169; fairscale's checkpoint_activations "
        "(facebookresearch/fairscale#1199)")
def _gc_recompute_default_dtype() -> list[Patch]:
    def recompute_autocast(device_type, was_on):
        return torch.autocast(device_type, dtype=torch.float16, enabled=was_on)
    return [(M, "run_block", _checkpointed_block(_hand_rolled(recompute_autocast)))]


# Mutants of the other properties live beside this file; importing them registers them.
from . import mutants_grad_accum  # noqa: E402,F401
from . import mutants_precision  # noqa: E402,F401
