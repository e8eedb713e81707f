"""Tied embeddings through llama_ref's paths (llama_ref.lora.tied, llama_ref.vocab, Meta checkpoints): an adapter on
the head or the embedding changes that module only and merges into a tensor of its own (the configuration then says
untied), or, kept tied, changes the shared matrix and merges into it; a Meta file with an equal head loads tied; a
resize keeps the tie; ``tie_weights`` restores it after ``to_empty``."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from llama_ref.args import ModelArgs
from llama_ref.formats.meta import load_model, save_checkpoint
from llama_ref.lora import apply_lora_to_llama, merge_and_unload
from llama_ref.model import Transformer, init_weights
from llama_ref.vocab import resize_token_embeddings

from .adapter_models import vocab_adapted

TOKENS = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
RUNTIME = dict(max_seq_len=256, max_batch_size=8)


@pytest.fixture(scope="module")
def tied():
    model = init_weights(Transformer(ModelArgs.preset("tiny", tie_embeddings=True)), 0)
    model.kv_caching = False
    return model


@pytest.mark.parametrize("name, count", [("llama-3.2-1b-tied", 1_235_814_400), ("llama-3.2-3b-tied", 3_212_749_824)])
def test_the_tied_presets_have_the_published_parameter_counts(name, count):
    with torch.device("meta"):
        model = Transformer(ModelArgs.preset(name))
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("target", ["output", "tok_embeddings"])
def test_an_untied_adapter_changes_its_module_only_and_unties_at_merge(tied, target):
    model = vocab_adapted(tied, (target,))
    base_weight = tied.tok_embeddings.weight.detach().clone()
    unmerged = model(TOKENS, 0)
    other = model.tok_embeddings if target == "output" else model.output
    assert other.weight is (model.output if target == "output" else model.tok_embeddings).weight  # base still shared
    model.eval()  # merges: into a tensor of its own, the shared one untouched
    torch.testing.assert_close(model(TOKENS, 0), unmerged, rtol=1e-5, atol=1e-4)
    assert torch.equal(other.weight, base_weight)
    model.train()  # unmerges: the shared tensor back, exactly
    assert model.output.weight is model.tok_embeddings.weight
    plain = merge_and_unload(model)
    assert plain.output.weight is not plain.tok_embeddings.weight and not plain.params.tie_embeddings
    assert torch.equal(other.weight, base_weight)
    torch.testing.assert_close(plain(TOKENS, 0), unmerged, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("target", ["output", "tok_embeddings"])
def test_a_kept_tied_adapter_changes_the_shared_matrix_and_merges_into_it(tied, target):
    model = vocab_adapted(tied, (target,), keep_tied=True)
    leader = getattr(model, target)
    delta = leader.delta_weight().to(torch.float32)
    with torch.no_grad():  # the embedding looks up W + ΔW, whichever module carries the adapter
        torch.testing.assert_close(model.tok_embeddings(TOKENS), (tied.tok_embeddings.weight + delta)[TOKENS])
    unmerged = model(TOKENS, 0)
    plain = merge_and_unload(model)
    assert plain.output.weight is plain.tok_embeddings.weight and plain.params.tie_embeddings
    torch.testing.assert_close(plain(TOKENS, 0), unmerged, rtol=1e-5, atol=1e-4)
    assert sum("lora_" in n for n, _ in vocab_adapted(tied, (target,), keep_tied=True).named_parameters()) == 2


def test_keep_tied_needs_a_tied_model_and_one_vocabulary_target(tied):
    untied = init_weights(Transformer(ModelArgs.preset("tiny")), 0)
    with pytest.raises(ValueError, match="keep_tied: the model must be tied"):
        apply_lora_to_llama(untied, 4, 8, 0.0, ("output",), keep_tied=True)
    with pytest.raises(ValueError, match="exactly one of tok_embeddings, output"):
        apply_lora_to_llama(copy.deepcopy(tied), 4, 8, 0.0, ("output", "tok_embeddings"), keep_tied=True)


def test_an_untied_merge_saves_both_matrices_and_reloads_untied(tied, tmp_path):
    plain = merge_and_unload(vocab_adapted(tied, ("output",)))
    save_checkpoint(plain, tmp_path)
    assert "tie_embeddings" not in json.loads((tmp_path / "params.json").read_text())
    loaded = load_model(tmp_path, **RUNTIME)
    assert loaded.output.weight is not loaded.tok_embeddings.weight
    loaded.kv_caching = False
    assert torch.equal(loaded(TOKENS, 0), plain(TOKENS, 0))


def test_a_meta_file_with_an_equal_head_and_no_tie_key_loads_tied(tied, tmp_path):
    # Meta's Llama 3.2 1B/3B files: output.weight saved, equal to the embedding, params.json silent on tying
    save_checkpoint(tied, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["tie_embeddings"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = load_model(tmp_path, **RUNTIME)
    assert loaded.params.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    (tmp_path / "params.json").write_text(json.dumps({**params, "tie_embeddings": False}))  # said untied: untied
    assert load_model(tmp_path, **RUNTIME).output.weight is not load_model(tmp_path, **RUNTIME).tok_embeddings.weight


@pytest.mark.parametrize("tie", [True, False])
def test_a_resize_keeps_the_tie_the_old_rows_and_adds_mean_rows(tie):
    model = init_weights(Transformer(ModelArgs.preset("tiny", tie_embeddings=tie)), 0)
    model.kv_caching = False
    before = model(TOKENS, 0)
    old = model.tok_embeddings.weight.detach().clone()
    resize_token_embeddings(model, 520)
    assert (model.output.weight is model.tok_embeddings.weight) is tie
    assert model.params.vocab_size == 520 and model.tok_embeddings.weight.shape == (520, 64)
    assert torch.equal(model.tok_embeddings.weight[:512], old)
    torch.testing.assert_close(model.tok_embeddings.weight[512:], old.mean(0).expand(8, -1))
    torch.testing.assert_close(model(TOKENS, 0)[..., :512], before)
    resize_token_embeddings(model, 500)
    assert (model.output.weight is model.tok_embeddings.weight) is tie and model.output.out_features == 500


def test_tie_weights_restores_the_tie_after_to_empty():
    with torch.device("meta"):
        model = Transformer(ModelArgs.preset("tiny", tie_embeddings=True))
    model = model.to_empty(device="cpu")
    assert model.output.weight is not model.tok_embeddings.weight  # to_empty: a storage per module
    model.tie_weights()
    assert model.output.weight is model.tok_embeddings.weight


def test_adapter_files_refuse_vocabulary_adapters_naming_them(tied, tmp_path):
    from llama_ref.lora.adapter import save_adapter
    with pytest.raises(ValueError, match="adapters on tok_embeddings, output .* merge_and_unload"):
        save_adapter(vocab_adapted(tied, ("wq", "output", "tok_embeddings")), tmp_path)


def test_a_deliberately_untied_model_with_an_equal_head_reloads_untied(tmp_path):
    # saved with "tie_embeddings": false, so that the equal head does not read as Meta's tied 3.2 files
    model = init_weights(Transformer(ModelArgs.preset("tiny")), 0)
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "params.json").read_text())["tie_embeddings"] is False
    loaded = load_model(tmp_path, **RUNTIME)
    assert loaded.output.weight is not loaded.tok_embeddings.weight and not loaded.params.tie_embeddings


def test_a_model_configured_tied_with_a_head_of_its_own_is_not_saved(tied, tmp_path):
    model = copy.deepcopy(tied)
    model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())
    with pytest.raises(ValueError, match="tie_embeddings is set but its head is a tensor of its own"):
        save_checkpoint(model, tmp_path)
    assert not (tmp_path / "params.json").exists()


def test_llama_finetune_refuses_vocabulary_targets_naming_them():
    from llama_ref.train.config import TrainConfig
    with pytest.raises(ValueError, match=r"--lora-targets 'wq,output': \['output'\] not among"):
        TrainConfig(preset="tiny-tied", lora=True, lora_targets="wq,output")
