"""Instruction data (Alpaca layout, JSON array or JSONL) → token ids and loss labels for causal fine-tuning.

    records = load_records(default_dataset_path())           # [{"instruction", "input", "output"}, ...]
    ds = InstructionDataset(records, tokenizer, max_seq_len=256)
    batch = collate([ds[0], ds[1]], pad_id=0)                 # input_ids, labels (B, Lmax); lengths (B,)

Label convention (Meta / Alpaca / HF): `labels` are aligned with `input_ids`, NOT shifted. Position j holds the
token at j, or IGNORE_INDEX where nothing is learned (prompt and padding). The loss shifts:
`cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())`, i.e. the logits at position j predict
the label at j + 1. `count_target_tokens` counts exactly the positions that this shifted loss averages over.

Tokens are `encode(prompt, bos=True) + encode(response, eos=True)`: prompt and response are encoded separately,
so the prompt/response boundary is exact (no piece merges across it) and the prompt tokens are the same ones
that `generate` sees at inference. With SentencePiece (add_dummy_prefix) the response is encoded as its own
"sentence" and starts with the "▁" dummy prefix, so `decode(input_ids) == prompt + " " + response`; tiktoken
adds nothing, so there `decode(input_ids) == prompt + response`.

Notation used for tensor shapes: B batch size, L sequence length, Lmax the longest sequence of a batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..loss import IGNORE_INDEX, count_target_tokens  # with the loss: the model needs them without the data pipeline
from ..tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "PROMPT_TEMPLATE", "PROMPT_TEMPLATE_NO_INPUT", "DataError", "InstructionDataset",
           "collate", "count_target_tokens", "default_dataset_path", "format_prompt", "load_records"]

# Stanford Alpaca's templates, verbatim.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """A data file or record that is not a valid instruction data set; the message names file, line/index, field."""


def default_dataset_path() -> Path:
    """Path of the instruction data set shipped in llama_ref/assets (made by scripts/make_instructions.py)."""
    return Path(__file__).resolve().parent.parent / "assets" / "instructions.json"


def format_prompt(record: dict[str, Any]) -> str:
    """The Alpaca prompt for `record`: PROMPT_TEMPLATE if it has a non-empty `input`, else the no-input one."""
    if record.get("input"):
        return PROMPT_TEMPLATE.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])


def _check_record(obj: Any, where: str) -> dict[str, str]:
    # Keys other than the three fields are allowed and dropped (data sets often carry ids or categories).
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'output', got {_json_type(obj)}")
    for field in FIELDS:
        if field not in obj:
            if field == "input":
                continue
            raise DataError(f"{where}: missing field {field!r}")
        if not isinstance(obj[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {_json_type(obj[field])}")
    return {"instruction": obj["instruction"], "input": obj.get("input", ""), "output": obj["output"]}


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(v), type(v).__name__)


def load_records(path: str | Path) -> list[dict[str, str]]:
    """Records of a JSON-array or JSONL file, each as {"instruction", "input", "output"} (input "" if absent).

    The format is detected: a file whose first non-whitespace character is "[" is one JSON array, anything else
    is JSONL (one object per non-empty line, lines split on "\\n" only). Keys other than the three are ignored.
    Raises FileNotFoundError for a missing file, and DataError (a ValueError) for undecodable UTF-8, invalid
    JSON (line and column), a record that is not an object or lacks a string `instruction`/`output` or has a
    non-string `input` (JSONL line number or array index, and the field), and a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {str(path)!r} does not exist or is not a file")
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 (byte {e.start}): {e.reason}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
        records = [_check_record(obj, f"{name} index {i}") for i, obj in enumerate(data)]
    else:
        records = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name} line {lineno} column {e.colno}: invalid JSON: {e.msg}") from None
            records.append(_check_record(obj, f"{name} line {lineno}"))
    if not records:
        raise DataError(f"{name}: no records (an instruction data set needs at least one)")
    return records


class InstructionDataset(Dataset):
    """Tokenized instruction examples: item i → {"input_ids": (L,) int64, "labels": (L,) int64}.

    `input_ids` = bos + prompt + response + eos, cut from the right to `max_seq_len`; `labels` is IGNORE_INDEX
    over bos + prompt and equals `input_ids` over response + eos (unshifted: see the module docstring). An example
    cut so that no response token is left would teach nothing and is dropped: `n_dropped` counts them,
    `indices[i]` is the position in `records` of item i. Records are checked like `load_records`'s (DataError
    naming the index). Raises ValueError if `max_seq_len` < 1 and DataError if every example is dropped.
    """

    def __init__(self, records: Sequence[dict[str, Any]], tokenizer: Tokenizer, max_seq_len: int):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.examples: list[dict[str, torch.Tensor]] = []
        self.indices: list[int] = []
        for i, obj in enumerate(records):
            record = _check_record(obj, f"records index {i}")
            prompt = tokenizer.encode(format_prompt(record), bos=True, eos=False)
            response = tokenizer.encode(record["output"], bos=False, eos=True)
            if len(prompt) >= max_seq_len:
                continue
            ids = (prompt + response)[:max_seq_len]
            labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_seq_len]
            self.examples.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                                  "labels": torch.tensor(labels, dtype=torch.long)})
            self.indices.append(i)
        self.n_dropped = len(records) - len(self.examples)
        if not self.examples:
            raise DataError(f"all {len(records)} examples dropped: every prompt fills max_seq_len={max_seq_len} "
                            "tokens, leaving no response token to learn")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Stack items of InstructionDataset, padding on the RIGHT to the longest: input_ids and labels (B, Lmax),
    lengths (B,) int64 (the unpadded lengths).

    input_ids are padded with `pad_id` (None → 0), labels with IGNORE_INDEX. `pad_id` must be a valid
    embedding index (SentencePiece's pad_id is -1: pass e.g. eos_id, or leave the default). Its value never
    matters: padded positions have IGNORE_INDEX labels so they never reach the loss, and, being after every
    real token, causal attention keeps them from influencing any real position.
    Raises ValueError for an empty batch or a negative pad_id.
    """
    if not batch:
        raise ValueError("collate needs at least one example")
    pad_id = 0 if pad_id is None else pad_id
    if pad_id < 0:
        raise ValueError(f"pad_id must be a valid token id >= 0, got {pad_id} (SentencePiece's pad_id is -1; "
                         "pass the tokenizer's eos_id or 0)")
    lengths = torch.tensor([len(item["input_ids"]) for item in batch], dtype=torch.long)
    l_max = int(lengths.max())
    input_ids = torch.full((len(batch), l_max), pad_id, dtype=torch.long)  # (B, Lmax)
    labels = torch.full((len(batch), l_max), IGNORE_INDEX, dtype=torch.long)  # (B, Lmax)
    for b, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[b, :n] = item["input_ids"]
        labels[b, :n] = item["labels"]
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}
