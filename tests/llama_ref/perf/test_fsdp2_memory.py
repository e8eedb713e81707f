"""FSDP2's per-rank peak predicted (llama_ref.perf.fsdp2_memory, llama-bench --predict --world-size): one rank is the
one-process step; the sharded state divides by N; the gathered parts are the model's shapes; measured on 2 CPU ranks
with torch's FSDPMemTracker, within 10 % (slow lane)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_ref.args import ModelArgs
from llama_ref.cli.bench import main as bench_main
from llama_ref.perf.fsdp2_memory import predict_fsdp2_rank_memory
from llama_ref.perf.memory import predict_step_memory
from llama_ref.perf.peak import mem_tracker_available
from llama_ref.train.config import TrainConfig

pytestmark = pytest.mark.skipif(not mem_tracker_available(), reason="needs torch's MemTracker (torch >= 2.5)")
ROOT = Path(__file__).resolve().parents[3]
CFG = TrainConfig(preset="bench", clip=1.0)


def test_one_rank_is_the_one_process_step():
    assert predict_fsdp2_rank_memory(CFG, 2, 64, 1).peak_mb == pytest.approx(predict_step_memory(CFG, 2, 64, ga=1).peak_mb)


def test_the_state_divides_by_the_ranks_and_the_gathered_parts_are_the_model_s_shapes():
    a = ModelArgs.preset("bench")
    dh = a.dim // a.n_heads
    # written from the architecture: embedding + output + final norm; wq, wk, wv, wo, w1, w2, w3 and two norms
    root = (2 * a.vocab_size * a.dim + a.dim) * 4 / 2 ** 20
    block = (2 * a.dim * a.n_heads * dh + 2 * a.dim * a.n_kv_heads * dh + 3 * a.dim * a.ffn_hidden_dim
             + 2 * a.dim) * 4 / 2 ** 20
    two, four = (predict_fsdp2_rank_memory(CFG, 2, 64, n).breakdown_mb for n in (2, 4))
    assert two["root parameters (unsharded)"] == pytest.approx(root)
    assert two["block parameters (computing + prefetched)"] == pytest.approx(2 * block)
    for k in ("parameter (sharded)", "optimizer state (sharded)"):
        assert two[k] == pytest.approx(2 * four[k])
    assert two["parameter (sharded)"] == pytest.approx(predict_step_memory(CFG, 2, 64, ga=1).breakdown_mb["parameter"] / 2)


def test_llama_bench_predicts_each_world_size(tmp_path, capsys):
    assert bench_main(["--predict", "--preset", "tiny", "--seq-len", "32", "--batch-size", "1",
                       "--world-size", "1,2,4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "fsdp2.json").read_text())["rows"]
    assert [r["world_size"] for r in rows] == [1, 2, 4]
    assert rows[1]["peak_mb"] > rows[2]["peak_mb"]  # the shards shrink; the gathered root and blocks do not
    assert "FSDP2 per-rank peak, predicted" in capsys.readouterr().out


@pytest.mark.slow  # two spawned ranks
def test_the_prediction_is_within_ten_percent_of_fsdp_mem_tracker_on_two_cpu_ranks():
    pytest.importorskip("torch.distributed._tools.fsdp2_mem_tracker")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fsdp2_memory.py"), "--preset", "tiny",
                           "--batch-size", "1", "--seq-len", "64"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = [float(x) for x in re.findall(r"predicted/measured ([0-9.]+)", done.stdout)]
    assert len(ratios) == 2 and all(0.9 <= r <= 1.1 for r in ratios), done.stdout  # measured: 1.050 (tiny)
