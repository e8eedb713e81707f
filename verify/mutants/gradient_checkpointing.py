"""The bug zoo of property 4 (gradient checkpointing): reentrant checkpoints, lost RNG state, dropped masks,
ignored flags and recomputations outside the forward's autocast."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

import llama_ref.model as M

from .base import Mutant, Patch, collector

PROP = "gradient_checkpointing"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)


def _checkpointed_block(run_checkpoint: Callable[..., torch.Tensor]) -> M.BlockRunner:
    """A block runner whose checkpointed branch is ``run_checkpoint(layer, h, start_pos, freqs_cis, mask)``."""
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


@mutant("gc_reentrant_frozen_inputs",
        "reentrant checkpoint (use_reentrant=True): with a frozen base no block input requires grad, so the LoRA "
        "weights of checkpointed blocks get no gradient (or the backward has nothing to differentiate)",
        "the seed report; transformers' use_reentrant=True default under PEFT ('None of the inputs have "
        "requires_grad=True. Gradients will be None': lm-sys/FastChat#581, locuslab/open-unlearning#178, worked "
        "around by enable_input_require_grads in huggingface/peft#404)", component="block_runner")
@_checkpointed_block
def _gc_reentrant(layer, h, start_pos, freqs_cis, mask):
    return M.checkpoint(layer, h, start_pos, freqs_cis, mask, use_reentrant=True)


@mutant("gc_rng_not_preserved",
        "preserve_rng_state=False: the recomputation draws new dropout masks, so gradients belong to another sample "
        "than the loss",
        "allenai/OLMo-core#828 (preserve_rng_state hard-coded False), allenai/OLMo#702; custom checkpoints without "
        "an RNG restore (openai/guided-diffusion#167)", component="block_runner")
@_checkpointed_block
def _gc_rng_not_preserved(layer, h, start_pos, freqs_cis, mask):
    return M.checkpoint(layer, h, start_pos, freqs_cis, mask, use_reentrant=False, preserve_rng_state=False)


@mutant("gc_mask_not_passed",
        "checkpointed blocks called without the attention mask (mask=None): causal attention becomes bidirectional "
        "exactly where checkpointing is on",
        "timm's checkpoint_seq(blocks, x) forwards only x: masks ignored under gradient checkpointing "
        "(lightly-ai/lightly#2049)", component="block_runner")
@_checkpointed_block
def _gc_mask_not_passed(layer, h, start_pos, freqs_cis, mask):
    return M.checkpoint(lambda x: layer(x, start_pos, freqs_cis, None), h, use_reentrant=False)


@mutant("gc_flag_ignored",
        "the policy is parsed and stored, but the block runner never checkpoints: gradients right, memory not saved",
        "verl's enable_gradient_checkpointing had no effect on the FSDP critic (verl-project/verl#26, fixed in #27)",
        component="block_runner")
def _gc_flag_ignored(layer, h, start_pos, freqs_cis, mask, checkpointed):
    return layer(h, start_pos, freqs_cis, mask)


@mutant("gc_policy_not_stored",
        "set_gradient_checkpointing accepts the policy but sets a flag the forward never reads: no block selected",
        "transformers models that advertised supports_gradient_checkpointing while their forward never checkpointed "
        "(huggingface/transformers#27073)")
def _gc_policy_not_stored() -> list[Patch]:
    def set_gradient_checkpointing(self, policy):
        M.checkpoint_policy_layers(policy, self.n_layers)  # still validated
        self.gradient_checkpointing = policy is not None and policy != "none"
    return [(M.Transformer, "set_gradient_checkpointing", set_gradient_checkpointing)]


@mutant("gc_only_in_training",
        "checkpointing gated on the module's training flag: a model trained in eval mode is silently not checkpointed",
        "diffusers' `if self.training and self.gradient_checkpointing` (huggingface/diffusers#9850, fixed in #9878)",
        component="block_runner")
def _gc_only_in_training(layer, h, start_pos, freqs_cis, mask, checkpointed):
    if checkpointed and torch.is_grad_enabled() and layer.training:
        return M.checkpoint(layer, h, start_pos, freqs_cis, mask, use_reentrant=False)
    return layer(h, start_pos, freqs_cis, mask)


@mutant("gc_recompute_outside_autocast",
        "a hand-rolled checkpoint recomputes in backward outside the forward's autocast: under bf16 autocast the "
        "gradients come from an fp32 recomputation",
        "Transformer Engine's te.checkpoint (NVIDIA/TransformerEngine#787, fixed in #791); Megatron-LM "
        "tensor_parallel.checkpoint's FP8 autocast state (NVIDIA/Megatron-LM#7538)", component="block_runner")
@_checkpointed_block
@_hand_rolled
def _gc_recompute_outside_autocast(device_type, was_on):
    return contextlib.nullcontext()


@mutant("gc_recompute_default_autocast_dtype",
        "the recomputation re-enters autocast with the default half dtype (float16, torch.cuda.amp.autocast()'s) "
        "after a bfloat16 forward",
        "PyTorch's CheckpointFunction before pytorch/pytorch#71169; fairscale's checkpoint_activations "
        "(facebookresearch/fairscale#1199)", component="block_runner")
@_checkpointed_block
@_hand_rolled
def _gc_recompute_default_dtype(device_type, was_on):
    return torch.autocast(device_type, dtype=torch.float16, enabled=was_on)


