# Over 350 lines: the tests of one module, llama_ref.formats.meta (a test file per module).
"""Meta-format checkpoints: round trips, strict validation, safe loading, shard merging, atomic saving."""
from __future__ import annotations

import builtins
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from llama_ref.args import ModelArgs
from llama_ref.formats.meta import (
    CheckpointError,
    expected_shapes,
    load_model,
    load_params,
    load_state_dict,
    save_checkpoint,
)
from llama_ref.model import Transformer, init_weights

RUNTIME = dict(max_seq_len=256, max_batch_size=8)  # the tiny preset's cache sizes, not stored in params.json


def tiny(**overrides) -> ModelArgs:
    return ModelArgs.preset("tiny", **overrides)


def make_model(seed: int = 0, **overrides) -> Transformer:
    return init_weights(Transformer(tiny(**overrides)), seed)


def tokens_for(args: ModelArgs, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (3, 11), generator=g)


@torch.no_grad()
def logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, start_pos=0)


def write_ckpt(directory: Path, params: dict, *shards: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    return directory


def assert_same_state(got: dict, want: dict) -> None:
    __tracebackhide__ = True
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), f"{key} differs"


# --- round trips ----------------------------------------------------------------------------------------------

def test_round_trip_gives_identical_weights_and_logits(tmp_path):
    model = make_model(seed=1)
    assert save_checkpoint(model, tmp_path) == tmp_path
    loaded = load_model(tmp_path, **RUNTIME)
    assert loaded.params == model.params
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert all(p.requires_grad for p in loaded.parameters())
    tokens = tokens_for(model.params)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_params_json_round_trip(tmp_path):
    args = tiny(use_scaled_rope=True, rope_scale_factor=32.0, ffn_dim_multiplier=1.5, rope_theta=500000.0,
                tie_embeddings=True)
    save_checkpoint(init_weights(Transformer(args), 0), tmp_path)
    assert json.loads((tmp_path / "params.json").read_text()) == args.to_params_json()
    assert load_params(tmp_path, **RUNTIME) == args
    assert load_params(tmp_path).max_seq_len == ModelArgs().max_seq_len  # runtime sizes are the caller's


def test_bf16_save_and_load(tmp_path):
    model = make_model(seed=2)
    save_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    on_disk = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in on_disk.values()} == {torch.bfloat16}

    loaded = load_model(tmp_path, **RUNTIME)  # default: the file's own dtype
    reference = make_model(seed=2).to(torch.bfloat16)
    assert_same_state(loaded.state_dict(), reference.state_dict())
    assert all(b.dtype == torch.bfloat16 for b in loaded.buffers())  # the KV cache follows the weights
    tokens = tokens_for(model.params)
    assert torch.equal(logits(loaded, tokens), logits(reference, tokens))

    upcast = load_model(tmp_path, dtype=torch.float32, **RUNTIME)
    assert_same_state(upcast.state_dict(), reference.float().state_dict())


def test_saved_file_holds_exactly_the_expected_keys(tmp_path):
    model = make_model()
    save_checkpoint(model, tmp_path)
    on_disk = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert {k: tuple(t.shape) for k, t in on_disk.items()} == expected_shapes(model.params)
    assert not any("cache" in k for k in on_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "params.json"]


def test_expected_shapes_match_the_model_and_llama_3_2_1b_size():
    args = ModelArgs.preset("llama-3.2-1b")
    shapes = expected_shapes(args)
    assert sum(math.prod(s) for s in shapes.values()) == 1_498_482_688  # untied: embedding + output
    with torch.device("meta"):
        model = Transformer(args)
    assert {k: tuple(t.shape) for k, t in model.state_dict().items()} == shapes
    with pytest.raises(ValueError, match="vocab_size"):
        expected_shapes(args.replace(vocab_size=-1))


def test_legacy_format_loads_with_mmap_requested(tmp_path):
    model = make_model(seed=3)
    write_ckpt(tmp_path, model.params.to_params_json())
    torch.save(model.state_dict(), tmp_path / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    state = load_state_dict(tmp_path, model.params, mmap=True)
    assert_same_state(state, model.state_dict())


def test_llama2_vocab_minus_one_is_taken_from_the_embedding(tmp_path):
    model = make_model(seed=4)
    write_ckpt(tmp_path, {**model.params.to_params_json(), "vocab_size": -1}, model.state_dict())
    assert load_params(tmp_path).vocab_size == -1
    loaded = load_model(tmp_path, **RUNTIME)
    assert loaded.params.vocab_size == model.params.vocab_size
    assert_same_state(loaded.state_dict(), model.state_dict())


# --- tied output ----------------------------------------------------------------------------------------------

def test_checkpoint_without_output_loads_tied(tmp_path):
    model = make_model(seed=5)
    state = model.state_dict()
    del state["output.weight"]
    write_ckpt(tmp_path, model.params.to_params_json(), state)
    tied = load_model(tmp_path, **RUNTIME)
    assert tied.params.tie_embeddings
    assert tied.output.weight is tied.tok_embeddings.weight

    untied = make_model(seed=5)
    with torch.no_grad():
        untied.output.weight.copy_(untied.tok_embeddings.weight)
    tokens = tokens_for(model.params)
    assert torch.equal(logits(tied, tokens), logits(untied, tokens))

    state = load_state_dict(tmp_path, model.params)
    assert state["output.weight"] is state["tok_embeddings.weight"]

    copy = load_model(tmp_path, tie_embeddings=False, **RUNTIME)  # explicitly untied: the output starts as a copy
    assert copy.output.weight is not copy.tok_embeddings.weight
    assert torch.equal(copy.output.weight, copy.tok_embeddings.weight)


def test_tied_model_round_trip_writes_output_weight(tmp_path):
    model = make_model(seed=6, tie_embeddings=True)
    save_checkpoint(model, tmp_path)
    on_disk = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert torch.equal(on_disk["output.weight"], on_disk["tok_embeddings.weight"])  # Meta's loader needs it
    assert json.loads((tmp_path / "params.json").read_text())["tie_embeddings"] is True
    loaded = load_model(tmp_path, **RUNTIME)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = tokens_for(model.params)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_tied_params_with_a_different_output_weight_is_refused(tmp_path):
    model = make_model(seed=7)  # untied: output.weight is its own random draw
    write_ckpt(tmp_path, {**model.params.to_params_json(), "tie_embeddings": True}, model.state_dict())
    with pytest.raises(CheckpointError, match="tie_embeddings.*output.weight differs"):
        load_model(tmp_path, **RUNTIME)


def test_rope_freqs_is_tolerated(tmp_path):
    model = make_model(seed=8)
    state = {"rope.freqs": torch.randn(model.params.head_dim // 2), **model.state_dict()}
    write_ckpt(tmp_path, model.params.to_params_json(), state)
    assert_same_state(load_model(tmp_path, **RUNTIME).state_dict(), model.state_dict())


# --- bad inputs -----------------------------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    model = make_model(seed=9)
    return model.params, model.state_dict(), tmp_path / "ckpt"


def test_missing_keys_are_all_named(good):
    args, state, d = good
    gone = ["layers.0.attention.wk.weight", "layers.1.feed_forward.w2.weight", "norm.weight"]
    write_ckpt(d, args.to_params_json(), {k: v for k, v in state.items() if k not in gone})
    with pytest.raises(CheckpointError) as err:
        load_state_dict(d, args)
    message = str(err.value)
    assert "3 missing key(s)" in message and str(d) in message and "consolidated.00.pth" in message
    for key in gone:
        assert repr(key) in message


def test_a_long_list_of_missing_keys_is_truncated(good):
    args, state, d = good
    write_ckpt(d, args.to_params_json(), {k: v for k, v in state.items() if not k.startswith("layers.")})
    with pytest.raises(CheckpointError, match=r"18 missing key\(s\): .*… and 8 more"):
        load_state_dict(d, args)


def test_unexpected_key_is_named(good):
    args, state, d = good
    write_ckpt(d, args.to_params_json(), {**state, "layers.0.attention.wq.lora_a.weight": torch.zeros(2, 64)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): 'layers.0.attention.wq.lora_a.weight'"):
        load_state_dict(d, args)


def test_shape_mismatch_names_the_key_and_both_shapes(good):
    args, state, d = good
    write_ckpt(d, args.to_params_json(), {**state, "layers.1.attention.wv.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError,
                       match=r"'layers.1.attention.wv.weight': got \(64, 64\), expected \(32, 64\)"):
        load_state_dict(d, args)


def test_all_problems_are_reported_together(good):
    args, state, d = good
    bad = {k: v for k, v in state.items() if k != "norm.weight"}
    bad["tok_embeddings.weight"] = torch.zeros(500, 64)
    bad["extra"] = torch.zeros(1)
    write_ckpt(d, args.to_params_json(), bad)
    with pytest.raises(CheckpointError) as err:
        load_model(d, **RUNTIME)
    message = str(err.value)
    assert "'norm.weight'" in message and "'extra'" in message
    assert "'tok_embeddings.weight': got (500, 64), expected (512, 64)" in message


def test_missing_params_json(good):
    args, state, d = good
    d.mkdir()
    torch.save(state, d / "consolidated.00.pth")
    with pytest.raises(FileNotFoundError, match=rf"{d}.*params.json.*consolidated.00.pth"):
        load_model(d)


def test_unknown_params_json_key_is_named(good):
    args, state, d = good
    write_ckpt(d, {**args.to_params_json(), "rope_scaling_typo": 2}, state)
    with pytest.raises(ValueError, match="rope_scaling_typo"):
        load_model(d)


def test_no_shards(good):
    args, _, d = good
    write_ckpt(d, args.to_params_json())
    with pytest.raises(FileNotFoundError, match=rf"{d}.*consolidated.00.pth"):
        load_model(d)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_state_dict(d / "nowhere", args)


def test_a_gap_in_shard_numbers_is_refused(good):
    args, state, d = good
    write_ckpt(d, args.to_params_json(), state)
    os.rename(d / "consolidated.00.pth", d / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"missing \['consolidated.00.pth'\]"):
        load_state_dict(d, args)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n" * 20, b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_not_a_torch_file(good, content):
    args, _, d = good
    write_ckpt(d, args.to_params_json())
    (d / "consolidated.00.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: not a readable torch checkpoint"):
        load_state_dict(d, args)


@pytest.mark.parametrize("payload", [[1, 2], {"tok_embeddings.weight": torch.zeros(2), "step": 7}])
def test_non_tensor_values_are_named(good, payload):
    args, _, d = good
    write_ckpt(d, args.to_params_json(), payload)
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: (key 'step' holds a int|expected a dict)"):
        load_state_dict(d, args)


class _RunsCode:
    """Unpickling this executes code that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"with open({str(self.marker)!r}, 'w') as f: f.write('pwned')",)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
@pytest.mark.parametrize("mmap", [True, False])
def test_malicious_pickle_is_refused_without_running_code(good, tmp_path, fmt, mmap):
    args, state, d = good
    marker = tmp_path / "marker"
    payload = {**state, "output.weight": _RunsCode(marker)}
    write_ckpt(d, args.to_params_json())
    path = d / "consolidated.00.pth"
    if fmt == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")

    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: refused .*non-tensor objects"):
        load_state_dict(d, args, mmap=mmap)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(d, **RUNTIME)
    assert not marker.exists()

    # The test has teeth: an unsafe load of the same file does run the payload.
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass  # the raw pickle lacks torch's framing; the code has run by then
    assert marker.read_text() == "pwned"


def test_atomic_save_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch):
    old = make_model(seed=10)
    save_checkpoint(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def save_half_then_fail(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "ab") as fh:
                fh.write(b"PK\x03\x04 partial")
        else:
            f.write(b"PK\x03\x04 partial")
            f.flush()
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(make_model(seed=11), tmp_path)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(make_model(seed=11), tmp_path / "fresh")
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert list((tmp_path / "fresh").iterdir()) == []
    assert_same_state(load_model(tmp_path, **RUNTIME).state_dict(), old.state_dict())


def test_save_refuses_stale_shards_and_non_llama_state(tmp_path):
    model = make_model()
    tmp_path.joinpath("consolidated.01.pth").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="consolidated.01.pth"):
        save_checkpoint(model, tmp_path)
    model.layers[0].attention.register_buffer("lora_scale", torch.ones(1))  # a persistent extra
    with pytest.raises(CheckpointError, match="'layers.0.attention.lora_scale'"):
        save_checkpoint(model, tmp_path / "other")
    assert not (tmp_path / "other" / "consolidated.00.pth").exists()


# --- model-parallel shards ------------------------------------------------------------------------------------

def split_into_shards(state: dict, n: int, embedding_dim: int) -> list[dict]:
    """Meta's model-parallel layout; ``embedding_dim`` 1 for Llama 2, 0 for Llama 3."""
    shards: list[dict] = [{} for _ in range(n)]
    for key, t in state.items():
        if key.endswith("norm.weight") or key == "rope.freqs":
            parts = [t.clone() for _ in range(n)]
        elif key.endswith(("wo.weight", "w2.weight")):
            parts = t.chunk(n, dim=1)
        elif key == "tok_embeddings.weight":
            parts = t.chunk(n, dim=embedding_dim)
        else:
            parts = t.chunk(n, dim=0)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


@pytest.mark.parametrize("embedding_dim", [1, 0], ids=["llama2-ParallelEmbedding", "llama3-VocabParallel"])
def test_two_shards_are_merged(tmp_path, embedding_dim):
    model = make_model(seed=12)
    state = {**model.state_dict(), "rope.freqs": torch.randn(8)}
    shards = split_into_shards(state, 2, embedding_dim)
    assert shards[0]["tok_embeddings.weight"].shape[embedding_dim] == state["tok_embeddings.weight"].shape[
        embedding_dim] // 2
    write_ckpt(tmp_path, model.params.to_params_json(), *shards)
    loaded = load_model(tmp_path, **RUNTIME)
    assert_same_state(loaded.state_dict(), model.state_dict())
    tokens = tokens_for(model.params)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_shards_with_different_norms_are_refused(tmp_path):
    model = make_model(seed=13)
    shards = split_into_shards(model.state_dict(), 2, 0)
    shards[1]["layers.1.ffn_norm.weight"] += 1
    del shards[1]["norm.weight"]
    write_ckpt(tmp_path, model.params.to_params_json(), *shards)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path, model.params)
    message = str(err.value)
    assert "'layers.1.ffn_norm.weight' is replicated but differs" in message
    assert "'norm.weight' absent from ['consolidated.01.pth']" in message
