"""llama-finetune under torchrun (--dist ddp|fsdp2) on CPU/gloo: the window losses of 2 ranks x --ga K equal one
process's --ga 2K; a window that cannot be split is a one-line error on every rank, never a hang; the options that
cannot go with --dist are refused up front."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llama_ref.cli.finetune import METRICS_FILE, main
from llama_ref.train.config import TrainConfig
from verify.checks.distributed import fsdp2_unavailable

COMMON = ["--max-steps", "3", "--threads", "1", "--no-progress", "--log-every", "1000"]


def _torchrun(n: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "llama_ref.cli.finetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _said(done: subprocess.CompletedProcess, message: str) -> int:
    """How many ranks printed ``llama-finetune: error: …message…`` (and no other error)."""
    n = done.stderr.count(message)
    return n if done.stderr.count("llama-finetune: error: ") == n else -1


def _losses(path) -> list[float]:
    return [r["loss"] for r in json.loads((path / METRICS_FILE).read_text())["losses"]]


@pytest.mark.slow  # three runs, two of them of two processes each
def test_two_ranks_train_on_the_micro_batches_of_one_process_with_twice_the_accumulation(tmp_path):
    assert main(["--ga", "4", "--out", str(tmp_path / "one"), *COMMON]) == 0
    single = _losses(tmp_path / "one")
    kinds = ["ddp"] + ([] if fsdp2_unavailable() else ["fsdp2"])
    for kind in kinds:
        done = _torchrun(2, "--dist", kind, "--ga", "2", "--out", str(tmp_path / kind), *COMMON)
        assert done.returncode == 0, done.stderr[-2000:]
        got = _losses(tmp_path / kind)
        assert len(got) == len(single) == 3
        # measured 6.0e-8 relative (fp32); the bound is 1e-6
        assert max(abs(a - b) / abs(b) for a, b in zip(got, single)) <= 1e-6, (kind, got, single)
        assert (tmp_path / kind / "checkpoint" / "consolidated.00.pth").is_file()  # rank 0's export, gathered


@pytest.mark.slow  # three processes
def test_a_window_with_fewer_micro_batches_than_ranks_is_one_line_on_every_rank(tmp_path):
    data = tmp_path / "four.json"  # 4 examples, 3 ranks x ga 1: windows of 3, then 1
    data.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": w}
                                for w in ("one", "two", "three", "four")]))
    done = _torchrun(3, "--dist", "ddp", "--data", str(data), "--max-steps", "5", "--threads", "1", "--no-progress",
                     "--log-every", "1")
    assert done.returncode != 0
    # one line per rank (counted as occurrences: the ranks share one stderr with torchrun's own lines)
    assert _said(done, "a window of 1 micro-batches cannot be split over 3 ranks") == 3, done.stderr
    assert "step 1/" not in done.stdout  # said before training, not at the window that cannot be split
    # torchrun itself reports the failed ranks with a traceback of its own (ChildFailedError); none of ours
    assert "llama_ref" not in "".join(line for line in done.stderr.splitlines() if line.lstrip().startswith("File"))


@pytest.mark.parametrize("flags, message", [
    (dict(dist="fsdp2", lora=True, mp="bf16", half_base=True), "--half-base with --dist fsdp2"),
    (dict(dist="fsdp2", mp="fp16"), "--mp fp16 with --dist fsdp2"),
    (dict(dist="ddp", sample=True), "--sample with --dist"),
])
def test_options_that_cannot_go_with_dist_are_refused_up_front(flags, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**flags)


def test_dist_without_torchrun_says_how_to_launch(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert main(["--dist", "ddp", "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --nproc_per_node N -m llama_ref.cli.finetune --dist" in err[0]


@pytest.mark.slow  # four runs of two or three processes
def test_a_sharded_state_resumes_bit_exactly_on_the_same_world_size_only(tmp_path):
    kind = "ddp" if fsdp2_unavailable() else "fsdp2"
    flags = ["--dist", kind, "--lora", "--ga", "2", "--max-steps", "4", "--threads", "1", "--no-progress"]
    for out, more in (("whole", ()), ("part", ("--stop-after", "2"))):
        done = _torchrun(2, *flags, "--out", str(tmp_path / out), *more)
        assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "part" / "dist_state" / "run.pt").is_file()
    done = _torchrun(2, *flags, "--out", str(tmp_path / "part"), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")  # the whole history, bit for bit (LoRA dropout
    assert json.loads((tmp_path / "part" / METRICS_FILE).read_text())["resumed_at_step"] == 2  # draws per rank)
    adapter = "adapter/adapter.safetensors"
    assert (tmp_path / "part" / adapter).read_bytes() == (tmp_path / "whole" / adapter).read_bytes()
    three = _torchrun(3, *flags, "--out", str(tmp_path / "part"), "--resume")
    assert three.returncode != 0 and _said(three, "was written by 2 ranks, this run has 3") == 3, three.stderr[-3000:]
