"""A host-speed reference: how fast this machine runs a fixed CPU workload shaped like the test suite.

The CPU suite's wall time differs about 2x between hosts of the same kind (the same 694 tests took 76 s on one host
and 130-180 s on another), so a suite timing means little without a figure for the host it ran on. This script
times a fixed, deterministic, single-threaded workload - small matmuls and attention-sized ops, forward + backward
+ AdamW step of llama_ref's tiny preset, and pure-Python work (the suite is partly interpreter-bound) - repeats it
and reports the median wall time of one repetition, the host's reference R (lower is faster).

Use: publish a suite timing T together with the R of the host that measured it. On a host with reference R' the
same suite is expected to take about T * R' / R. (Measure R on an otherwise idle machine, just before or after the
suite. In --json, the repetitions' spread and ``cpu_s``, the process CPU time, say how quiet it was: a wall time
well above the CPU time means other processes held the cores.)

    python scripts/host_speed.py               # host speed: 0.99 s (median of 5; torch 2.13.0, 2 cores)
    python scripts/host_speed.py --json        # the same, with each repetition and each part's median
    python scripts/host_speed.py --repeats 9   # more repetitions on a noisy machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from bench_common import cpu_model
from llama_ref.default import DEFAULT_SEED, default_model


def tensor_ops() -> None:
    """Small matmuls and attention-sized ops: dispatcher- and kernel-launch-bound, like the suite's unit tests."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=g) for _ in range(3))
    mask = torch.full((32, 32), float("-inf")).triu(1)
    for _ in range(1200):
        c = a @ b
        c = torch.tanh(c) + a
        scores = (q @ k.transpose(-1, -2)) / 4.0 + mask
        out = torch.softmax(scores, dim=-1) @ v
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True) + out
        F.rms_norm(out, (16,))
    for _ in range(18):
        big = torch.randn(256, 256, generator=g)
        for _ in range(8):
            big = torch.tanh(big @ big.T / 16.0)


def tiny_model() -> None:
    """Forward + backward + AdamW step of the tiny preset (fp32), the suite's most common workload."""
    model = default_model(DEFAULT_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.vocab_size, (2, 32), generator=g)
    for _ in range(90):
        logits = model(ids, 0)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for _ in range(60):
            model(ids[:, :16], 0)


class _Node:
    __slots__ = ("key", "children")

    def __init__(self, key: int):
        self.key, self.children = key, []


def pure_python() -> None:
    """Interpreter-bound work: strings and dicts, sorting, objects and method calls, integer arithmetic, JSON."""
    words = [f"tok{(i * 7919) % 1013}" for i in range(100000)]
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = json.dumps({"ranked": ranked, "words": words[:20000]})
    assert len(json.loads(text)["ranked"]) == len(ranked)
    nodes = [_Node(i) for i in range(60000)]
    for i in range(1, len(nodes)):
        nodes[(i - 1) // 3].children.append(nodes[i])
    stack, depth_sum = [(nodes[0], 0)], 0
    while stack:
        node, depth = stack.pop()
        depth_sum += depth
        stack.extend((c, depth + 1) for c in node.children)
    total = 0
    for i in range(1000000):
        total = (total * 31 + i) % 1000003
    assert total >= 0 and depth_sum > 0


PARTS = {"tensor_ops": tensor_ops, "tiny_model": tiny_model, "pure_python": pure_python}


def one_repetition() -> dict[str, float]:
    times = {}
    for name, part in PARTS.items():
        torch.manual_seed(0)
        start, cpu = time.perf_counter(), time.process_time()
        part()
        times[name], times[name + "_cpu"] = time.perf_counter() - start, time.process_time() - cpu
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (after one untimed warm-up)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of one line")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(1)  # as the suite runs: conftest pins one torch thread per (xdist) process
    one_repetition()  # warm-up: lazy imports (torch._dynamo via torch.optim), allocator, caches
    reps = [one_repetition() for _ in range(args.repeats)]
    totals = [sum(r[n] for n in PARTS) for r in reps]
    cpu = statistics.median(sum(r[n + "_cpu"] for n in PARTS) for r in reps)
    median = statistics.median(totals)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch_version = torch.__version__.split("+")[0]
    if args.json:
        print(json.dumps({
            "host_speed_s": round(median, 4), "repeats": args.repeats, "runs_s": [round(t, 4) for t in totals],
            "spread": round((max(totals) - min(totals)) / median, 4),
            "cpu_s": round(cpu, 4),  # process CPU time: well below host_speed_s means the machine was busy
            "parts_median_s": {n: round(statistics.median(r[n] for r in reps), 4) for n in PARTS},
            "torch": torch_version, "python": platform.python_version(), "cores": cores, "cpu": cpu_model(),
        }, indent=2))
    else:
        print(f"host speed: {median:.2f} s (median of {args.repeats}; torch {torch_version}, {cores} cores)")


if __name__ == "__main__":
    main()
