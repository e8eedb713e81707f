"""Padded vs packed batches (``llama-finetune --pack``): the fraction of padding, tokens per second, the step's peak
memory and the window losses, on the bundled instruction data and on a length distribution like Alpaca's.

Both runs train the same windows of examples (``--pack`` packs each window's own examples), so their window losses
must agree to fp32 rounding; the bench model (``--preset bench``, CPU, one thread), LoRA without dropout (its
random masks would differ between the two layouts), SGD. Peak memory by MemTracker over one step (the largest
window); tokens/s counts the examples' real tokens. Then the seed's 1B shape, padded and packed, predicted on fake
tensors (``llama_ref.perf.memory.predict_step_memory(..., packed=rows)``). Run:
    python scripts/bench_packing.py [--steps 8] [--batch 4] [--ga 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from llama_ref.args import ModelArgs
from llama_ref.default import default_tokenizer
from llama_ref.loss import IGNORE_INDEX
from llama_ref.model import Transformer, init_weights
from llama_ref.perf.peak import PeakTracker
from llama_ref.train.config import TrainConfig, prepare_for_training
from llama_ref.train.data import InstructionDataset, collate, default_dataset_path, load_records
from llama_ref.train.packing import packed_micro_batches
from llama_ref.train.trainer import Trainer

MAX_LEN = 256


def bundled() -> list[dict[str, torch.Tensor]]:
    return InstructionDataset(load_records(default_dataset_path()), default_tokenizer(), MAX_LEN).examples


def alpaca_like(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Lengths drawn like Alpaca's tokenized examples (log-normal: median ~120 tokens, a long tail cut at
    MAX_LEN), prompts a third of each; random token ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.6 + 4.8).clamp(8, MAX_LEN).long().tolist()
    out = []
    for length in lengths:
        ids = torch.randint(0, 512, (length,), generator=g)
        labels = ids.clone()
        labels[:max(1, length // 3)] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def windows(examples, batch: int, ga: int, pack: bool) -> list[list[dict[str, torch.Tensor]]]:
    size = batch * ga
    out = []
    for i in range(0, len(examples) - size + 1, size):
        group = examples[i:i + size]
        out.append(packed_micro_batches(group, MAX_LEN, ga) if pack else
                   [collate(group[j:j + batch]) for j in range(0, size, batch)])
    return out


def run(examples, batch: int, ga: int, pack: bool, steps: int) -> dict[str, float]:
    torch.manual_seed(0)  # the adapters' A: the same in both runs
    model = prepare_for_training(init_weights(Transformer(ModelArgs.preset("bench")), 0), TrainConfig(lora=True, lora_dropout=0.0))
    trainer = Trainer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    ws = windows(examples, batch, ga, pack)[:steps]
    real = sum(int(b["lengths"].sum()) for w in ws for b in w)
    slots = sum(b["input_ids"].numel() for w in ws for b in w)
    losses, t0 = [], time.perf_counter()
    for w in ws:
        losses.append(trainer.step(w).loss)
    seconds = time.perf_counter() - t0
    widest = max(ws, key=lambda w: sum(b["input_ids"].numel() for b in w))
    with PeakTracker(model, trainer.optimizer, widest[0]["input_ids"]) as tracker:
        trainer.step(widest)
    return {"padding": 1 - real / slots, "tokens/s": real / seconds, "peak": tracker.peak_mb, "losses": losses,
            "rows": sum(len(b["input_ids"]) for w in ws for b in w)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ga", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; bench model, LoRA, SGD; {args.steps} windows of {args.ga} x {args.batch} "
          f"examples, rows of {MAX_LEN} tokens\n")
    print("| data | batches | rows | padding | tokens/s | peak MiB | max window-loss difference (relative) |")
    print("|---|---|---|---|---|---|---|")
    for name, examples in (("bundled instructions", bundled()), ("Alpaca-like lengths", alpaca_like(400))):
        padded = run(examples, args.batch, args.ga, False, args.steps)
        packed = run(examples, args.batch, args.ga, True, args.steps)
        diff = max(abs(a - b) / abs(a) for a, b in zip(padded["losses"], packed["losses"]))
        for label, r in (("padded", padded), ("packed", packed)):
            print(f"| {name} | {label} | {r['rows']} | {r['padding']:.1%} | {r['tokens/s']:,.0f} | {r['peak']:.1f} | "
                  f"{diff:.1e} |" if label == "packed" else
                  f"| {name} | {label} | {r['rows']} | {r['padding']:.1%} | {r['tokens/s']:,.0f} | {r['peak']:.1f} | — |",
                  flush=True)
    predict_1b()


def predict_1b(n_docs: int = 16) -> None:
    """The seed's 1B shape (LoRA + GC + bf16, AdamW), one micro-batch of ``n_docs`` Alpaca-like examples: padded to
    the longest, and packed into rows of 512 and of 2,048 tokens — predicted on fake tensors."""
    from llama_ref.perf.memory import predict_step_memory
    from llama_ref.train.packing import pack
    lengths = [len(e["input_ids"]) for e in alpaca_like(n_docs, seed=1)]
    big = ModelArgs.preset("llama-3.2-1b")
    setting = dict(lora=True, mp="bf16", gc=True, optimizer="adamw")
    print(f"\nllama-3.2-1b, LoRA + GC + bf16, one micro-batch of {n_docs} Alpaca-like examples ({sum(lengths)} tokens, "
          f"the longest {max(lengths)}), predicted:\n")
    print("| batch | rows x tokens | padding | predicted peak MiB |")
    print("|---|---|---|---|")
    r = predict_step_memory(big, n_docs, max(lengths), **setting)
    print(f"| padded | {n_docs} x {max(lengths)} | {1 - sum(lengths) / (n_docs * max(lengths)):.1%} | "
          f"{r.peak_mb:,.1f} |", flush=True)
    for row_len in (512, 2048):
        rows = [[lengths[i] for i in row] for row in pack(lengths, row_len)]
        width = max(sum(row) for row in rows)
        r = predict_step_memory(big, len(rows), width, packed=rows, **setting)
        print(f"| packed, rows of {row_len} | {len(rows)} x {width} | {1 - sum(lengths) / (len(rows) * width):.1%} | "
              f"{r.peak_mb:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
