"""FSDP2's per-rank peak, measured on CPU ranks and predicted (``llama_ref.perf.fsdp2_memory``), in one run.

    python scripts/bench_fsdp2_memory.py                     # the bench preset on 2 ranks, batch 2 x 128 tokens
    python scripts/bench_fsdp2_memory.py --preset tiny --ranks 2 --batch-size 1 --seq-len 64

Each rank (spawned, gloo, one thread) builds the model as llama-finetune does, shards it with ``wrap(model,
"fsdp2")``, takes one warm-up step (AdamW's moments come into being) and then one step of one micro-batch per rank
under torch's ``FSDPMemTracker`` (every tensor's storage, by FSDP category). Prints each rank's measured peak, the
prediction and their ratio, then the prediction for the llama-3.2-1b shape at 1, 2, 4 and 8 ranks.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MiB = 2 ** 20


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        from llama_ref.perf.memory import random_batch
        from llama_ref.train.config import TrainConfig, build_model
        from llama_ref.train.distributed import DistributedTrainer, wrap
        from llama_ref.train.optim import make_optimizer

        cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, dist="fsdp2", clip=1.0)
        model, _ = build_model(cfg, require_tokenizer=False)
        net = wrap(model, "fsdp2", device_type="cpu")
        optimizer = make_optimizer(cfg, model)
        trainer = DistributedTrainer(net, optimizer, clip=cfg.clip)
        batch = random_batch(model.params.vocab_size, args.batch_size, args.seq_len, "cpu", seed=rank)
        trainer.step([batch] * world)  # warm-up: the optimizer's state exists from here on
        tracker = FSDPMemTracker(net, optimizer)
        tracker.track_inputs((batch["input_ids"],))
        with tracker:
            trainer.step([batch] * world)
        (snap,) = tracker.get_tracker_snapshot("peak").values()
        parts = {str(getattr(k, "value", k)): v / MiB for k, v in snap.items() if v and str(k) != "Total"}
        torch.save({"peak": snap["Total"] / MiB, "parts": parts}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # the result is on disk: no interpreter teardown (a gloo/FSDP2 thread can abort it, SIGABRT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    from llama_ref.perf.fsdp2_memory import predict_fsdp2_rank_memory
    from llama_ref.train.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.ranks, os.path.join(tmp, "store"), args, tmp), nprocs=args.ranks)
        measured = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(args.ranks)]
    predicted = predict_fsdp2_rank_memory(TrainConfig(preset=args.preset, clip=1.0), args.batch_size, args.seq_len,
                                          args.ranks)
    print(f"{args.preset}, FSDP2 on {args.ranks} CPU ranks, one micro-batch of {args.batch_size} x {args.seq_len} "
          "per rank, AdamW, clipping: per-rank peak, MiB\n")
    print(f"predicted {predicted.peak_mb:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in predicted.breakdown_mb.items()))
    for r, m in enumerate(measured):
        print(f"rank {r} measured {m['peak']:.2f} (FSDPMemTracker; predicted/measured {predicted.peak_mb / m['peak']:.3f}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in m["parts"].items()))
    print("\nllama-3.2-1b, AdamW, batch 1 x 384 per rank, predicted per-rank peak, MiB")
    for n in (1, 2, 4, 8):
        r = predict_fsdp2_rank_memory(TrainConfig(preset="llama-3.2-1b", clip=1.0), 1, 384, n)
        print(f"N={n}: {r.peak_mb:,.1f}  (" + ", ".join(f"{k} {v:,.1f}" for k, v in r.breakdown_mb.items() if v) + ")")


if __name__ == "__main__":
    main()
