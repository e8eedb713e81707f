"""llama_ref.formats.hf_checkpoint: our model as a transformers checkpoint and back — the configuration and the
weights agree about tying (a tied model without lm_head.weight, an untied one with it), transformers reads ours and
we read transformers', and a disagreement is an error naming both."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_ref.args import ModelArgs
from llama_ref.formats.hf_checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_hf_checkpoint, save_hf_checkpoint
from llama_ref.formats.meta import CheckpointError
from llama_ref.lora import apply_lora_to_llama, merge_and_unload
from llama_ref.model import Transformer, init_weights

TOKENS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def _model(preset: str = "tiny-tied", **overrides) -> Transformer:
    model = init_weights(Transformer(ModelArgs.preset(preset, **overrides)), 0)
    model.kv_caching = False
    return model


def _logits(model: Transformer) -> torch.Tensor:
    model.kv_caching = False
    with torch.no_grad():
        return model(TOKENS, 0)


@pytest.mark.parametrize("preset", ["tiny-tied", "tiny"])
def test_a_round_trip_keeps_the_weights_the_tie_and_the_logits(tmp_path, preset):
    model = _model(preset)
    save_hf_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["tie_word_embeddings"] is model.params.tie_embeddings
    assert ("lm_head.weight" in load_file(str(tmp_path / WEIGHTS_FILE))) is not model.params.tie_embeddings
    loaded = load_hf_checkpoint(tmp_path, max_seq_len=256, max_batch_size=8)
    assert (loaded.output.weight is loaded.tok_embeddings.weight) is model.params.tie_embeddings
    assert loaded.params.ffn_hidden_dim == model.params.ffn_hidden_dim
    assert torch.equal(_logits(loaded), _logits(model))


def test_an_untying_merge_is_saved_untied_with_its_trained_head(tmp_path):
    model = _model()
    apply_lora_to_llama(model, 4, 8, 0.0, ("output",), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.output.lora_B.normal_()
    merged = merge_and_unload(model)
    save_hf_checkpoint(merged, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["tie_word_embeddings"] is False
    assert torch.equal(_logits(load_hf_checkpoint(tmp_path)), _logits(merged))


def test_transformers_reads_ours_and_we_read_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from verify.oracle_hf import build_hf_model, hf_logits
    from verify.tolerances import implementation_tolerance
    model = _model()
    save_hf_checkpoint(model, tmp_path / "ours")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert theirs.config.tie_word_embeddings and theirs.lm_head.weight is theirs.model.embed_tokens.weight
    close = implementation_tolerance("peft_logits")._asdict()
    torch.testing.assert_close(hf_logits(theirs, TOKENS), _logits(model), **close)
    build_hf_model(model).save_pretrained(tmp_path / "theirs")
    back = load_hf_checkpoint(tmp_path / "theirs")
    assert back.output.weight is back.tok_embeddings.weight
    assert torch.equal(_logits(back), _logits(model))


def test_a_configuration_that_disagrees_with_the_weights_is_named(tmp_path):
    save_hf_checkpoint(_model("tiny"), tmp_path)  # untied: lm_head.weight differs from the embedding
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings is true .* lm_head.weight differs"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="tie_word_embeddings is false .* no lm_head.weight"):
        load_hf_checkpoint(tmp_path)


def test_a_model_whose_tie_and_configuration_disagree_is_not_saved(tmp_path):
    model = _model("tiny")
    model.output.weight = model.tok_embeddings.weight  # tied by hand, configured untied
    with pytest.raises(ValueError, match="params.tie_embeddings is False"):
        save_hf_checkpoint(model, tmp_path)
    assert not (tmp_path / CONFIG_FILE).exists()
