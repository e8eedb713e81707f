# Over 350 lines: the tests of one module, llama_ref.lora.adapter, PEFT's format included.
"""llama_ref.lora.adapter: adapter files (ours and PEFT's) round-trip, fail loudly on mismatch, and agree with PEFT on
transformers; merge_and_unload gives a plain Transformer that is an ordinary Meta checkpoint."""
from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from llama_ref.lora import adapter as lora_io
from llama_ref.args import ModelArgs
from llama_ref.formats.meta import expected_shapes, load_model, save_checkpoint
from llama_ref.formats.hf import (hf_to_meta_key, hf_to_meta_module, meta_to_hf_key, meta_to_hf_module,
                                 permute_rotary, rotary_heads, unpermute_rotary)
from llama_ref.lora import ALL_TARGETS, LoRALinear, apply_lora_to_llama, lora_layers, merge_and_unload
from llama_ref.lora.adapter import (ADAPTER_WEIGHTS, CONFIG_FILE, PEFT_WEIGHTS, AdapterError, AdapterSpec, adapter_spec,
                               export_peft_adapter, import_peft_adapter, load_adapter, save_adapter)
from llama_ref.model import Transformer, init_weights
from verify.oracle_hf import build_hf_model, hf_logits
from verify.tolerances import CALIBRATION_FACTORS, implementation_tolerance, tolerance

ARGS = ModelArgs.preset("tiny", kv_caching=False, max_seq_len=32)  # GQA: n_heads 4, n_kv_heads 2; FFN 64 → 192
exact = functools.partial(torch.testing.assert_close, rtol=0.0, atol=0.0)
# Ours vs transformers + PEFT: two implementations (RoPE, attention, LoRA branch) in fp32; the oracle's bound.
assert_peft_close = functools.partial(torch.testing.assert_close, **implementation_tolerance("peft_logits")._asdict())
_fp32 = tolerance(torch.float32)
assert_fp32_close = functools.partial(torch.testing.assert_close, rtol=_fp32.rtol, atol=_fp32.atol)
_PEFT_OBSERVED = {"max_abs": 0.0}
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
            "w3": "up_proj"}
# peft 0.21 on transformers 5.x calls a renamed transformers method; nothing to do with us.
quiet_peft = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _base(seed: int = 0, args: ModelArgs = ARGS) -> Transformer:
    return init_weights(Transformer(args), seed)


# |ΔW| = scaling·|B·A| ~ 0.6·|W| at r=4, alpha=12: a large but not dominating update. Much larger updates blow up
# the residual stream, and with it every rounding error, without testing anything more.
B_STD = 0.1


@torch.no_grad()
def _randomize_lora(model: Transformer, seed: int) -> Transformer:
    """Seeded non-zero A and B (B starts at zero); unmerged while they change, so a merged weight stays right."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        was_merged = layer.merged
        layer.unmerge()
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * layer.in_features ** -0.5)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * B_STD)
        if was_merged:
            layer.merge()
    return model


def _lora_model(seed: int = 0, r: int = 4, alpha: float = 12.0, targets=ALL_TARGETS, rslora: bool = False,
                dropout: float = 0.0, args: ModelArgs = ARGS, **kwargs) -> Transformer:
    model, _ = apply_lora_to_llama(_base(seed, args), r, alpha, dropout, targets, use_rslora=rslora, **kwargs)
    return _randomize_lora(model, seed + 1000).eval()


def _tokens(seed: int = 0, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)


def _lora_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / CONFIG_FILE).read_text())
    config.update(changes)
    (d / CONFIG_FILE).write_text(json.dumps(config))


# ---- hf_format -------------------------------------------------------------------------------------------------

def test_key_and_module_maps_invert_each_other():
    for key in expected_shapes(ARGS):
        assert hf_to_meta_key(meta_to_hf_key(key)) == key
    assert meta_to_hf_key("layers.3.attention.wq.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert meta_to_hf_module("layers.1.feed_forward.w1") == "model.layers.1.mlp.gate_proj"
    assert hf_to_meta_module("model.layers.1.mlp.down_proj") == "layers.1.feed_forward.w2"
    with pytest.raises(ValueError, match="'layers.0.attention.wz.weight'"):
        meta_to_hf_key("layers.0.attention.wz.weight")
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.z_proj'"):
        hf_to_meta_module("model.layers.0.self_attn.z_proj")


def test_rotary_heads_only_for_wq_and_wk():
    assert rotary_heads("layers.0.attention.wq.lora_B", ARGS) == ARGS.n_heads
    assert rotary_heads("layers.5.attention.wk.weight", ARGS) == ARGS.n_kv_heads == 2
    assert [rotary_heads(f"layers.0.attention.{t}", ARGS) for t in ("wv", "wo")] == [None, None]
    assert rotary_heads("layers.0.feed_forward.w1", ARGS) is None


def test_permuting_b_permutes_the_update_by_rows():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(32, 3, generator=g), torch.randn(3, 64, generator=g)
    exact(permute_rotary(b, 2) @ a, permute_rotary(b @ a, 2))
    exact(unpermute_rotary(permute_rotary(b, 2), 2), b)


# ---- our format: round trip ------------------------------------------------------------------------------------

@given(r=st.integers(1, 8), alpha=st.sampled_from([1.0, 3.5, 16, 64.0]), rslora=st.booleans(),
       dropout=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16),
       targets=st.lists(st.sampled_from(ALL_TARGETS), min_size=1, max_size=len(ALL_TARGETS), unique=True))
def test_save_load_round_trip(r, alpha, rslora, dropout, seed, targets):
    src = _lora_model(seed, r, alpha, targets, rslora, dropout)
    tokens = _tokens(seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = save_adapter(src, Path(tmp) / "adapter")
        assert sorted(p.name for p in d.iterdir()) == sorted([CONFIG_FILE, ADAPTER_WEIGHTS])  # no temp file left
        on_disk = load_file(d / ADAPTER_WEIGHTS)
        config = json.loads((d / CONFIG_FILE).read_text())
        dst = load_adapter(_base(seed), d)
    # Only the LoRA tensors, under Meta's module names, in the parameters' dtype.
    assert set(on_disk) == set(_lora_tensors(src))
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
    assert set(_lora_tensors(dst)) == set(_lora_tensors(src))
    for key, t in _lora_tensors(src).items():
        exact(_lora_tensors(dst)[key], t)
    dst.eval()
    exact(_logits(dst, tokens), _logits(src, tokens))
    base_logits = _logits(_base(seed).eval(), tokens)
    assert (_logits(dst, tokens) - base_logits).abs().max() > 1e-3  # the adapter did something


def test_load_into_merged_lora_model_replaces_the_update(tmp_path):
    targets = ("wq", "wk", "w2")
    src = _lora_model(seed=1, r=4, alpha=8.0, targets=targets)
    d = save_adapter(src, tmp_path / "a")
    dst = _randomize_lora(_lora_model(seed=1, r=4, alpha=8.0, targets=targets), seed=99)  # same base, other adapter
    assert all(layer.merged for _, layer in lora_layers(dst))
    load_adapter(dst, d)
    assert all(layer.merged for _, layer in lora_layers(dst))  # a merged model stays merged…
    tokens = _tokens(3)
    assert_fp32_close(_logits(dst, tokens), _logits(src, tokens))  # …with the new adapter (one unmerge/merge)
    dst.train()  # unmerged again: the base weights come back, not base + the old update
    base = _base(1)
    for name, layer in lora_layers(dst):
        assert_fp32_close(layer.weight, base.get_submodule(name).weight, msg=f"{name}: not the base weight")


def test_load_keeps_the_parameters_dtype(tmp_path):
    d = save_adapter(_lora_model(seed=0, targets=("wv",)), tmp_path / "a")  # fp32 tensors in the file
    bf16 = apply_lora_to_llama(_base(0), 4, 12.0, 0.0, ("wv",), lora_dtype=torch.bfloat16)[0]
    load_adapter(bf16, d)
    assert {p.dtype for n, p in bf16.named_parameters() if "lora_" in n} == {torch.bfloat16}
    fresh = load_adapter(_base(0), d, lora_dtype=torch.float64)
    assert {p.dtype for n, p in fresh.named_parameters() if "lora_" in n} == {torch.float64}
    assert all(p.requires_grad == ("lora_" in n) for n, p in fresh.named_parameters())


def test_strict_false_tolerates_missing_and_unexpected_keys(tmp_path):
    src = _lora_model(seed=0, targets=("wq", "wv"))
    d = save_adapter(src, tmp_path / "a")
    tensors = load_file(d / ADAPTER_WEIGHTS)
    del tensors["layers.1.attention.wq.lora_B"]
    tensors["layers.0.attention.wo.lora_A"] = torch.zeros(4, 64)
    save_file(tensors, d / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match="missing key"):
        load_adapter(_base(0), d)
    dst = load_adapter(_base(0), d, strict=False)
    exact(dst.layers[0].attention.wq.lora_B, src.layers[0].attention.wq.lora_B)
    exact(dst.layers[1].attention.wq.lora_B, torch.zeros(64, 4))  # the missing one keeps its fresh (zero) value


def test_atomic_save_leaves_the_previous_adapter_on_failure(tmp_path, monkeypatch):
    d = save_adapter(_lora_model(seed=0, targets=("wq",)), tmp_path / "a")
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("simulated rename failure")

    from llama_ref.formats import atomic
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(_lora_model(seed=5, targets=("wq",)), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # untouched, no temp file left


# ---- our format: every bad input is a clear error --------------------------------------------------------------

def test_saving_without_lora_or_with_mixed_layers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(_base(0), tmp_path / "a")
    mixed = _lora_model(seed=0, r=4, targets=("wq",))
    mixed.layers[1].attention.wq = LoRALinear.from_linear(mixed.layers[1].attention.wq, r=8, lora_alpha=12.0)
    with pytest.raises(ValueError, match=r"r=8, .*layers\.1\.attention\.wq") as info:
        save_adapter(mixed, tmp_path / "a")
    assert "r=4, " in str(info.value) and "layers.0.attention.wq" in str(info.value)
    partial = _lora_model(seed=0, targets=("wq", "w1"))
    partial.layers[1].feed_forward.w1 = nn.Linear(64, 192, bias=False)
    with pytest.raises(ValueError, match=r"no LoRA on layers\.1\.feed_forward\.w1"):
        save_adapter(partial, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.fixture
def saved(tmp_path) -> Path:
    """An adapter with r=4, alpha=12 on wq, wk (GQA: 32 rows) and w1, dropout 0.05."""
    return save_adapter(_lora_model(seed=0, r=4, alpha=12.0, targets=("wq", "wk", "w1"), dropout=0.05),
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
    model = _lora_model(**kwargs)
    before = _lora_tensors(model)
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
    model = _base(0, ARGS.replace(**changes))
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
    model = _base(0)
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
    _edit_config(saved, **changes)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(_base(0), saved)
    if "version" in changes or "format" in changes:
        assert str(saved / CONFIG_FILE) in str(info.value)


def test_missing_and_damaged_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such adapter directory"):
        load_adapter(_base(0), tmp_path / "nowhere")
    (saved / ADAPTER_WEIGHTS).rename(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match=rf"{saved}: no {ADAPTER_WEIGHTS}"):
        load_adapter(_base(0), saved)
    (tmp_path / "w").rename(saved / ADAPTER_WEIGHTS)
    (saved / CONFIG_FILE).rename(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=rf"{saved}: no {CONFIG_FILE}"):
        load_adapter(_base(0), saved)
    (tmp_path / "c").write_text("{not json")
    (tmp_path / "c").rename(saved / CONFIG_FILE)
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE}: not valid JSON"):
        load_adapter(_base(0), saved)
    config_text = json.dumps({"format": "llama-verify-lora", "version": 1, "r": 4, "lora_alpha": 12.0,
                                    "targets": ["wq", "wk", "w1"], "lora_dropout": 0.05,
                                    "base": {f: getattr(ARGS, f) for f in lora_io.BASE_FIELDS}})
    (saved / CONFIG_FILE).write_text(config_text)
    (saved / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match=rf"{ADAPTER_WEIGHTS}: not a readable safetensors file"):
        load_adapter(_base(0), saved)


def test_the_two_formats_do_not_mix(saved, tmp_path):
    model = _lora_model(seed=0, targets=("wq",))
    with pytest.raises(FileExistsError, match=rf"holds {ADAPTER_WEIGHTS}"):
        export_peft_adapter(model, saved)
    peft_dir = export_peft_adapter(model, tmp_path / "peft")
    with pytest.raises(FileExistsError, match=rf"holds {PEFT_WEIGHTS}"):
        save_adapter(model, peft_dir)
    with pytest.raises(AdapterError, match="use import_peft_adapter"):
        load_adapter(_base(0), peft_dir)
    with pytest.raises(FileNotFoundError, match=rf"no {PEFT_WEIGHTS}"):
        import_peft_adapter(_base(0), saved)


# ---- PEFT's format: parity with PEFT on transformers -----------------------------------------------------------

def _peft_logits(base: Transformer, peft_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, PeftModel]:
    peft_model = PeftModel.from_pretrained(build_hf_model(base), peft_dir)
    assert not peft_model.training
    return hf_logits(peft_model, tokens), peft_model


@quiet_peft
@pytest.mark.parametrize("targets, r, alpha, rslora, dropout", [
    (ALL_TARGETS, 4, 12.0, False, 0.0),
    (("wq", "wk", "w3"), 3, 5.0, True, 0.1),  # dropout in the config, inactive in eval on both sides
    (("wk", "wv"), 2, 2.0, False, 0.0),  # the non-square GQA projections
])
def test_peft_on_transformers_gives_our_logits(tmp_path, targets, r, alpha, rslora, dropout):
    model = _lora_model(seed=3, r=r, alpha=alpha, targets=targets, rslora=rslora, dropout=dropout)
    base = _base(3).eval()  # the HF base holds the BASE weights, not merged ones
    d = export_peft_adapter(model, tmp_path / "peft")
    config = json.loads((d / CONFIG_FILE).read_text())
    assert config["target_modules"] == [HF_NAMES[t] for t in targets]
    tensors = load_file(d / PEFT_WEIGHTS)
    assert len(tensors) == 2 * ARGS.n_layers * len(targets)
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    tokens = _tokens(4)
    theirs, peft_model = _peft_logits(base, d, tokens)
    assert peft_model.peft_config["default"].lora_dropout == dropout
    assert peft_model.peft_config["default"].use_rslora == rslora
    ours = _logits(model, tokens)
    assert_peft_close(ours, theirs)
    _PEFT_OBSERVED["max_abs"] = max(_PEFT_OBSERVED["max_abs"], (ours - theirs).abs().max().item())
    assert (ours - _logits(base, tokens)).abs().max() > 0.1  # the adapters matter: the comparison has teeth
    print(f"\nPEFT parity {targets}: max |ours - peft| = {(ours - theirs).abs().max().item():.3g} "
          f"(worst so far {_PEFT_OBSERVED['max_abs']:.3g})")


@quiet_peft
@pytest.mark.parametrize("targets", [("wq",), ("wk",)])
def test_peft_export_without_the_b_permutation_is_caught(tmp_path, targets):
    model = _lora_model(seed=3, targets=targets)
    lora_io._write_peft(model, tmp_path / "peft", permute_rows=False)
    tokens = _tokens(4)
    theirs, _ = _peft_logits(_base(3).eval(), tmp_path / "peft", tokens)
    assert (_logits(model, tokens) - theirs).abs().max() > 1e-2


@quiet_peft
def test_export_then_import_round_trips(tmp_path):
    src = _lora_model(seed=5, r=4, alpha=6.0, targets=("wq", "wk", "wo", "w2"), dropout=0.1, rslora=True)
    d = export_peft_adapter(src, tmp_path / "peft")
    dst = import_peft_adapter(_base(5), d)
    assert adapter_spec(dst) == adapter_spec(src)
    for key, t in _lora_tensors(src).items():
        exact(_lora_tensors(dst)[key], t)
    tokens = _tokens(6)
    exact(_logits(dst.eval(), tokens), _logits(src, tokens))


@quiet_peft
def test_import_of_an_adapter_peft_saved_itself(tmp_path):
    base = _base(7).eval()
    hf = build_hf_model(base)
    config = LoraConfig(r=4, lora_alpha=10, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "up_proj"],
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, config)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    tokens = _tokens(9)
    theirs = hf_logits(peft_model, tokens)
    ours_model = import_peft_adapter(_base(7), tmp_path / "peft").eval()
    assert adapter_spec(ours_model) == AdapterSpec(4, 10, 0.0, False, ("wq", "wk", "w3"))
    ours = _logits(ours_model, tokens)
    assert_peft_close(ours, theirs)
    assert (ours - _logits(base, tokens)).abs().max() > 0.1


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), r"peft_type 'IA3', expected 'LORA'"),
    (dict(use_dora=True), r"PEFT option\(s\) \['use_dora=True'\]"),
    (dict(rank_pattern={"q_proj": 8}), r"rank_pattern=\{'q_proj': 8\}"),
    (dict(bias="all"), r"bias='all'"),
    (dict(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\] are not LoRA targets"),
    (dict(target_modules=".*q_proj"), r"is not a list of module names"),
])
def test_unsupported_peft_adapters_are_named(tmp_path, changes, message):
    d = export_peft_adapter(_lora_model(seed=0, targets=("wq",)), tmp_path / "peft")
    _edit_config(d, **changes)
    with pytest.raises(AdapterError, match=message):
        import_peft_adapter(_base(0), d)


def test_peft_import_checks_shapes_after_unpermuting(tmp_path):
    d = export_peft_adapter(_lora_model(seed=0, targets=("wk",)), tmp_path / "peft")
    tensors = load_file(d / PEFT_WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    tensors[key] = torch.zeros(30, 4)  # 30 rows: not 2 heads of an even head_dim
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, d / PEFT_WEIGHTS)
    with pytest.raises(AdapterError, match=r"'layers.0.attention.wk.lora_B': got \(30, 4\), expected \(32, 4\)") as e:
        import_peft_adapter(_base(0), d)
    assert "'output.lora_A'" in str(e.value)


# ---- merge_and_unload: a plain Transformer, an ordinary Meta checkpoint -----------------------------------------

def test_merge_and_unload_is_a_plain_checkpoint(tmp_path):
    lora = _lora_model(seed=11, r=4, alpha=12.0, targets=ALL_TARGETS, merge_weights=False)
    tokens = _tokens(12)
    unmerged = _logits(lora, tokens)
    assert not any(layer.merged for _, layer in lora_layers(lora))
    plain = merge_and_unload(copy.deepcopy(lora))
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(expected_shapes(ARGS))
    merged = _logits(plain.eval(), tokens)
    # Calibrated (DESIGN §4): merging rounds W + ΔW once more, so merged may be at most the table's factor further
    # from a float64 unmerged reference than unmerged fp32 is (2-norm over all logits).
    reference = _logits(copy.deepcopy(lora).double(), tokens)
    merged_err, unmerged_err = (merged.double() - reference).norm(), (unmerged.double() - reference).norm()
    assert merged_err <= CALIBRATION_FACTORS["lora_merge"] * unmerged_err, (merged_err, unmerged_err)
    assert (merged - _logits(_base(11).eval(), tokens)).abs().max() > 0.1
    ckpt = save_checkpoint(plain, tmp_path / "ckpt")
    loaded = load_model(ckpt, kv_caching=False, max_seq_len=32).eval()
    assert type(loaded) is Transformer and not any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert loaded.state_dict().keys() == plain.state_dict().keys()
    for key, t in plain.state_dict().items():
        exact(loaded.state_dict()[key], t)
    exact(_logits(loaded, tokens), merged)
