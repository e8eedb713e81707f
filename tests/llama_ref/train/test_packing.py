"""Packing (llama_ref.train.packing, Transformer.forward(positions=, document_ids=)): first-fit decreasing rows,
positions restarting per document, attention inside each document, each document's first label ignored — so that a
packed window's loss and gradients are the padded window's, and the model without packing arguments is unchanged."""
from __future__ import annotations

import pytest
import torch

from llama_ref.args import ModelArgs
from llama_ref.loss import IGNORE_INDEX, token_loss_sum
from llama_ref.model import Transformer, init_weights
from llama_ref.train.data import DataError, collate
from llama_ref.train.packing import collate_packed, pack, packed_micro_batches
from llama_ref.train.trainer import Trainer


def _examples(lengths, seed=0, prompt=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 512, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_first_fit_decreasing_places_the_longest_first_in_the_first_row_with_room():
    assert pack([3, 7, 5, 2, 4], 9) == [[1, 3], [2, 4], [0]]
    with pytest.raises(DataError, match="example 1 has 12 tokens, more than a packed row of 9"):
        pack([3, 12], 9)


def test_a_packed_row_restarts_positions_ignores_each_first_label_and_pads_as_a_document_of_its_own():
    a, b = _examples([3, 4], prompt=0)
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, -1, -1, -1]]
    assert batch["labels"][0, 0] == batch["labels"][0, 3] == IGNORE_INDEX  # each document's first token
    assert batch["labels"][0, 1:3].tolist() == a["labels"][1:].tolist()
    assert batch["lengths"].tolist() == [7, 4] and (batch["labels"][1, 4:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_packed_logits_are_each_documents_own_and_the_unpacked_forward_is_unchanged(attn_impl):
    model = init_weights(Transformer(ModelArgs.preset("tiny", n_layers=1, attn_impl=attn_impl)), 0).double()
    model.kv_caching = False
    docs = _examples([5, 7, 3])
    batch = collate_packed([docs], pad_id=0)
    logits = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"])[0]
    at = 0
    for d in docs:
        n = len(d["input_ids"])
        torch.testing.assert_close(logits[at:at + n], model(d["input_ids"][None])[0], rtol=1e-12, atol=1e-12)
        at += n
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(tokens), model.eval()(tokens))  # no packing arguments: the path of before


def test_a_packed_window_has_the_padded_windows_loss_and_gradients():
    examples = _examples([9, 4, 11, 6, 3, 8], seed=2)
    padded = [collate(examples[i:i + 2]) for i in range(0, 6, 2)]
    packed = packed_micro_batches(examples, 16, 3)
    assert sum(len(b["input_ids"]) for b in packed) < 6  # fewer rows: that is the point
    results = []
    for window in (padded, packed):
        model = init_weights(Transformer(ModelArgs.preset("tiny", n_layers=1)), 0).double()
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0))
        r = trainer.step(window)
        results.append((r.loss, r.n_tokens, {n: p.grad for n, p in model.named_parameters()}))
    assert results[0][1] == results[1][1] and results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_packing_arguments_are_refused_where_they_cannot_apply():
    model = init_weights(Transformer(ModelArgs.preset("tiny", n_layers=1)), 0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="kv_caching off"):
        model(tokens, document_ids=torch.zeros(1, 4, dtype=torch.long))
    model.kv_caching = False
    with pytest.raises(ValueError, match="positions must be"):
        model(tokens, positions=torch.zeros(1, 3, dtype=torch.long))


def test_finetune_pack_trains_the_same_first_window_and_refuses_pack_options_without_it(tmp_path):
    import json
    from llama_ref.cli.finetune import main
    runs = {}
    for name, extra in (("padded", []), ("packed", ["--pack"])):
        out = tmp_path / name
        assert main(["--ga", "4", "--batch-size", "2", "--max-steps", "1", "--no-progress", "--lora",
                     "--optimizer", "sgd", "--out", str(out), *extra]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())["losses"][0]
    assert runs["packed"]["tokens"] == runs["padded"]["tokens"]
    assert runs["packed"]["loss"] == pytest.approx(runs["padded"]["loss"], rel=1e-6)
    with pytest.raises(SystemExit):
        main(["--pack-len", "64"])


def test_positions_alone_mark_the_documents_where_they_restart():
    # transformers' reading of position_ids: without document ids, a document starts where positions reset.
    model = init_weights(Transformer(ModelArgs.preset("tiny", n_layers=1)), 0).double()
    model.kv_caching = False
    batch = collate_packed([_examples([5, 7])], pad_id=0)
    with_ids = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"])
    torch.testing.assert_close(model(batch["input_ids"], positions=batch["positions"]), with_ids)


def test_finetune_refuses_a_pack_len_beyond_the_model_and_names_a_record_longer_than_a_row(capsys):
    from llama_ref.cli.finetune import main
    assert main(["--pack", "--pack-len", "9999", "--max-steps", "1", "--no-progress"]) == 2
    assert "--pack-len 9999 exceeds the model's max_seq_len 256" in capsys.readouterr().err
    assert main(["--pack", "--pack-len", "64", "--max-steps", "1", "--no-progress"]) == 2
    assert "record 0 of the data has 108 tokens, more than a packed row of 64" in capsys.readouterr().err
