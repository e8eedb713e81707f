"""Property 3's check (verify.checks.lora_merge): merged equals unmerged on random models, targets and ranks, and the
caller's model is left as it was."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from llama_ref.default import default_model
from llama_ref.lora import ALL_TARGETS, lora_layers
from llama_ref.model import Transformer, init_weights
from verify.checks.lora_merge import check_lora_merge
from verify.strategies import model_args, seeds


@st.composite
def lora_cases(draw):
    args = draw(model_args(max_seq_len=24))
    targets = draw(st.lists(st.sampled_from(ALL_TARGETS), min_size=1, max_size=7, unique=True))
    rank = draw(st.integers(1, 8))
    alpha = draw(st.sampled_from([rank * 2.0, rank * 0.5, 7.0]).filter(lambda a: a != rank))
    return args, targets, rank, alpha, draw(st.booleans()), draw(st.sampled_from([torch.float32, torch.bfloat16]))


@given(case=lora_cases(), seed=seeds())
def test_merged_equals_unmerged(case, seed):
    args, targets, rank, alpha, rslora, dtype = case
    model = init_weights(Transformer(args), seed).to(dtype)
    result = check_lora_merge(model, targets=targets, rank=rank, alpha=alpha, use_rslora=rslora, dropout=0.1,
                              seed=seed)
    assert result.ok, str(result)


def test_check_covers_non_square_gqa_targets_and_leaves_the_model_untouched():
    model = default_model(0)  # n_kv_heads 2 < n_heads 4: wk and wv are (32, 64)
    assert model.layers[0].attention.wk.weight.shape == (32, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert check_lora_merge(model, targets=("wk", "wv", "w2"), seed=3).ok
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(True for _ in lora_layers(model))
