"""Peak memory of one training step by how the loss is computed — from full logits, chunked (``--loss-chunk``) or
fused with the output projection (``--fused-loss``) — measured and predicted.

Measured with torch's MemTracker on real tensors (``llama_ref.perf.memory.measure_step_memory``) on the bench
model's shape with Llama 3's vocabulary (128,256: there the logits are the step's largest activation; the bench
preset's own 512 words make every loss path alike), predicted on fake tensors for the same step; then the seed's
Llama 3.2 1B shape predicted at batch 1 × 2,048 positions, LoRA + gradient checkpointing + bf16. Run:
    python scripts/bench_loss.py [--batch 2] [--seq 256] [--chunk 256]
"""
from __future__ import annotations

import argparse

import torch

from llama_ref.args import ModelArgs
from llama_ref.perf.memory import measure_step_memory, predict_step_memory
from llama_ref.train.config import TrainConfig

SETTING = dict(lora=True, mp="bf16", gc=True, optimizer="adamw")


def paths(chunk: int) -> dict[str, dict]:
    return {"full logits": {}, f"--loss-chunk {chunk}": dict(loss_chunk=chunk),
            f"--fused-loss --loss-chunk {chunk}": dict(fused_loss=True, loss_chunk=chunk)}


def logits_mib(args: ModelArgs, tokens: int) -> str:
    n = tokens * args.vocab_size
    return f"{n * 2 / 2**20:,.0f} MiB in bf16, {n * 4 / 2**20:,.0f} MiB in fp32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--big-seq", type=int, default=2048)
    ap.add_argument("--big-chunk", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = ModelArgs.preset("bench", vocab_size=128256, max_seq_len=max(1024, args.seq))
    tokens = args.batch * args.seq
    print(f"torch {torch.__version__}; LoRA + GC + bf16, AdamW; MiB\n")
    print(f"bench shape (dim {bench.dim}, {bench.n_layers} layers) with a 128,256 vocabulary, batch {args.batch} x "
          f"{args.seq}: the logits are {logits_mib(bench, tokens)}\n")
    print("| loss | measured peak | predicted peak | predicted / measured | measured / full logits |")
    print("|---|---|---|---|---|")
    full = None
    for name, options in paths(args.chunk).items():
        cfg = TrainConfig(preset="bench", **SETTING, **options)
        measured = measure_step_memory(cfg, args.batch, args.seq, args=bench).peak_mb
        predicted = predict_step_memory(bench, args.batch, args.seq, **SETTING, **options).peak_mb
        full = full or measured
        print(f"| {name} | {measured:,.1f} | {predicted:,.1f} | {predicted / measured:.3f} | {measured / full:.3f} |",
              flush=True)
    big = ModelArgs.preset("llama-3.2-1b")
    print(f"\nllama-3.2-1b, batch 1 x {args.big_seq}, predicted: the logits are {logits_mib(big, args.big_seq)}\n")
    print("| loss | predicted peak | parameter | activation | temporary | saved vs full logits |")
    print("|---|---|---|---|---|---|")
    full = None
    for name, options in paths(args.big_chunk).items():
        r = predict_step_memory(big, 1, args.big_seq, **SETTING, **options)
        full = full or r.peak_mb
        b = r.breakdown_mb
        print(f"| {name} | {r.peak_mb:,.1f} | {b['parameter']:,.1f} | {b['activation']:,.1f} | "
              f"{b['temporary']:,.1f} | {full - r.peak_mb:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
