"""llama_ref.lora.layer and .apply (DESIGN §3.3): loralib semantics, the seed's parameter counts, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from llama_ref.args import ModelArgs
from llama_ref.default import default_model
from llama_ref.lora import (ALL_TARGETS, LoRALinear, apply_lora_to_llama, count_parameters, lora_layers,
                            mark_only_lora_as_trainable, merge_lora, unmerge_lora)
from llama_ref.model import Transformer
from verify.strategies import seeds


def test_seed_report_counts_for_llama32_1b_r16_on_wq_wv():
    with torch.device("meta"):
        model = Transformer(ModelArgs.preset("llama-3.2-1b"))
    _, (trainable, total, percent) = apply_lora_to_llama(model, rank=16, alpha=32, dropout=0.05)
    assert (trainable, total) == (1_703_936, 1_500_186_624)
    assert round(percent, 4) == 0.1136


def test_lora_reuses_the_base_weight_tensors():
    model = default_model(0)
    before = {(i, t): getattr(b.attention, t).weight for i, b in enumerate(model.layers) for t in ("wq", "wv")}
    apply_lora_to_llama(model, rank=4, alpha=8, dropout=0.0)
    for (i, t), w in before.items():
        layer = getattr(model.layers[i].attention, t)
        assert isinstance(layer, LoRALinear) and layer.weight is w and not w.requires_grad


def test_fresh_layer_has_kaiming_uniform_a_and_zero_b():
    layer = LoRALinear(256, 48, r=8, lora_alpha=16)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=√5) on fan_in 256
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform(-b, b)


@given(seed=seeds(), r=st.integers(1, 6), alpha=st.sampled_from([1.0, 3.0, 16.0]), rslora=st.booleans(),
       shape=st.sampled_from([(8, 8), (8, 4), (4, 12)]))
def test_forward_is_the_loralib_formula(seed, r, alpha, rslora, shape):
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(*shape, r=r, lora_alpha=alpha, use_rslora=rslora, merge_weights=False).double()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    x = torch.randn(3, shape[0], generator=g, dtype=torch.float64)
    scaling = alpha / (math.sqrt(r) if rslora else r)
    expected = x @ layer.weight.T + scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    layer.eval()  # merge_weights=False: stays unmerged
    torch.testing.assert_close(layer(x), expected)


def test_dropout_touches_only_the_lora_branch():
    layer = LoRALinear(16, 16, r=4, lora_alpha=4, lora_dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16)
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, F.linear(x, layer.weight) + (dropped @ layer.lora_A.T) @ layer.lora_B.T)


def test_eval_merges_once_and_train_unmerges():
    layer = LoRALinear(8, 8, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = layer.weight.clone()
    layer.eval()
    merged = layer.weight.clone()
    assert layer.merged and not torch.equal(merged, w0)
    layer.eval()
    layer.merge()
    assert torch.equal(layer.weight, merged)  # merging twice is a no-op
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0)


def test_merge_writes_back_in_the_weight_dtype_with_fp32_adapters():
    layer = LoRALinear.from_linear(torch.nn.Linear(8, 8, bias=False).bfloat16(), r=2, lora_alpha=4,
                                   lora_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = (layer.weight.double() + 2.0 * layer.lora_B.double() @ layer.lora_A.double()).bfloat16()
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight, expected, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_a_float64_layer_merges_and_unmerges_in_float64():
    # Accumulating "in fp32" must not mean rounding a float64 layer to fp32: the float64 reference the checks build
    # by converting a model would merge with fp32's error (measured 2e-7 off with .float(), 4.6e-15 allowed here).
    layer = LoRALinear.from_linear(torch.nn.Linear(16, 12, bias=False).double(), r=2, lora_alpha=7)
    with torch.no_grad():
        layer.lora_B.normal_()
    w = layer.weight.detach().clone()
    expected = w + 3.5 * layer.lora_B.detach() @ layer.lora_A.detach()
    scale = float((w.abs() + 3.5 * layer.lora_B.detach().abs() @ layer.lora_A.detach().abs()).max())
    atol = 8 * torch.finfo(torch.float64).eps * scale  # a few roundings of the largest term
    layer.merge()
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=atol)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w, rtol=0, atol=atol)


def test_only_lora_parameters_train_and_all_of_them_do():
    model, (trainable, total, _) = apply_lora_to_llama(default_model(0), rank=4, alpha=8, dropout=0.0,
                                                       targets=ALL_TARGETS)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    assert len(names) == 2 * 7 * model.params.n_layers
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_parameters(model) == (trainable, total, 100 * trainable / total)


def test_merge_and_unmerge_helpers_visit_every_layer():
    model, _ = apply_lora_to_llama(default_model(0), rank=2, alpha=4, dropout=0.0, merge_weights=False)
    merge_lora(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    unmerge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_mark_only_lora_as_trainable_freezes_everything_else():
    model = default_model(0)
    mark_only_lora_as_trainable(model)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "LoRA rank r must be a positive int, got 0"),
    (dict(rank=-2), "LoRA rank r must be a positive int, got -2"),
    (dict(alpha=0), "LoRA alpha must be a positive number, got 0"),
    (dict(alpha=-1.0), "LoRA alpha must be a positive number, got -1.0"),
    (dict(dropout=1.0), r"LoRA dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"LoRA dropout must be in \[0, 1\), got -0.1"),
    (dict(targets=("wq", "q_proj")), r"unknown LoRA target\(s\) \['q_proj'\]"),
    (dict(targets=()), r"unknown LoRA target\(s\) \(\)"),
])
def test_bad_lora_arguments_are_clear_errors(kwargs, message):
    model = default_model(0)
    with pytest.raises(ValueError, match=message):
        apply_lora_to_llama(model, **{"rank": 4, "alpha": 8, "dropout": 0.0, **kwargs})
    assert not any(True for _ in lora_layers(model))  # nothing replaced before the error


def test_applying_lora_twice_is_an_error():
    model, _ = apply_lora_to_llama(default_model(0), rank=2, alpha=4, dropout=0.0)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora_to_llama(model, rank=2, alpha=4, dropout=0.0)
