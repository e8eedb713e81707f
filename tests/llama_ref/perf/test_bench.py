"""llama-bench: the 16-cell run writes valid bench.json / bench.md / plots, an out-of-memory cell is recorded and
the run goes on, the predicted table equals llama_ref.perf.memory's predictions, and the measured "Performance Analysis"
says what the numbers say."""
from __future__ import annotations

import json
import math

import pytest
import torch

from llama_ref.args import ModelArgs
from llama_ref.cli.bench import main
from llama_ref.perf.bench_cell import packed_blocks, synthetic_blocks
from llama_ref.perf.bench_config import BenchConfig
from llama_ref.perf.bench_report import SEED_TABLE, analysis, analysis_table
from llama_ref.perf.cells import CELLS, Cell
from llama_ref.train.data import IGNORE_INDEX
from llama_ref.perf.memory import predict_step_flops, predict_step_memory
from llama_ref.perf.peak import mem_tracker_available

needs_memtracker = pytest.mark.skipif(not mem_tracker_available(), reason=f"torch {torch.__version__} has no MemTracker "
                                      "(torch.distributed._tools.mem_tracker appeared in torch 2.5)")
TINY = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--threads", "1", "--no-progress"]


def test_the_cells_are_the_seeds_sixteen_in_its_order():
    assert len(CELLS) == len(set(CELLS)) == 16
    assert [c.ga for c in CELLS] == [True] * 8 + [False] * 8
    assert [(c.gc, c.mp, c.lora) for c in CELLS[:8]] == [(gc, mp, lora) for gc in (False, True)
                                                       for mp in (False, True) for lora in (False, True)]
    assert SEED_TABLE[Cell(False, False, False, False)] == (11624.06, 35.79)
    assert SEED_TABLE[Cell(True, False, True, False)] == (None, None)  # the seed's "x"
    for c in CELLS:
        assert Cell.parse(c.name) == c


def test_a_memory_limit_without_isolation_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--no-isolate", "--memory-limit-mb", "100"])
    assert e.value.code == 2 and "--memory-limit-mb needs isolated cells" in capsys.readouterr().err


def test_an_unknown_cell_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--cells", "plain,LoRA+QLoRA"])
    assert e.value.code == 2
    assert "LoRA+QLoRA" in capsys.readouterr().err


@needs_memtracker
def test_sixteen_cells_on_tiny_write_valid_files(tmp_path):
    # In this process (--no-isolate): a process per cell is the same code behind a subprocess, which the
    # out-of-memory test below runs (and the limit needs). Two micro-batches per cell: a GA cell takes one optimizer
    # step over them, the others two, as with more.
    rng = torch.get_rng_state()
    assert main(TINY + ["--steps", "2", "--ga", "2", "--no-isolate", "--out", str(tmp_path)]) == 0
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == 1  # the caller's state kept
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["mode"] == "measured" and data["config"]["preset"] == "tiny"
    records = data["cells"]
    assert [Cell.parse(r["cell"]) for r in records] == list(CELLS)
    for r in records:
        cell = Cell.parse(r["cell"])
        assert r["status"] == "ok", r
        assert (r["ga"], r["gc"], r["mp"], r["lora"]) == (cell.ga, cell.gc, cell.mp, cell.lora)
        assert r["optimizer_steps"] == (1 if cell.ga else 2) and r["micro_batches"] == 2
        assert all(math.isfinite(p["loss"]) for p in r["losses"])
        assert r["final_loss"] == r["losses"][-1]["loss"]
        assert r["peak_mb"] > 0 and r["runtime_s"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_micro_batch"] > 0
        assert sum(r["breakdown_mb"].values()) == pytest.approx(r["peak_mb"], rel=1e-9)  # the split of the peak
        assert r["breakdown_mb"]["parameter"] > 0 and r["peak_method"] == "MemTracker"
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| **Peak Mem (MB)** |") == 2 and md.count("| **Runtime (secs)** |") == 2
    assert "with Gradient Accumulation" in md and "without Gradient Accumulation" in md
    assert "Performance Analysis, measured" in md and "| FLOPs |" in md
    for name in ("loss_curves.png", "memory_breakdown.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@needs_memtracker
@pytest.mark.slow  # a cell process of its own beside one in this process (llama-bench's default path)
def test_an_isolated_cell_is_the_in_process_cell(tmp_path):
    # The default path: the cell runs in a child process (its record carries the address space only a process of
    # its own can report) and trains exactly as it would in this process.
    argv = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--ga", "2", "--threads", "1",
            "--no-progress", "--no-plots", "--cells", "GA+LoRA"]
    assert main(argv + ["--out", str(tmp_path / "child")]) == 0
    assert main(argv + ["--no-isolate", "--out", str(tmp_path / "here")]) == 0
    (child,) = json.loads((tmp_path / "child" / "bench.json").read_text())["cells"]
    (here,) = json.loads((tmp_path / "here" / "bench.json").read_text())["cells"]
    assert child["status"] == here["status"] == "ok"
    assert child["address_space_mb"] > 0 and "address_space_mb" not in here
    assert [p["loss"] for p in child["losses"]] == [p["loss"] for p in here["losses"]]
    assert child["peak_mb"] == here["peak_mb"]  # MemTracker counts the same tensors in either process


@needs_memtracker
@pytest.mark.slow  # three cell processes, at the 8 x 256 tokens whose contrast makes the limit robust
def test_an_out_of_memory_cell_is_recorded_and_the_run_goes_on(tmp_path):
    # The limit comes from a baseline measured by the same mechanism: first the small cell alone, unlimited, says
    # how much address space it needs (RLIMIT_AS counts tensors and also the allocator's, libraries' and threads'
    # mappings, which differ between torch builds and glibc versions, but equally for both cells). Measured at 8 x
    # 256 tokens of the bench model: GC+MP+LoRA needs ~300 MiB (70 MiB of tensors), plain ~500 (263 MiB of
    # tensors). A limit of the baseline + 100 MiB leaves ~100 MiB on either side.
    common = ["--preset", "bench", "--batch-size", "8", "--seq-len", "256", "--steps", "1", "--ga", "1",
              "--data", "synthetic", "--threads", "1", "--no-progress", "--no-plots"]
    assert main(common + ["--cells", "GC+MP+LoRA", "--out", str(tmp_path / "baseline")]) == 0
    (baseline,) = json.loads((tmp_path / "baseline" / "bench.json").read_text())["cells"]
    assert baseline["status"] == "ok" and baseline["address_space_mb"] > baseline["peak_mb"], baseline
    limit = baseline["address_space_mb"] + 100
    args = common + ["--cells", "plain,GC+MP+LoRA", "--memory-limit-mb", f"{limit:.0f}", "--out", str(tmp_path)]
    assert main(args) == 0
    records = {r["cell"]: r for r in json.loads((tmp_path / "bench.json").read_text())["cells"]}
    assert records["plain"]["status"] == "OOM", records["plain"]
    assert "allocate" in records["plain"]["error"]
    assert records["GC+MP+LoRA"]["status"] == "ok", records["GC+MP+LoRA"]  # the run went on after the OOM
    md = (tmp_path / "bench.md").read_text()
    assert "OOM" in md and "Cells that did not finish" in md and "- plain: OOM" in md


@needs_memtracker
@pytest.mark.parametrize("jobs", [pytest.param(1, id="in-process"),
                                  # spawned processes each import torch: seconds of start-up for two cells
                                  pytest.param(2, id="two-processes", marks=pytest.mark.slow)])
def test_predicted_table_is_llama_ref_memory_s_prediction(tmp_path, jobs):
    argv = TINY + ["--predict", "--cells", "plain,GA+GC+MP+LoRA", "--ga", "4", "--jobs", str(jobs)]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["mode"] == "predicted"
    bench = BenchConfig(**{**data["config"]})
    for r in data["cells"]:
        cell = Cell.parse(r["cell"])
        expected = predict_step_memory(bench.train_config(cell), 2, 32)
        assert r["peak_mb"] == pytest.approx(expected.peak_mb, rel=1e-9)
    md = (tmp_path / "bench.md").read_text()
    assert "| **Runtime (secs)** |" not in md  # nothing ran
    assert "not run" in md  # the 14 cells not selected


@pytest.mark.parametrize("gc,lora", [(False, False), (True, True)])
def test_a_micro_batchs_flops_depend_on_gc_and_lora_only(gc, lora):
    # What lets llama-bench count FLOPs once per (GC, LoRA) pair instead of once per cell.
    args = ModelArgs.preset("tiny", n_layers=1, max_seq_len=16)
    counts = {(mp, ga): predict_step_flops(args, 2, 16, mp=mp, ga=ga, gc=gc, lora=lora)
              for mp in ("off", "bf16", "fp16") for ga in (1, 4)}
    assert len(set(counts.values())) == 1, counts
    other = predict_step_flops(args, 2, 16, gc=not gc, lora=lora)
    assert other != counts[("off", 1)]  # a count that changes where it must (GC recomputes the blocks)


def _record(cell: Cell, **values) -> dict:
    cats = dict(parameter=100.0, activation=50.0, gradient=100.0, **{"optimizer state": 0.0}, temporary=10.0)
    cats.update({k.replace("_", " "): v for k, v in values.items() if k not in ("peak", "flops", "runtime")})
    return {"cell": cell.name, "status": "ok", "category_peaks_mb": cats, "peak_mb": values.get("peak", 300.0),
            "flops_per_micro_batch": values.get("flops", 1e9), "runtime_s": values.get("runtime", 10.0)}


def test_analysis_reports_each_techniques_median_ratio_and_judges_the_seed():
    # A made-up matrix with known effects: GC divides activations by 4 and adds a third of the FLOPs; LoRA
    # removes 99 % of the gradient; nothing else changes anything.
    records = []
    for c in CELLS:
        records.append(_record(c, activation=50.0 / (4 if c.gc else 1), gradient=1.0 if c.lora else 100.0,
                               flops=1e9 * (4 / 3 if c.gc else 1)))
    result = analysis(records)
    gc, lora, ga = result["GC"], result["LoRA"], result["GA"]
    assert gc["activation"]["median"] == pytest.approx(0.25) and gc["activation"]["pairs"] == 8
    assert gc["activation"]["arrow"] == "↓" == gc["activation"]["seed"]
    assert gc["FLOPs"]["arrow"] == "↑" and gc["gradient"]["arrow"] == "—"
    assert lora["gradient"]["median"] == pytest.approx(0.01) and lora["gradient"]["arrow"] == "↓"
    assert ga["optimizer state"]["median"] is None and ga["optimizer state"]["zero_pairs"] == 8
    table = analysis_table(result)
    gc_col = [line.split(" | ")[2] for line in table.splitlines()[2:]]
    assert any("↓ ×0.25" in cell and "**wrong**" not in cell for cell in gc_col)  # the seed was right there
    assert "seed ↑ **wrong**" in table  # e.g. the seed's GC gradient ↑: measured —
    opt_row = next(line for line in table.splitlines() if line.startswith("| optimizer state |"))
    assert opt_row.split(" | ")[1] == "— (0 in every pair)"  # nothing to judge the seed's ↑ by


def test_analysis_skips_cells_that_did_not_finish():
    records = [_record(c) for c in CELLS]
    records[0] = {"cell": CELLS[0].name, "status": "OOM", "error": "out of memory"}
    result = analysis(records)
    assert result["LoRA"]["peak"]["pairs"] == 7  # GA (the OOM cell) vs GA+LoRA has no pair


def test_packed_blocks_keep_labels_aligned_and_skip_blocks_without_targets():
    def example(n_prompt, n_response, start):
        ids = torch.arange(start, start + n_prompt + n_response)
        labels = ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    examples = [example(30, 2, 0), example(3, 20, 100)]  # a block of 2 x 8 inside the first prompt has no target
    stream = packed_blocks(examples, 2, 8)
    blocks = [next(stream) for _ in range(6)]
    for b in blocks:
        assert b["input_ids"].shape == b["labels"].shape == (2, 8)
        kept = b["labels"] != IGNORE_INDEX
        assert torch.equal(b["labels"][kept], b["input_ids"][kept])
        assert bool((b["labels"][:, 1:] != IGNORE_INDEX).any())
    assert int(blocks[0]["input_ids"][0, 0]) == 16  # the first block (ids 0-15) was all prompt: skipped


def test_synthetic_blocks_are_seeded_and_within_the_vocabulary():
    a, b = next(synthetic_blocks(300, 2, 16, seed=3)), next(synthetic_blocks(300, 2, 16, seed=3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_ids"], a["labels"])
    assert int(a["input_ids"].max()) < 300 and a["input_ids"].shape == (2, 16)
