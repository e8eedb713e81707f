"""docs/verify-your-model.md's worked example is the code it shows, and does what it says."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from verify.__main__ import main

from . import train_steps

HERE = Path(__file__).parent
DOC = (HERE.parents[2] / "docs" / "verify-your-model.md").read_text()


def test_the_doc_shows_the_factory_and_the_train_step_verbatim():
    assert (HERE / "example_factory.py").read_text().rstrip() in DOC
    assert inspect.getsource(train_steps.token_mean_step).rstrip() in DOC


def test_the_worked_example_gives_the_verdicts_the_doc_explains(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["--target", f"{HERE / 'example_factory.py'}:make", "--json", str(out),
                 "--train-step", f"{HERE / 'train_steps.py'}:token_mean_step",
                 "--mp-train-step", f"{HERE / 'train_steps.py'}:bf16_step"])
    verdicts = {r["name"]: ("N/A" if r["not_applicable"] else "PASS" if r["ok"] else "FAIL")
                for r in json.loads(out.read_text())["results"]}
    assert code == 1 and verdicts == {"kv_cache": "PASS", "grad_accum": "PASS", "lora_merge": "PASS",
                                      "mixed_precision": "PASS", "gradient_checkpointing": "FAIL",
                                      "packing": "N/A", "loss_kernel": "N/A", "tied_embeddings": "N/A"}
    text = capsys.readouterr().out
    assert "policy=every:2: checkpoint silently not applied" in text  # the seed's reentrant checkpoint
