"""Peak memory of one llama-finetune training step per configuration, measured and predicted, by category.

Measured with torch's MemTracker on real tensors (``llama_ref.perf.memory.measure_step_memory``), predicted on fake
tensors without allocating (``predict_step_memory``); then the seed report's plain Llama 3.2 1B run predicted at
several sequence lengths against its 11,624 MB. Run:
    python scripts/bench_finetune_memory.py [--preset bench] [--batch 4] [--seq 128]
"""
from __future__ import annotations

import argparse

import torch

from llama_ref.train.config import TrainConfig
from llama_ref.perf.memory import SEED_PEAK_MB, measure_step_memory, predict_step_memory, seed_setting_prediction

CONFIGS = {
    "full fp32": {},
    "full + bf16": dict(mp="bf16"),
    "full + GC": dict(gc=True),
    "LoRA fp32": dict(lora=True),
    "LoRA + bf16, fp32 base (the seed's)": dict(lora=True, mp="bf16", half_base=False),
    "LoRA + bf16, half base": dict(lora=True, mp="bf16"),
    "LoRA + bf16 + GC, half base": dict(lora=True, mp="bf16", gc=True),
}
CATEGORIES = ("parameter", "gradient", "optimizer state", "activation", "temporary")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, preset {args.preset}, batch {args.batch} x {args.seq}, {args.optimizer}, MiB\n")
    print("| configuration | " + " | ".join(CATEGORIES) + " | measured peak | predicted peak | / LoRA fp32 |")
    print("|---|" + "---|" * (len(CATEGORIES) + 3))
    rows = {}
    for name, kw in CONFIGS.items():
        cfg = TrainConfig(preset=args.preset, optimizer=args.optimizer, **kw)
        rows[name] = (measure_step_memory(cfg, args.batch, args.seq), predict_step_memory(cfg, args.batch, args.seq))
    base = rows["LoRA fp32"][0].peak_mb
    for name, (measured, predicted) in rows.items():
        cells = [f"{measured.breakdown_mb.get(c, 0.0):.1f}" for c in CATEGORIES]
        print(f"| {name} | " + " | ".join(cells) + f" | {measured.peak_mb:.1f} | {predicted.peak_mb:.1f} | "
              f"{measured.peak_mb / base:.2f} |")
    print(f"\nThe seed report's plain run (llama-3.2-1b, untied output, SGD, fp32, batch 1): {SEED_PEAK_MB:,.2f} MB\n")
    print("| sequence length | predicted MiB | vs the seed | prediction time s |")
    print("|---|---|---|---|")
    for seq_len in (64, 128, 256, 384, 512):
        r = seed_setting_prediction(seq_len)
        print(f"| {seq_len} | {r.peak_mb:,.1f} | {100 * (r.peak_mb / SEED_PEAK_MB - 1):+.2f} % | {r.seconds:.1f} |")


if __name__ == "__main__":
    main()
