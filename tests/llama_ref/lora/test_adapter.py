"""llama_ref.lora.adapter, our format: adapter files round-trip (tensors, hyper-parameters, logits) and every bad
input is a clear error naming what is wrong. PEFT's format and merge_and_unload: test_adapter_peft.py."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from llama_ref.lora import adapter as lora_io
from llama_ref.lora import ALL_TARGETS, LoRALinear, apply_lora_to_llama, lora_layers
from llama_ref.lora.adapter import (ADAPTER_WEIGHTS, CONFIG_FILE, PEFT_WEIGHTS, AdapterError, AdapterSpec, adapter_spec,
                                    export_peft_adapter, import_peft_adapter, load_adapter, save_adapter)
from verify.tolerances import tolerance

from .adapter_models import (ARGS, base_model, edit_config, exact, logits_of, lora_model, lora_tensors, random_tokens,
                             randomize_lora)

_fp32 = tolerance(torch.float32)
assert_fp32_close = functools.partial(torch.testing.assert_close, rtol=_fp32.rtol, atol=_fp32.atol)


# ---- our format: round trip ------------------------------------------------------------------------------------

@given(r=st.integers(1, 8), alpha=st.sampled_from([1.0, 3.5, 16, 64.0]), rslora=st.booleans(),
       dropout=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16),
       targets=st.lists(st.sampled_from(ALL_TARGETS), min_size=1, max_size=len(ALL_TARGETS), unique=True))
def test_save_load_round_trip(r, alpha, rslora, dropout, seed, targets):
    src = lora_model(seed, r, alpha, targets, rslora, dropout)
    tokens = random_tokens(seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = save_adapter(src, Path(tmp) / "adapter")
        assert sorted(p.name for p in d.iterdir()) == sorted([CONFIG_FILE, ADAPTER_WEIGHTS])  # no temp file left
        on_disk = load_file(d / ADAPTER_WEIGHTS)
        config = json.loads((d / CONFIG_FILE).read_text())
        dst = load_adapter(base_model(seed), d)
    # Only the LoRA tensors, under Meta's module names, in the parameters' dtype.
    assert set(on_disk) == set(lora_tensors(src))
    assert len(on_disk) == 2 * ARGS.n_layers * len(targets)
    for key, t in on_disk.items():
        exact(t, src.state_dict()[key])
    assert config == {"format": "llama-verify-lora", "version": 1, "r": r, "lora_alpha": alpha,
                      "lora_dropout": dropout, "use_rslora": rslora,
                      "targets": [t for t in ALL_TARGETS if t in targets],
                      "base": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
                               "ffn_hidden_dim": 192}}
    # The fresh model got the same adapters, the same hyper-parameters and computes the same logits.
    assert adapter_spec(dst) == adapter_spec(src) == AdapterSpec(r, alpha, dropout, rslora, tuple(config["targets"]))
    assert set(lora_tensors(dst)) == set(lora_tensors(src))
    for key, t in lora_tensors(src).items():
        exact(lora_tensors(dst)[key], t)
    dst.eval()
    exact(logits_of(dst, tokens), logits_of(src, tokens))
    base_logits = logits_of(base_model(seed).eval(), tokens)
    assert (logits_of(dst, tokens) - base_logits).abs().max() > 1e-3  # the adapter did something


def test_load_into_merged_lora_model_replaces_the_update(tmp_path):
    targets = ("wq", "wk", "w2")
    src = lora_model(seed=1, r=4, alpha=8.0, targets=targets)
    d = save_adapter(src, tmp_path / "a")
    dst = randomize_lora(lora_model(seed=1, r=4, alpha=8.0, targets=targets), seed=99)  # same base, other adapter
    assert all(layer.merged for _, layer in lora_layers(dst))
    load_adapter(dst, d)
    assert all(layer.merged for _, layer in lora_layers(dst))  # a merged model stays merged…
    tokens = random_tokens(3)
    assert_fp32_close(logits_of(dst, tokens), logits_of(src, tokens))  # …with the new adapter (one unmerge/merge)
    dst.train()  # unmerged again: the base weights come back, not base + the old update
    base = base_model(1)
    for name, layer in lora_layers(dst):
        assert_fp32_close(layer.weight, base.get_submodule(name).weight, msg=f"{name}: not the base weight")


def test_load_keeps_the_parameters_dtype(tmp_path):
    d = save_adapter(lora_model(seed=0, targets=("wv",)), tmp_path / "a")  # fp32 tensors in the file
    bf16 = apply_lora_to_llama(base_model(0), 4, 12.0, 0.0, ("wv",), lora_dtype=torch.bfloat16)[0]
    load_adapter(bf16, d)
    assert {p.dtype for n, p in bf16.named_parameters() if "lora_" in n} == {torch.bfloat16}
    fresh = load_adapter(base_model(0), d, lora_dtype=torch.float64)
    assert {p.dtype for n, p in fresh.named_parameters() if "lora_" in n} == {torch.float64}
    assert all(p.requires_grad == ("lora_" in n) for n, p in fresh.named_parameters())


def test_strict_false_tolerates_missing_and_unexpected_keys(tmp_path):
    src = lora_model(seed=0, targets=("wq", "wv"))
    d = save_adapter(src, tmp_path / "a")
    tensors = load_file(d / ADAPTER_WEIGHTS)
    del tensors["layers.1.attention.wq.lora_B"]
    tensors["layers.0.attention.wo.lora_A"] = torch.zeros(4, 64)
    save_file(tensors, d / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match="missing key"):
        load_adapter(base_model(0), d)
    dst = load_adapter(base_model(0), d, strict=False)
    exact(dst.layers[0].attention.wq.lora_B, src.layers[0].attention.wq.lora_B)
    exact(dst.layers[1].attention.wq.lora_B, torch.zeros(64, 4))  # the missing one keeps its fresh (zero) value


def test_atomic_save_leaves_the_previous_adapter_on_failure(tmp_path, monkeypatch):
    d = save_adapter(lora_model(seed=0, targets=("wq",)), tmp_path / "a")
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("simulated rename failure")

    from llama_ref.formats import atomic
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(lora_model(seed=5, targets=("wq",)), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # untouched, no temp file left


# ---- our format: every bad input is a clear error --------------------------------------------------------------

def test_saving_without_lora_or_with_mixed_layers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(base_model(0), tmp_path / "a")
    mixed = lora_model(seed=0, r=4, targets=("wq",))
    mixed.layers[1].attention.wq = LoRALinear.from_linear(mixed.layers[1].attention.wq, r=8, lora_alpha=12.0)
    with pytest.raises(ValueError, match=r"r=8, .*layers\.1\.attention\.wq") as info:
        save_adapter(mixed, tmp_path / "a")
    assert "r=4, " in str(info.value) and "layers.0.attention.wq" in str(info.value)
    partial = lora_model(seed=0, targets=("wq", "w1"))
    partial.layers[1].feed_forward.w1 = nn.Linear(64, 192, bias=False)
    with pytest.raises(ValueError, match=r"no LoRA on layers\.1\.feed_forward\.w1"):
        save_adapter(partial, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.fixture
def saved(tmp_path) -> Path:
    """An adapter with r=4, alpha=12 on wq, wk (GQA: 32 rows) and w1, dropout 0.05."""
    return save_adapter(lora_model(seed=0, r=4, alpha=12.0, targets=("wq", "wk", "w1"), dropout=0.05),
                        tmp_path / "adapter")


@pytest.mark.parametrize("model_kwargs, message", [
    (dict(r=8), r"rank r: adapter 4, model 8"),
    (dict(alpha=16.0), r"lora_alpha: adapter 12.0, model 16.0"),
    (dict(rslora=True), r"use_rslora: adapter False, model True"),
    (dict(dropout=0.0), r"lora_dropout: adapter 0.05, model 0.0"),
    (dict(targets=("wq", "w1")), r"targets: adapter \('wq', 'wk', 'w1'\), model \('wq', 'w1'\)"),
])
def test_model_lora_layers_must_match(saved, model_kwargs, message):
    kwargs = dict(seed=0, r=4, alpha=12.0, targets=("wq", "wk", "w1"), dropout=0.05) | model_kwargs
    model = lora_model(**kwargs)
    before = lora_tensors(model)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, saved)
    for key, t in before.items():  # nothing was loaded
        exact(model.state_dict()[key], t)


@pytest.mark.parametrize("changes, message", [
    (dict(n_layers=3), r"another base model shape: n_layers: adapter 2, model 3"),
    (dict(dim=128, n_heads=8, n_kv_heads=4), r"dim: adapter 64, model 128; n_heads: adapter 4, model 8"),
    (dict(n_kv_heads=4), r"n_kv_heads: adapter 2, model 4"),
    (dict(vocab_size=300), r"vocab_size: adapter 512, model 300"),
    (dict(multiple_of=256), r"ffn_hidden_dim: adapter 192, model 256"),
])
def test_other_base_shape_names_the_field(saved, changes, message):
    model = base_model(0, ARGS.replace(**changes))
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, saved)
    assert adapter_spec(model) is None  # the model was not changed


def _rewrite(d: Path, edit) -> None:
    tensors = load_file(d / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, d / ADAPTER_WEIGHTS)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.1.attention.wk.lora_B"), r"1 missing key\(s\): 'layers.1.attention.wk.lora_B'"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("layers.1.")],
     r"6 missing key\(s\): 'layers.1.attention.wq.lora_A', .*'layers.1.feed_forward.w1.lora_B'"),
    (lambda t: t.update({"layers.0.attention.wo.lora_A": torch.zeros(4, 64)}),
     r"1 unexpected key\(s\): 'layers.0.attention.wo.lora_A'"),
    (lambda t: t.update({"layers.0.attention.wk.lora_B": torch.zeros(64, 4)}),
     r"'layers.0.attention.wk.lora_B': got \(64, 4\), expected \(32, 4\)"),
    (lambda t: t.update({"layers.1.feed_forward.w1.lora_A": torch.zeros(8, 64)}),
     r"'layers.1.feed_forward.w1.lora_A': got \(8, 64\), expected \(4, 64\)"),
    (lambda t: t.update({"layers.0.attention.wq.lora_A": torch.zeros(4, 64, dtype=torch.int32)}),
     r"non-floating tensor\(s\): 'layers.0.attention.wq.lora_A' \(torch.int32\)"),
])
def test_bad_tensors_are_named(saved, edit, message):
    _rewrite(saved, edit)
    model = base_model(0)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, saved)
    assert adapter_spec(model) is None


@pytest.mark.parametrize("changes, message", [
    (dict(format="something-else"), r"unknown format 'something-else', expected 'llama-verify-lora'"),
    (dict(version=2), r"unsupported llama-verify-lora version 2; this code reads version 1"),
    (dict(r=0), r"r must be a positive int, got 0"),
    (dict(lora_alpha=-1), r"lora_alpha must be a positive number, got -1"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(targets=["wq", "lm_head"]), r"targets \['wq', 'lm_head'\] are not"),
    (dict(base=None), r"no 'base' object"),
    (dict(r=8), r"'layers.0.attention.wq.lora_A': got \(4, 64\), expected \(8, 64\)"),  # config vs its tensors
])
def test_bad_config_is_named(saved, changes, message):
    edit_config(saved, **changes)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(base_model(0), saved)
    if "version" in changes or "format" in changes:
        assert str(saved / CONFIG_FILE) in str(info.value)


def test_missing_and_damaged_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such adapter directory"):
        load_adapter(base_model(0), tmp_path / "nowhere")
    (saved / ADAPTER_WEIGHTS).rename(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match=rf"{saved}: no {ADAPTER_WEIGHTS}"):
        load_adapter(base_model(0), saved)
    (tmp_path / "w").rename(saved / ADAPTER_WEIGHTS)
    (saved / CONFIG_FILE).rename(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=rf"{saved}: no {CONFIG_FILE}"):
        load_adapter(base_model(0), saved)
    (tmp_path / "c").write_text("{not json")
    (tmp_path / "c").rename(saved / CONFIG_FILE)
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE}: not valid JSON"):
        load_adapter(base_model(0), saved)
    config_text = json.dumps({"format": "llama-verify-lora", "version": 1, "r": 4, "lora_alpha": 12.0,
                                    "targets": ["wq", "wk", "w1"], "lora_dropout": 0.05,
                                    "base": {f: getattr(ARGS, f) for f in lora_io.BASE_FIELDS}})
    (saved / CONFIG_FILE).write_text(config_text)
    (saved / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match=rf"{ADAPTER_WEIGHTS}: not a readable safetensors file"):
        load_adapter(base_model(0), saved)


def test_the_two_formats_do_not_mix(saved, tmp_path):
    model = lora_model(seed=0, targets=("wq",))
    with pytest.raises(FileExistsError, match=rf"holds {ADAPTER_WEIGHTS}"):
        export_peft_adapter(model, saved)
    peft_dir = export_peft_adapter(model, tmp_path / "peft")
    with pytest.raises(FileExistsError, match=rf"holds {PEFT_WEIGHTS}"):
        save_adapter(model, peft_dir)
    with pytest.raises(AdapterError, match="use import_peft_adapter"):
        load_adapter(base_model(0), peft_dir)
    with pytest.raises(FileNotFoundError, match=rf"no {PEFT_WEIGHTS}"):
        import_peft_adapter(base_model(0), saved)
