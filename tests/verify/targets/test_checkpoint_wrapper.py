"""Property 4 through torch's own ``CheckpointWrapper``, the mechanism torchtune's ``set_activation_checkpointing``
and Lightning use: wrapping a block renames every parameter below it (``layers.0._checkpoint_wrapped_module.…``)
and its recomputation runs the wrapped module, not the wrapper. The check keys gradients by parameter identity and
counts forwards inside the wrapper: the non-reentrant wrapper passes; the reentrant one under a frozen base with
LoRA loses the adapters' gradients and fails, naming them."""
from __future__ import annotations

import pytest
from torch.utils.checkpoint import checkpoint
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, CheckpointWrapper,
                                                                         checkpoint_wrapper)

from llama_ref.default import default_model
from verify.checks.gradient_checkpointing import check_gradient_checkpointing
from verify.oracles import policy_layers
from verify.targets.base import canonical_name, unwrapped
from verify.targets.llama_ref import LlamaRefTarget


class WrappingTarget(LlamaRefTarget):
    """llama_ref's model, checkpointed by wrapping the policy's blocks in torch's CheckpointWrapper."""

    impl = CheckpointImpl.NO_REENTRANT

    def set_checkpointing(self, model, policy, mode=None):
        for i, block in enumerate(model.layers):
            model.layers[i] = unwrapped(block)
        for i in policy_layers(policy, len(model.layers)) if policy else ():
            model.layers[i] = checkpoint_wrapper(model.layers[i], checkpoint_impl=self.impl)

    def checkpointed_blocks(self, model):
        return frozenset(i for i, b in enumerate(model.layers) if isinstance(b, CheckpointWrapper))


class ReentrantTarget(WrappingTarget):
    impl = CheckpointImpl.REENTRANT


@pytest.fixture(scope="module")
def model():
    return default_model()


def test_the_wrapper_renames_parameters_and_the_names_are_made_one(model):
    target = WrappingTarget(model)
    copy = target.fresh_model()
    target.set_checkpointing(copy, "all")
    names = [n for n, _ in copy.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in names)  # the premise: every block's names change
    assert {canonical_name(n) for n in names} == {n for n, _ in model.named_parameters()}


def test_torchs_non_reentrant_checkpoint_wrapper_passes(model):
    result = check_gradient_checkpointing(WrappingTarget(model))
    assert result.ok, str(result)


def test_torchs_reentrant_checkpoint_wrapper_loses_the_lora_gradients_of_a_frozen_base(model):
    result = check_gradient_checkpointing(ReentrantTarget(model), full_finetune=False)
    assert not result.ok
    lost = [d for d in result.details if "gradient is None" in d]
    assert lost and all("_checkpoint_wrapped_module" not in d for d in result.details), result.details[:3]
    assert any("lora_A" in d for d in lost), lost[:3]


class PatchingTarget(LlamaRefTarget):
    """Checkpointing by patching each chosen block's forward (``block.forward = checkpoint(original)``), as several
    forks and transformers 5 do: the recomputation calls the function, not the module."""

    def set_checkpointing(self, model, policy, mode=None):
        chosen = policy_layers(policy, len(model.layers)) if policy else ()
        for i, block in enumerate(model.layers):
            vars(block).pop("forward", None)
            if i in chosen:
                original = type(block).forward.__get__(block)
                block.forward = lambda *a, f=original: checkpoint(f, *a, use_reentrant=False)

    def checkpointed_blocks(self, model):
        return frozenset(i for i, b in enumerate(model.layers) if "forward" in vars(b))


def test_a_switch_that_patches_the_blocks_forward_is_counted_where_it_recomputes(model):
    # Counted on the block itself, each checkpointed block ran once ("checkpoint silently not applied"); its first
    # child is called again by the recomputation.
    result = check_gradient_checkpointing(PatchingTarget(model))
    assert result.ok, str(result)
