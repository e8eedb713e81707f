"""Data-parallel llama-finetune against one process on the same total work: the window losses (they must agree) and
the per-step time ratio, measured in one run (the host is shared: ratios, not absolute times, carry over).

    python scripts/bench_distributed.py                      # bench preset, 2 ranks x --ga 2 vs 1 process x --ga 4
    python scripts/bench_distributed.py --preset tiny --ranks 2 --ga 2 --steps 10 --batch-size 2

Each configuration runs as llama-finetune does (``torchrun --standalone --nproc_per_node N -m
llama_ref.cli.finetune --dist ddp|fsdp2``), one after the other, each rank with one thread; the time per step is
``runtime_s / steps`` from rank 0's metrics.json (the training loop only: no start-up, no export). Prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _finetune(out: Path, ranks: int, kind: str, ga: int, args: argparse.Namespace) -> dict:
    common = ["--preset", args.preset, "--ga", str(ga), "--max-steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--threads", "1", "--no-progress", "--log-every", "100000", "--out", str(out)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "llama_ref.cli.finetune", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m",
               "llama_ref.cli.finetune", "--dist", kind, *common]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ga", type=int, default=2, help="micro-batches per rank per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"1 process, --ga %d" % (args.ranks * args.ga): _finetune(Path(tmp, "one"), 1, "", args.ranks * args.ga,
                                                                         args)}
        for kind in ("ddp", "fsdp2"):
            runs[f"{args.ranks} ranks {kind}, --ga {args.ga}"] = _finetune(Path(tmp, kind), args.ranks, kind, args.ga,
                                                                         args)
    base_name = next(iter(runs))
    base = runs[base_name]
    base_losses = [r["loss"] for r in base["losses"]]
    per_step = {k: m["runtime_s"] / m["steps"] for k, m in runs.items()}
    print(f"preset {args.preset}, {args.steps} steps of {args.ranks * args.ga} micro-batches x {args.batch_size} "
          f"sequences (the same total work in each run)\n")
    print(f"{'run':<26} {'s/step':>8} {'ratio':>7} {'max rel. loss diff':>19} {'rank-0 peak RSS MB':>19}")
    for name, m in runs.items():
        losses = [r["loss"] for r in m["losses"]]
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses, base_losses))
        print(f"{name:<26} {per_step[name]:>8.4f} {per_step[name] / per_step[base_name]:>7.2f} {diff:>19.2e} "
              f"{m['peak_memory_mb']:>19.1f}")


if __name__ == "__main__":
    main()
