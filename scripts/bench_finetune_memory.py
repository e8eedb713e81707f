"""Peak memory of one llama-finetune training step per configuration, by category, with torch's MemTracker.

Builds each model exactly as ``llama-finetune`` does (``build_model``), takes one warm-up step, then tracks the
second step. Run:  python scripts/bench_finetune_memory.py [--preset bench] [--batch 4] [--seq 128]
"""
from __future__ import annotations

import argparse
import types

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from llama_ref.finetune import TrainConfig, build_model
from llama_ref.trainer import Trainer

CONFIGS = {
    "full fp32": {},
    "full + bf16": dict(mp="bf16"),
    "full + GC": dict(gc=True),
    "LoRA fp32": dict(lora=True),
    "LoRA + bf16, fp32 base (the seed's)": dict(lora=True, mp="bf16", half_base=False),
    "LoRA + bf16, half base": dict(lora=True, mp="bf16"),
    "LoRA + bf16 + GC, half base": dict(lora=True, mp="bf16", gc=True),
}


def tracked_step(cfg: TrainConfig, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    model, _ = build_model(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = Trainer(model, opt, precision=cfg.mp)
    trainer.step([batch])  # warm-up: lazily created state exists before tracking
    tracker = MemTracker()
    for p in model.parameters():
        # MemTracker hooks every parameter's gradient, and register_hook raises on a frozen one: mark those as
        # already hooked (they never get a gradient).
        if not p.requires_grad:
            noop = types.SimpleNamespace(remove=lambda: None)
            tracker._param_to_grad_hook_handles[p] = (noop, noop)
    tracker.track_external(model, opt, batch["input_ids"])
    with tracker:
        trainer.step([batch])
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return {str(getattr(k, "value", k)): v / 2**20 for k, v in peak.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokens = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens, "labels": tokens.clone()}
    rows = {name: tracked_step(TrainConfig(preset=args.preset, **kw), batch) for name, kw in CONFIGS.items()}
    cats = ["Parameter", "Gradient", "Optstate", "Activation", "Temp", "Total"]
    base = rows["LoRA fp32"]["Total"]
    print(f"torch {torch.__version__}, preset {args.preset}, batch {args.batch} x {args.seq}, SGD, MiB\n")
    print("| configuration | " + " | ".join(cats) + " | / LoRA fp32 |")
    print("|---|" + "---|" * (len(cats) + 1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r.get(c, 0.0):.1f}" for c in cats) + f" | {r['Total'] / base:.2f} |")


if __name__ == "__main__":
    main()
