"""The per-rank peak of an FSDP2 training step, predicted without allocating (``llama-bench --predict
--world-size N``).

FSDP2 (``fully_shard`` on every block, then the root, as ``llama_ref.train.distributed.wrap`` does) keeps every
parameter, gradient and optimizer state sharded ÷ N; what a rank holds whole is its micro-batch's activations and
temporaries, the root's parameters (embedding, final norm, output: the root is not resharded after forward), the
block being computed (all-gathered) and the next one (prefetched); after backward everything is resharded. From the
one-process step predicted on fake tensors (:func:`~llama_ref.perf.memory.predict_step_memory`, one micro-batch)
and the model's shapes, for N > 1 (N = 1 is the one-process step):

* its peak's parameters, gradients and optimizer state ÷ N, and the rest of that peak whole;
* where that peak is in forward or early backward (it holds less than half the step's gradients: activations
  dominate), plus the root's parameters and 2 × the largest block's, all-gathered;
* where it is at the optimizer step (every gradient exists: parameters dominate), nothing is gathered then; the
  forward's peak — parameters and optimizer state ÷ N, the activations' own peak, the root and 2 blocks — is
  taken where it is larger. Measured against
torch's ``FSDPMemTracker`` on 2 CPU ranks (``scripts/bench_fsdp2_memory.py``): within 10 % (docs/distributed.md).
Modelled for fp32 parameters (``--mp`` under FSDP2 is its ``MixedPrecisionPolicy``: not predicted) and one
micro-batch per rank per step (``FSDPMemTracker`` follows one forward per step).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import torch

from ..args import ModelArgs
from ..train.config import TrainConfig
from .memory import MemoryReport, build_like_finetune, model_args, predict_step_memory
from .peak import MiB


def unsharded_bytes(args: ModelArgs, cfg: TrainConfig) -> tuple[float, float]:
    """(root parameters, the largest block's parameters), MiB, of the model ``cfg`` builds (LoRA included)."""
    with torch.device("meta"):
        model = build_like_finetune(args, cfg)
    block = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.layers)
    in_blocks = {id(p) for layer in model.layers for p in layer.parameters()}
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    return root / MiB, block / MiB


def predict_fsdp2_rank_memory(cfg_or_args: Union[TrainConfig, ModelArgs], batch_size: int, seq_len: int,
                              world_size: int, **options: Any) -> MemoryReport:
    """One rank's peak (MiB) in an FSDP2 step over ``world_size`` ranks, each with a micro-batch of
    ``batch_size`` × ``seq_len``; arguments as :func:`predict_step_memory`."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    base = cfg_or_args if isinstance(cfg_or_args, TrainConfig) else TrainConfig()
    cfg = dataclasses.replace(base, **options)
    if cfg.mp != "off":
        raise ValueError("--mp under FSDP2 is its MixedPrecisionPolicy (bf16 all-gathers, fp32 shards): the FSDP2 "
                         "prediction models fp32 parameters only")
    one = predict_step_memory(cfg_or_args, batch_size, seq_len, ga=1, **options)
    if world_size == 1:
        return dataclasses.replace(one, device=f"{one.device}, FSDP2 on 1 rank: the one-process step")
    kinds = ("parameter", "gradient", "optimizer state")
    sharded = {k: one.breakdown_mb.get(k, 0.0) for k in kinds}
    rest = one.peak_mb - sum(sharded.values())
    root, block = unsharded_bytes(model_args(cfg_or_args, dataclasses.replace(cfg, batch_size=batch_size)), cfg)
    gathered = {"root parameters (unsharded)": root, "block parameters (computing + prefetched)": 2 * block}
    at_peak = {f"{k} (sharded)": v / world_size for k, v in sharded.items()}
    if sharded["gradient"] < 0.5 * one.category_peaks_mb.get("gradient", 0.0):  # the peak is in forward
        breakdown = {**at_peak, **gathered, "activations, temporaries": rest}
    else:  # the peak is the optimizer step's; the forward's may still be larger
        step = {**at_peak, "activations, temporaries": rest}
        forward = {"parameter (sharded)": sharded["parameter"] / world_size,
                   "optimizer state (sharded)": sharded["optimizer state"] / world_size, **gathered,
                   "activations, temporaries": one.category_peaks_mb.get("activation", 0.0)}
        breakdown = max(step, forward, key=lambda b: sum(b.values()))
    return MemoryReport(sum(breakdown.values()), breakdown, f"{one.device}, FSDP2 on {world_size} ranks",
                        "MemTracker on FakeTensorMode + FSDP2 model", one.seconds)
