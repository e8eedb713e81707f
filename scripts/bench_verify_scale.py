"""Each llama-verify check on a real-size model: its peak memory ÷ the model's fp32 bytes, and its wall time.

Every check runs in a process of its own (its peak resident memory is the process's, read with getrusage at its
end), on a preset with random weights (nothing downloaded), fp32, SDPA attention. Run:
    python scripts/bench_verify_scale.py [--preset llama-3.2-1b] [--check kv_cache ...]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHECKS = ("kv_cache", "lora_merge", "gradient_checkpointing", "grad_accum", "mixed_precision")


def child(preset: str, check: str) -> None:
    import torch

    from llama_ref.args import ModelArgs
    from llama_ref.model import Transformer, init_weights
    from verify.properties import Inputs, get

    torch.set_num_threads(2)
    model = init_weights(Transformer(ModelArgs.preset(preset, max_seq_len=256, max_batch_size=4, attn_impl="sdpa")), 0)
    n_params = sum(p.numel() for p in model.parameters())
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the model itself, and torch
    t0 = time.perf_counter()
    try:
        result = get(check)(model, Inputs(seed=0))
        verdict, case = result.verdict, result.case
    except MemoryError as e:
        verdict, case = "out of memory", str(e)
    print(json.dumps({"check": check, "verdict": verdict, "case": case, "seconds": time.perf_counter() - t0,
                      "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "before_bytes": base_rss, "model_bytes": 4 * n_params, "n_params": n_params}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--check", action="append", choices=CHECKS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.preset, args.child)
    print(f"| check ({args.preset}, fp32) | verdict | peak RSS ÷ model fp32 bytes | wall (s) | case |")
    print("|---|---|---|---|---|")
    for check in args.check or CHECKS:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--child", check],
                              capture_output=True, text=True)
        if proc.returncode != 0:  # killed for memory (SIGKILL: -9) or crashed
            why = "killed (out of memory)" if proc.returncode == -9 else f"exit {proc.returncode}"
            print(f"| {check} | {why} | - | {time.perf_counter() - t0:.0f} | {proc.stderr.strip()[-120:]} |",
                  flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {check} | {r['verdict']} | {r['peak_bytes'] / r['model_bytes']:.2f} "
              f"(model {r['model_bytes'] / 2**30:.2f} GiB, {r['n_params'] / 1e9:.2f} B params) | {r['seconds']:.0f} "
              f"| {r['case']} |", flush=True)


if __name__ == "__main__":
    main()
