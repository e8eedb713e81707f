"""Gradient checkpointing (DESIGN §3.4): the policies' block sets, the recompute counter, no_grad, the property with
hypothesis, and the realism of the bug zoo's checkpointing mutants."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import given, strategies as st

from llama_ref.default import default_model
from llama_ref.lora import ALL_TARGETS, apply_lora_to_llama, lora_layers
from llama_ref.model import Transformer, causal_mask, checkpoint_policy_layers, init_weights, run_block
from verify.checks.gradient_checkpointing import check_gradient_checkpointing, counting_forwards
from verify.oracles import policy_layers
from verify.mutants import MUTANTS, inject
from verify.strategies import model_args, seeds, token_batches


def _policies() -> st.SearchStrategy[str]:
    return st.sampled_from(["none", "all", "seed"]) | st.integers(1, 5).map(lambda k: f"every:{k}")


def _lora_model(n_layers: int = 2, seed: int = 0, dropout: float = 0.1) -> Transformer:
    """Frozen base + LoRA with non-zero B, so that lora_A's gradient is not identically zero."""
    model = default_model(seed, n_layers=n_layers)
    model.kv_caching = False
    torch.manual_seed(seed)
    apply_lora_to_llama(model, rank=4, alpha=8, dropout=dropout, targets=("wq", "wv", "w2"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


def _tokens(model: Transformer, bsz: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, model.vocab_size, (bsz, length), generator=torch.Generator().manual_seed(1))


# ---- the policies ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, expected", [
    (None, set()), ("none", set()), ("all", {0, 1, 2, 3, 4, 5, 6}),
    ("seed", {1, 2, 4, 5}),  # the seed report: block i when i % 3 != 0
    ("every:1", {0, 1, 2, 3, 4, 5, 6}), ("every:2", {0, 2, 4, 6}), ("every:3", {0, 3, 6}), ("every:10", {0}),
])
def test_each_policy_selects_its_blocks(policy, expected):
    assert checkpoint_policy_layers(policy, 7) == frozenset(expected)
    model = default_model(0, n_layers=7)
    model.set_gradient_checkpointing(policy)
    assert model.checkpointed_layers == frozenset(expected)


@given(policy=_policies(), n_layers=st.integers(0, 12))
def test_the_parser_agrees_with_the_checks_oracle(policy, n_layers):
    assert checkpoint_policy_layers(policy, n_layers) == policy_layers(policy, n_layers)


@pytest.mark.parametrize("bad", ["every:0", "every:", "every:-1", "every:x", "every:1.5", "every", "All", "",
                                 "sometimes", " all", "every: 2"])
def test_a_bad_policy_is_a_clear_error_naming_it(bad):
    message = re.escape(repr(bad))
    with pytest.raises(ValueError, match=message):
        checkpoint_policy_layers(bad, 4)
    with pytest.raises(ValueError, match=message):
        policy_layers(bad, 4)
    model = default_model(0)
    model.set_gradient_checkpointing("all")
    with pytest.raises(ValueError, match=message):
        model.set_gradient_checkpointing(bad)
    assert model.checkpointed_layers == frozenset({0, 1}), "a rejected policy must leave the previous one in place"
    with pytest.raises(ValueError, match=message):
        check_gradient_checkpointing(model, policies=["all", bad])


@pytest.mark.parametrize("bad", ["every:²", "every:١"])  # str.isdigit() accepts these; int() rejects or reads them
def test_the_oracle_takes_only_ascii_digits(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        policy_layers(bad, 4)


# ---- the recompute counter, no_grad, eval mode -------------------------------------------------------------------

def test_checkpointed_blocks_run_twice_per_forward_and_backward_others_once():
    model = default_model(0, n_layers=4)
    model.kv_caching = False
    model.set_gradient_checkpointing("seed")  # blocks 1 and 2
    with counting_forwards(model.layers) as forwards:
        logits = model(_tokens(model))
        assert forwards == [1, 1, 1, 1], "the forward itself runs every block once"
        logits.sum().backward()
    assert forwards == [1, 2, 2, 1], "backward recomputes exactly the checkpointed blocks"
    assert not any(block._forward_pre_hooks for block in model.layers)  # the counter's hooks are gone


def test_checkpointing_under_no_grad_does_nothing():
    model = default_model(0, n_layers=3)
    model.kv_caching = False
    tokens = _tokens(model)
    with torch.no_grad(), counting_forwards(model.layers) as forwards:
        plain = model(tokens)
        model.set_gradient_checkpointing("all")
        checkpointed = model(tokens)
    assert forwards == [2, 2, 2]  # one forward each, twice: nothing recomputed, nothing left to recompute
    assert not checkpointed.requires_grad
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), plain, rtol=0, atol=0)


def test_checkpointing_does_not_depend_on_the_module_mode():
    model = default_model(0).eval()
    model.kv_caching = False
    model.set_gradient_checkpointing("all")
    with counting_forwards(model.layers) as forwards:
        model(_tokens(model)).sum().backward()
    assert forwards == [2, 2]


# ---- the property ------------------------------------------------------------------------------------------------

def test_the_default_model_passes_with_the_defaults():
    result = check_gradient_checkpointing(default_model(0), seed=3)
    assert result.ok, result
    assert "LoRA" in result.case and "bfloat16 autocast" in result.case and "every:2" in result.case


@given(args=model_args(max_layers=4), seed=seeds(), data=st.data(), policy=_policies(), lora=st.booleans(),
       dropout=st.sampled_from([0.0, 0.1]), autocast=st.sampled_from([None, torch.bfloat16]),
       targets=st.sets(st.sampled_from(ALL_TARGETS), min_size=1))
def test_checkpointing_changes_no_gradient(args, seed, data, policy, lora, dropout, autocast, targets):
    model = init_weights(Transformer(args), seed)
    tokens = data.draw(token_batches(args, max_len=10))
    result = check_gradient_checkpointing(model, tokens, policies=[policy], lora=lora, lora_targets=sorted(targets),
                                          dropout=dropout, autocast_dtype=autocast, full_finetune=not lora,
                                          seed=seed)
    assert result.ok, result


def test_the_check_leaves_the_callers_model_and_rng_alone():
    model = default_model(0)
    model.set_gradient_checkpointing("every:2")
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    ran = []  # blocks of the caller's model that ran (the copies the check makes inherit this hook: skip them)
    handles = [b.register_forward_pre_hook(lambda mod, args, orig=b: ran.append(mod) if mod is orig else None)
               for b in model.layers]
    check_gradient_checkpointing(model)
    for h in handles:
        h.remove()
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.kv_caching and model.training and model.checkpointed_layers == frozenset({0})
    assert model.block_runner is run_block and not any(block._forward_pre_hooks for block in model.layers)
    assert ran == [] and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- the bug zoo's checkpointing mutants are real, and the check says where -------------------------------------

def test_reentrant_checkpoint_really_loses_the_lora_gradients_of_a_frozen_base():
    model = _lora_model(dropout=0.0)
    tokens = _tokens(model)
    h = model.tok_embeddings(tokens)  # frozen: no input of block 0 requires grad
    freqs, mask = model.rotary_freqs(0, tokens.shape[1], h.device), causal_mask(12, 12, h.device)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        out = torch.utils.checkpoint.checkpoint(model.layers[0], h, 0, freqs, mask, use_reentrant=True)
    assert not out.requires_grad  # so the LoRA weights of block 0 can never receive a gradient
    out = torch.utils.checkpoint.checkpoint(model.layers[0], h, 0, freqs, mask, use_reentrant=False)
    assert out.requires_grad

    # Through the whole model: block 0 checkpointed reentrantly, block 1 plain → a loss, but None on block 0.
    model.set_gradient_checkpointing("every:2")
    model.block_runner = MUTANTS["gc_reentrant_frozen_inputs"].components["block_runner"]
    with pytest.warns(UserWarning, match="None of the inputs"):
        model(tokens).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, g in grads.items() if g is None} == {n for n in grads if n.startswith("layers.0.")}
    model.zero_grad(set_to_none=True)
    model.block_runner = run_block  # the correct (non-reentrant) code
    model(tokens).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_check_names_policy_and_parameter_of_a_lost_gradient():
    with inject("gc_reentrant_frozen_inputs") as m:
        result = check_gradient_checkpointing(default_model(0), autocast_dtype=None, full_finetune=False,
                                              **m.components)
    assert not result.ok and result.error is not None  # policy=all: nothing left to differentiate at all
    assert any("float32 LoRA policy=every:2 gradient of layers.0.attention.wq.lora_A: gradient is None" in d
               for d in result.details), result
    assert any("None of the inputs have requires_grad=True" in d for d in result.details)


def test_a_silently_skipped_checkpoint_is_reported_as_such():
    with inject("gc_flag_ignored") as m:
        result = check_gradient_checkpointing(default_model(0), autocast_dtype=None, lora=False, **m.components)
    assert not result.ok and result.max_abs == 0.0  # gradients right: only the counter sees it
    assert any("checkpoint silently not applied" in d for d in result.details), result


@pytest.mark.parametrize("name, needs", [
    ("gc_rng_not_preserved", dict(dropout=0.0)),  # no randomness in the block: nothing to redraw
    ("gc_recompute_outside_autocast", dict(autocast_dtype=None)),  # fp32 only: autocast is never on
    ("gc_recompute_default_autocast_dtype", dict(autocast_dtype=None)),
    ("gc_only_in_training", dict(full_finetune=False)),  # only the eval-mode case trains a model in eval()
])
def test_each_case_of_the_check_is_needed_by_some_mutant(name, needs):
    model = default_model(0)
    with inject(name) as m:
        assert check_gradient_checkpointing(model, **needs, **m.components).ok, f"{name} is caught without its case"
        assert not check_gradient_checkpointing(model, **m.components).ok


def test_train_mode_only_checkpointing_is_a_note_where_the_target_does_not_declare_otherwise():
    # llama_ref declares that its checkpointing does not depend on the module mode, so there recomputing in train mode
    # only is a bug (gc_only_in_training, caught above); a target that declares nothing may do it by design
    # (transformers, many nanoGPT forks): a note, not a FAIL, and never silently.
    from verify.targets.llama_ref import LlamaRefTarget

    class Undeclared(LlamaRefTarget):
        checkpoints_in_eval = None

    with inject("gc_only_in_training") as m:
        target = Undeclared(default_model(0), **m.components)
        result = check_gradient_checkpointing(target, autocast_dtype=None, lora=False)
    assert result.ok, str(result)
    assert any("no block was recomputed in eval mode: the target checkpoints in train mode only" in d
               for d in result.details), result.details
