"""Data-parallel fine-tuning over ranks (``torchrun``, or any initialised process group): DDP or FSDP2.

Every rank is handed the same window of micro-batches and runs its own contiguous share (:func:`split_window`), so
that N ranks train on exactly the micro-batches of one process with ``--ga N×ga``. The loss stays the window's
token mean: the target count is all-reduced over the ranks before the first backward, and each micro-batch's loss
sum is divided by that *global* count over the world size — DDP and FSDP2 average the gradients over the ranks,
which the world size in the divisor undoes. Gradients are synchronised on the last micro-batch of a share only
(DDP's ``no_sync()``, FSDP2's ``set_requires_gradient_sync``); a rank with a shorter share runs empty micro-batches
(labels all ignored: gradient exactly zero) so that every rank makes the same collective calls. Clipping is by the
global norm (FSDP2's gradients are sharded DTensors: ``clip_grad_norm_`` reduces over the shards); the logged loss
is all-reduced. Each of these decisions is a method, for the bug zoo's trainers to override.
"""
from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..loss import IGNORE_INDEX
from .trainer import Batch, Trainer

KINDS = ("ddp", "fsdp2")


class DistributedError(ValueError):
    """A run that cannot be split over the ranks; raised identically on every rank, before any collective."""


def split_window(window: Sequence[Batch], rank: int, world: int) -> list[Batch]:
    """Rank ``rank``'s contiguous share of ``window``: shares differ in length by at most one, the first ranks
    take the longer ones. DistributedError when the window has fewer micro-batches than there are ranks."""
    if len(window) < world:
        raise DistributedError(f"a window of {len(window)} micro-batches cannot be split over {world} ranks: every "
                               f"rank needs at least one (use --ga >= 1 per rank and a dataset of at least "
                               f"{world} micro-batches per window)")
    base, extra = divmod(len(window), world)
    start = rank * base + min(rank, extra)
    return list(window[start:start + base + (rank < extra)])


def empty_like(batch: Batch) -> Batch:
    """``batch`` with every label ignored: its loss sum is 0 and its gradient exactly zero."""
    return {**{k: v for k, v in batch.items() if k != "labels"}, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def init_from_env(device_type: str) -> tuple[int, int]:
    """The process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…): gloo on CPU, NCCL on
    CUDA (each rank on device ``LOCAL_RANK``); (rank, world size)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"--dist needs torchrun's environment (missing {', '.join(missing)}): run "
                               "torchrun --nproc_per_node N -m llama_ref.cli.finetune --dist ddp|fsdp2 …")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap(model: nn.Module, kind: str, *, device_type: str, mp: Optional[torch.dtype] = None) -> nn.Module:
    """``model`` data-parallel: ``DistributedDataParallel`` around it, or FSDP2 (``fully_shard`` on each block, then
    the root; ``mp``: a ``MixedPrecisionPolicy`` computing in that dtype, reducing in fp32) in place. Build the
    optimizer afterwards: FSDP2 replaces the parameters by sharded DTensors."""
    if kind not in KINDS:
        raise DistributedError(f"--dist {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [torch.cuda.current_device()] if device_type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32) if mp is not None else MixedPrecisionPolicy()
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class DistributedTrainer(Trainer):
    """:class:`~llama_ref.train.trainer.Trainer` over the ranks of the default process group; ``model`` is the
    :func:`wrap`-ped model, every rank calls :meth:`step` with the same whole window."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.kind = "ddp" if hasattr(model, "no_sync") else "fsdp2"
        if self.kind == "fsdp2" and self.scaler is not None:
            raise DistributedError("--mp fp16 with --dist fsdp2: FSDP2 needs a sharded GradScaler; use --mp bf16")

    @property
    def module(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def local_window(self, window: Sequence[Batch]) -> list[Batch]:
        mine = split_window(window, self.rank, self.world)
        longest = -(-len(window) // self.world)
        return mine + [empty_like(mine[-1])] * (longest - len(mine))  # the same collectives on every rank

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        device = next(self.module.parameters()).device
        t = value.to(device)
        dist.all_reduce(t)
        return t

    def window_tokens(self, window: Sequence[Batch]) -> int:
        local = sum(self.count_targets(b["labels"]) for b in window)
        return int(self._all_reduce(torch.tensor(local, dtype=torch.int64)))

    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return window_tokens / self.world  # DDP and FSDP2 average over the ranks: undone here

    def gradient_sync(self, index: int, count: int) -> AbstractContextManager:
        return self._sync(index == count - 1)

    @contextlib.contextmanager
    def _sync(self, on: bool) -> Iterator[None]:
        if self.kind == "ddp":
            with (contextlib.nullcontext() if on else self.model.no_sync()):
                yield
        else:
            self.model.set_requires_gradient_sync(on)
            yield

    def window_loss(self, sums: Sequence[torch.Tensor], window: Sequence[Batch], window_tokens: int) -> float:
        total = torch.zeros((), dtype=torch.float32)
        for loss_sum in sums:
            total += loss_sum.float().cpu()
        return float(self._all_reduce(total)) / window_tokens

    def clip_gradients(self) -> float:
        return float(full(torch.nn.utils.clip_grad_norm_(self.params, self.clip)))
