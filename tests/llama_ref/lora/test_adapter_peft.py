"""llama_ref.lora.adapter, PEFT's format: Meta's names and rotary rows mapped to transformers', our adapters loaded by
PEFT on transformers give our logits, PEFT's own adapters import, unsupported ones are named; merge_and_unload gives a
plain Transformer that is an ordinary Meta checkpoint. Our own format: test_adapter.py."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from llama_ref.formats.hf import (hf_to_meta_key, hf_to_meta_module, meta_to_hf_key, meta_to_hf_module,
                                  permute_rotary, rotary_heads, unpermute_rotary)
from llama_ref.formats.meta import expected_shapes, load_model, save_checkpoint
from llama_ref.lora import ALL_TARGETS, LoRALinear, lora_layers, merge_and_unload
from llama_ref.lora import adapter as lora_io
from llama_ref.lora.adapter import (CONFIG_FILE, PEFT_WEIGHTS, AdapterError, AdapterSpec, adapter_spec,
                                    export_peft_adapter, import_peft_adapter)
from llama_ref.model import Transformer
from verify.oracle_hf import build_hf_model, hf_logits
from verify.tolerances import CALIBRATION_FACTORS, implementation_tolerance

from .adapter_models import (ARGS, base_model, edit_config, exact, logits_of, lora_model, lora_tensors,
                             random_tokens, vocab_adapted)

# Ours vs transformers + PEFT: two implementations (RoPE, attention, LoRA branch) in fp32; the oracle's bound.
assert_peft_close = functools.partial(torch.testing.assert_close, **implementation_tolerance("peft_logits")._asdict())
_PEFT_OBSERVED = {"max_abs": 0.0}
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
            "w3": "up_proj"}
# peft 0.21 on transformers 5.x calls a renamed transformers method; nothing to do with us.
quiet_peft = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


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
    model = lora_model(seed=3, r=r, alpha=alpha, targets=targets, rslora=rslora, dropout=dropout)
    base = base_model(3).eval()  # the HF base holds the BASE weights, not merged ones
    d = export_peft_adapter(model, tmp_path / "peft")
    config = json.loads((d / CONFIG_FILE).read_text())
    assert config["target_modules"] == [HF_NAMES[t] for t in targets]
    tensors = load_file(d / PEFT_WEIGHTS)
    assert len(tensors) == 2 * ARGS.n_layers * len(targets)
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    tokens = random_tokens(4)
    theirs, peft_model = _peft_logits(base, d, tokens)
    assert peft_model.peft_config["default"].lora_dropout == dropout
    assert peft_model.peft_config["default"].use_rslora == rslora
    ours = logits_of(model, tokens)
    assert_peft_close(ours, theirs)
    _PEFT_OBSERVED["max_abs"] = max(_PEFT_OBSERVED["max_abs"], (ours - theirs).abs().max().item())
    assert (ours - logits_of(base, tokens)).abs().max() > 0.1  # the adapters matter: the comparison has teeth
    print(f"\nPEFT parity {targets}: max |ours - peft| = {(ours - theirs).abs().max().item():.3g} "
          f"(worst so far {_PEFT_OBSERVED['max_abs']:.3g})")


@quiet_peft
@pytest.mark.parametrize("targets", [("wq",), ("wk",)])
def test_peft_export_without_the_b_permutation_is_caught(tmp_path, targets):
    model = lora_model(seed=3, targets=targets)
    lora_io._write_peft(model, tmp_path / "peft", permute_rows=False)
    tokens = random_tokens(4)
    theirs, _ = _peft_logits(base_model(3).eval(), tmp_path / "peft", tokens)
    assert (logits_of(model, tokens) - theirs).abs().max() > 1e-2


@quiet_peft
def test_export_then_import_round_trips(tmp_path):
    src = lora_model(seed=5, r=4, alpha=6.0, targets=("wq", "wk", "wo", "w2"), dropout=0.1, rslora=True)
    d = export_peft_adapter(src, tmp_path / "peft")
    dst = import_peft_adapter(base_model(5), d)
    assert adapter_spec(dst) == adapter_spec(src)
    for key, t in lora_tensors(src).items():
        exact(lora_tensors(dst)[key], t)
    tokens = random_tokens(6)
    exact(logits_of(dst.eval(), tokens), logits_of(src, tokens))


@quiet_peft
def test_import_of_an_adapter_peft_saved_itself(tmp_path):
    base = base_model(7).eval()
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
    tokens = random_tokens(9)
    theirs = hf_logits(peft_model, tokens)
    ours_model = import_peft_adapter(base_model(7), tmp_path / "peft").eval()
    assert adapter_spec(ours_model) == AdapterSpec(4, 10, 0.0, False, ("wq", "wk", "w3"))
    ours = logits_of(ours_model, tokens)
    assert_peft_close(ours, theirs)
    assert (ours - logits_of(base, tokens)).abs().max() > 0.1


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), r"peft_type 'IA3', expected 'LORA'"),
    (dict(use_dora=True), r"PEFT option\(s\) \['use_dora=True'\]"),
    (dict(rank_pattern={"q_proj": 8}), r"rank_pattern=\{'q_proj': 8\}"),
    (dict(bias="all"), r"bias='all'"),
    (dict(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\] are not LoRA targets"),
    (dict(target_modules=".*q_proj"), r"is not a list of module names"),
])
def test_unsupported_peft_adapters_are_named(tmp_path, changes, message):
    d = export_peft_adapter(lora_model(seed=0, targets=("wq",)), tmp_path / "peft")
    edit_config(d, **changes)
    with pytest.raises(AdapterError, match=message):
        import_peft_adapter(base_model(0), d)


def test_peft_import_checks_shapes_after_unpermuting(tmp_path):
    d = export_peft_adapter(lora_model(seed=0, targets=("wk",)), tmp_path / "peft")
    tensors = load_file(d / PEFT_WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    tensors[key] = torch.zeros(30, 4)  # 30 rows: not 2 heads of an even head_dim
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, d / PEFT_WEIGHTS)
    with pytest.raises(AdapterError, match=r"'layers.0.attention.wk.lora_B': got \(30, 4\), expected \(32, 4\)") as e:
        import_peft_adapter(base_model(0), d)
    assert "'output.lora_A'" in str(e.value)


# ---- merge_and_unload: a plain Transformer, an ordinary Meta checkpoint -----------------------------------------

def test_merge_and_unload_is_a_plain_checkpoint(tmp_path):
    lora = lora_model(seed=11, r=4, alpha=12.0, targets=ALL_TARGETS, merge_weights=False)
    tokens = random_tokens(12)
    unmerged = logits_of(lora, tokens)
    assert not any(layer.merged for _, layer in lora_layers(lora))
    plain = merge_and_unload(copy.deepcopy(lora))
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(expected_shapes(ARGS))
    merged = logits_of(plain.eval(), tokens)
    # Calibrated (DESIGN §4): merging rounds W + ΔW once more, so merged may be at most the table's factor further
    # from a float64 unmerged reference than unmerged fp32 is (2-norm over all logits).
    reference = logits_of(copy.deepcopy(lora).double(), tokens)
    merged_err, unmerged_err = (merged.double() - reference).norm(), (unmerged.double() - reference).norm()
    assert merged_err <= CALIBRATION_FACTORS["lora_merge"] * unmerged_err, (merged_err, unmerged_err)
    assert (merged - logits_of(base_model(11).eval(), tokens)).abs().max() > 0.1
    ckpt = save_checkpoint(plain, tmp_path / "ckpt")
    loaded = load_model(ckpt, kv_caching=False, max_seq_len=32).eval()
    assert type(loaded) is Transformer and not any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert loaded.state_dict().keys() == plain.state_dict().keys()
    for key, t in plain.state_dict().items():
        exact(loaded.state_dict()[key], t)
    exact(logits_of(loaded, tokens), merged)


@quiet_peft
def test_a_tied_preset_trains_saves_reloads_and_exports_to_peft_with_the_tie(tmp_path):
    # llama-finetune --lora on a tied preset: the frozen shared matrix stays one parameter through training, the
    # adapter files, a reload and PEFT's loader on transformers' tied LlamaForCausalLM, which computes our logits
    from llama_ref.cli.finetune import run
    from llama_ref.lora.adapter import load_adapter
    from llama_ref.model import init_weights
    from llama_ref.args import ModelArgs
    from llama_ref.train.config import TrainConfig

    run(TrainConfig(preset="tiny-tied", lora=True, lora_dropout=0.0, max_steps=2, lr=1e-2, out=str(tmp_path),
                    progress=False, log_every=1000))
    model = load_adapter(init_weights(Transformer(ModelArgs.preset("tiny-tied")), 0), tmp_path / "adapter")
    assert model.output.weight is model.tok_embeddings.weight and model.params.tie_embeddings
    assert any(float(layer.lora_B.detach().abs().max()) > 0 for _, layer in lora_layers(model))  # trained: B moved
    model.kv_caching = False
    d = export_peft_adapter(model, tmp_path / "peft")
    tokens = random_tokens(4)
    theirs, peft_model = _peft_logits(init_weights(Transformer(ModelArgs.preset("tiny-tied")), 0), d, tokens)
    inner = peft_model.get_base_model()
    assert inner.config.tie_word_embeddings and inner.lm_head.weight is inner.model.embed_tokens.weight
    assert_peft_close(logits_of(model.eval(), tokens), theirs)


@quiet_peft
@pytest.mark.parametrize("targets, keep_tied", [(("wq", "output"), False), (("wv", "tok_embeddings"), False),
                                                (("tok_embeddings",), True)])
def test_vocabulary_adapters_of_a_tied_model_export_to_peft(tmp_path, targets, keep_tied):
    # PEFT's lm_head and embed_tokens adapters (kept tied: ensure_weight_tying) on transformers' tied model give our
    # logits, unmerged; a head adapter kept tied has no PEFT form and is refused
    import warnings

    from llama_ref.args import ModelArgs
    from llama_ref.lora import apply_lora_to_llama
    from llama_ref.model import init_weights
    base = init_weights(Transformer(ModelArgs.preset("tiny-tied")), 0)
    model = vocab_adapted(base, targets, keep_tied)
    model.kv_caching = False
    d = export_peft_adapter(model, tmp_path / "peft")
    config = json.loads((d / CONFIG_FILE).read_text())
    assert config.get("ensure_weight_tying", False) is keep_tied
    tokens = random_tokens(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's warnings about adapters on tied layers
        theirs, _ = _peft_logits(base, d, tokens)
    model.train()  # unmerged (eval would merge; the merge is property 9's)
    assert_peft_close(logits_of(model, tokens), theirs)
    assert (theirs - logits_of(base.eval(), tokens)).abs().max() > 0.1  # the vocabulary adapters took effect
    kept_head = copy.deepcopy(base)
    apply_lora_to_llama(kept_head, 4, 8, 0.0, ("output",), keep_tied=True)
    with pytest.raises(ValueError, match="kept tied has no PEFT form"):
        export_peft_adapter(kept_head, tmp_path / "refused")
