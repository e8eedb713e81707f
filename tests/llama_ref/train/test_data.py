"""Tests for llama_ref/data.py and the bundled data set: loading (JSON array, JSONL, every malformed input),
prompt masking, truncation and dropping, the SentencePiece boundary, collate and the shifted-loss token count."""

from __future__ import annotations

import importlib.util
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from llama_ref.train.data import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    DataError,
    InstructionDataset,
    collate,
    count_target_tokens,
    default_dataset_path,
    format_prompt,
    load_records,
)
from llama_ref.default import default_args, default_model, default_tokenizer

REPO = Path(__file__).resolve().parents[3]
TOK = default_tokenizer()
WITH_INPUT = {"instruction": "Sort these numbers.", "input": "5, 2, 9", "output": "2, 5, 9"}
NO_INPUT = {"instruction": "What is 17 + 25?", "input": "", "output": "42"}


def _script():
    spec = importlib.util.spec_from_file_location("make_instructions", REPO / "scripts" / "make_instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prompt_ids(record) -> list[int]:
    return TOK.encode(format_prompt(record), bos=True, eos=False)


# --- the bundled data set ------------------------------------------------------------------------------------

def test_bundled_data_set_fits_the_tiny_preset_without_truncation():
    records = load_records(default_dataset_path())
    assert 300 <= len(records) <= 500
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    max_seq_len = default_args().max_seq_len
    assert max_seq_len == 256
    ds = InstructionDataset(records, TOK, max_seq_len)
    assert ds.n_dropped == 0 and len(ds) == len(records)
    lengths = [len(item["input_ids"]) for item in ds]
    assert max(lengths) <= 200, f"longest example {max(lengths)} tokens"
    assert all(item["input_ids"][-1] == TOK.eos_id for item in ds), "an example was truncated"


def test_bundled_data_set_is_what_the_script_generates():
    script = _script()
    assert default_dataset_path().read_bytes() == script.dumps(script.build()), \
        "instructions.json is stale: run python scripts/make_instructions.py"
    assert script.dumps(script.build()) == script.dumps(script.build())


def test_bundled_answers_are_right():
    checked = 0
    for r in load_records(default_dataset_path()):
        if m := re.fullmatch(r"What is (\d+) ([-+]|times) (\d+)\?", r["instruction"]):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(r["output"]) == {"+": a + b, "-": a - b, "times": a * b}[op], r
            checked += 1
        elif m := re.fullmatch(r"Sort these numbers: (.*)", r["instruction"]):
            assert r["output"] == ", ".join(map(str, sorted(int(x) for x in m[1].split(", ")))), r
            checked += 1
        elif r["instruction"] == "Reverse the order of this list.":
            assert r["output"].split(", ") == r["input"].split(", ")[::-1], r
            checked += 1
    assert checked > 100


# --- labels, boundary, truncation ----------------------------------------------------------------------------

@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_labels_mask_exactly_the_prompt(record):
    prompt = _prompt_ids(record)
    response = TOK.encode(record["output"], bos=False, eos=True)
    item = InstructionDataset([record], TOK, 256)[0]
    assert item["input_ids"].dtype == item["labels"].dtype == torch.long
    assert item["input_ids"].tolist() == prompt + response
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + response
    assert item["input_ids"][0] == TOK.bos_id and item["labels"][-1] == TOK.eos_id
    assert count_target_tokens(item["labels"][None]) == len(response)


def test_prompt_templates_are_alpacas():
    assert format_prompt(WITH_INPUT) == PROMPT_TEMPLATE.format(**WITH_INPUT)
    assert format_prompt(NO_INPUT) == PROMPT_TEMPLATE_NO_INPUT.format(instruction=NO_INPUT["instruction"])
    assert format_prompt({"instruction": "x", "output": "y"}).endswith("### Instruction:\nx\n\n### Response:\n")
    assert "### Input:\n5, 2, 9\n\n### Response:\n" in format_prompt(WITH_INPUT)


@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_sentencepiece_boundary_adds_one_space(record):
    # The response is encoded on its own, so SentencePiece gives it the "▁" dummy prefix: one space at the seam.
    item = InstructionDataset([record], TOK, 256)[0]
    assert TOK.decode(item["input_ids"]) == format_prompt(record) + " " + record["output"]
    learned = item["input_ids"][item["labels"] != IGNORE_INDEX]
    assert TOK.decode(learned) == record["output"]  # as generate() would print it: a leading "▁" decodes to ""
    assert TOK.decode(item["input_ids"][: len(_prompt_ids(record))]) == format_prompt(record)


def test_truncation_cuts_from_the_right_and_drops_prompt_only_examples():
    n_prompt = len(_prompt_ids(WITH_INPUT))
    n_full = n_prompt + len(TOK.encode(WITH_INPUT["output"], bos=False, eos=True))
    full = InstructionDataset([WITH_INPUT], TOK, 256)[0]
    for max_seq_len, n_learned in [(n_prompt + 1, 1), (n_prompt + 2, 2), (n_full, n_full - n_prompt)]:
        item = InstructionDataset([WITH_INPUT], TOK, max_seq_len)[0]
        assert item["input_ids"].tolist() == full["input_ids"][:max_seq_len].tolist()
        assert item["labels"].tolist() == full["labels"][:max_seq_len].tolist()
        assert count_target_tokens(item["labels"][None]) == n_learned
    assert InstructionDataset([WITH_INPUT], TOK, n_full - 1)[0]["input_ids"][-1] != TOK.eos_id

    long_record = dict(WITH_INPUT, input="5, 2, 9, " * 20)
    assert len(_prompt_ids(long_record)) > n_prompt + 10
    ds = InstructionDataset([WITH_INPUT, long_record, NO_INPUT], TOK, n_prompt + 10)
    assert ds.n_dropped == 1 and len(ds) == 2 and ds.indices == [0, 2]
    assert ds[1]["input_ids"].tolist() == InstructionDataset([NO_INPUT], TOK, 256)[0]["input_ids"].tolist()
    # a prompt of exactly max_seq_len tokens leaves nothing to learn either
    assert InstructionDataset([WITH_INPUT, NO_INPUT], TOK, n_prompt).n_dropped == 1
    with pytest.raises(DataError, match=r"all 2 examples dropped.*max_seq_len=5"):
        InstructionDataset([WITH_INPUT, NO_INPUT], TOK, 5)
    with pytest.raises(ValueError, match="max_seq_len must be >= 1, got 0"):
        InstructionDataset([WITH_INPUT], TOK, 0)


def test_dataset_checks_records():
    with pytest.raises(DataError, match=r"^records index 1: missing field 'output'$"):
        InstructionDataset([NO_INPUT, {"instruction": "x"}], TOK, 256)


# --- file formats --------------------------------------------------------------------------------------------

def test_json_array_and_jsonl_load_the_same_records(tmp_path):
    raw = [dict(WITH_INPUT, id=7, category="lists"), {"instruction": "a", "output": "b"}, NO_INPUT]
    expected = [WITH_INPUT, {"instruction": "a", "input": "", "output": "b"}, NO_INPUT]  # extra keys dropped
    (tmp_path / "d.json").write_text("  \n" + json.dumps(raw, indent=2), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\r\n".join(json.dumps(r) for r in raw) + "\r\n\n  \n", encoding="utf-8")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in raw).encode())
    for name in ("d.json", "d.jsonl", "bom.jsonl"):
        assert load_records(tmp_path / name) == expected, name
        assert load_records(str(tmp_path / name)) == expected, name


_text = st.text(max_size=40)
_record = st.fixed_dictionaries({"instruction": _text, "output": _text}, optional={"input": _text})


@given(records=st.lists(_record, min_size=1, max_size=5), ensure_ascii=st.booleans())
def test_records_round_trip_through_jsonl_and_json(records, ensure_ascii):
    # ensure_ascii=False writes U+2028, U+0085, \x1c... raw: JSONL lines must be split on "\n" only.
    expected = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
                for r in records]
    with tempfile.TemporaryDirectory() as d:
        jsonl, array = Path(d) / "d.jsonl", Path(d) / "d.json"
        jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=ensure_ascii) for r in records), encoding="utf-8")
        array.write_text(json.dumps(records, ensure_ascii=ensure_ascii), encoding="utf-8")
        assert load_records(jsonl) == expected
        assert load_records(array) == expected


MALFORMED = [
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "b"}\n',
     r"d\.jsonl line 2: missing field 'instruction'$"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n\n\n\n\n{"instruction": "a", "input": "c"}\n',
     r"d\.jsonl line 7: missing field 'output'$"),
    ("d.jsonl", '{"instruction": 3, "output": "b"}\n', r"d\.jsonl line 1: field 'instruction' must be a string, "
     "got a number$"),
    ("d.jsonl", '{"instruction": "a", "output": ["b"]}\n', r"d\.jsonl line 1: field 'output' must be a string, "
     "got an array$"),
    ("d.jsonl", '{"instruction": "a", "input": null, "output": "b"}\n', r"d\.jsonl line 1: field 'input' must be "
     "a string, got null$"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n"just text"\n', r"d\.jsonl line 2: expected an object .*"
     "got a string$"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n',
     r"d\.jsonl line 3 column 32: invalid JSON: Expecting value$"),
    ("d.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a"}]',
     r"d\.json index 1: missing field 'output'$"),
    ("d.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]',
     r"d\.json line 3 column 22: invalid JSON: Expecting ',' delimiter$"),
    ("d.json", '[{"instruction": "a", "output": "b"}, 42]', r"d\.json index 1: expected an object .*got a number$"),
    ("d.json", "[]", r"d\.json: no records"),
    ("d.json", "  [ ]\n", r"d\.json: no records"),
    ("d.jsonl", "", r"d\.jsonl: no records"),
    ("d.jsonl", "\n  \n\n", r"d\.jsonl: no records"),
]


@pytest.mark.parametrize("name, content, message", MALFORMED, ids=[f"{i}-{m[0]}" for i, m in enumerate(MALFORMED)])
def test_malformed_data_names_file_line_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        load_records(path)
    assert str(info.value).startswith(str(path))
    assert isinstance(info.value, ValueError)


def test_undecodable_and_missing_files(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"instruction": "café", "output": "b"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 \(byte 20\)"):
        load_records(bad)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(missing)))):
        load_records(missing)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path)  # a directory is not a data file


# --- collate and the loss denominator ------------------------------------------------------------------------

def test_collate_pads_right_with_ignored_labels():
    ds = InstructionDataset([WITH_INPUT, NO_INPUT], TOK, 256)
    a, b = ds[0], ds[1]
    assert len(a["input_ids"]) != len(b["input_ids"])
    for pad_id, fill in [(None, 0), (TOK.eos_id, TOK.eos_id), (7, 7)]:
        batch = collate([a, b], pad_id=pad_id) if pad_id is not None else collate([a, b])
        assert batch["lengths"].tolist() == [len(a["input_ids"]), len(b["input_ids"])]
        assert batch["lengths"].dtype == batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        l_max = max(batch["lengths"].tolist())
        assert batch["input_ids"].shape == batch["labels"].shape == (2, l_max)
        for row, item in enumerate([a, b]):
            n = len(item["input_ids"])
            assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
            assert torch.equal(batch["labels"][row, :n], item["labels"])
            assert (batch["input_ids"][row, n:] == fill).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match=r"pad_id must be a valid token id >= 0, got -1"):
        collate([a, b], pad_id=TOK.pad_id)  # SentencePiece's -1
    with pytest.raises(ValueError, match="at least one example"):
        collate([])


def test_count_target_tokens_counts_what_the_shifted_loss_averages():
    records = load_records(default_dataset_path())[:6]
    ds = InstructionDataset(records, TOK, 140)  # some examples cut mid-response
    batch = collate([ds[i] for i in range(len(ds))])
    direct = sum(1 for row in batch["labels"].tolist() for j in range(1, len(row)) if row[j] != IGNORE_INDEX)
    assert count_target_tokens(batch["labels"]) == direct > 0
    n_response = sum(len(TOK.encode(records[i]["output"], bos=False, eos=True)) for i in ds.indices)
    assert count_target_tokens(batch["labels"]) <= n_response


def test_padding_never_reaches_the_loss():
    # Summed shifted cross-entropy of the padded batch equals the sum over each example alone (causal attention,
    # IGNORE_INDEX on pads), whatever the pad id.
    torch.set_num_threads(1)  # a 164k-parameter model: threads only contend (conftest restores the count)
    model = default_model(kv_caching=False).eval()
    ds = InstructionDataset([WITH_INPUT, NO_INPUT, load_records(default_dataset_path())[0]], TOK, 256)

    def loss_sum(input_ids, labels):
        logits = model(input_ids, 0)  # (B, L, vocab)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")

    with torch.no_grad():
        alone = sum(loss_sum(item["input_ids"][None], item["labels"][None]) for item in ds)
        for pad_id in (0, TOK.eos_id, 300):
            batch = collate(list(ds), pad_id=pad_id)
            torch.testing.assert_close(loss_sum(batch["input_ids"], batch["labels"]), alone)
