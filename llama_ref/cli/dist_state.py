"""The resumable state of a ``--dist`` run: ``torch.distributed.checkpoint`` (each rank writes its shards of the
model and optimizer state; DDP's replicated state is written once) in ``--out DIR/dist_state/``, beside it the run's
step, window losses, schedule, GradScaler and world size (``run.pt``, rank 0) and every rank's RNG state
(``rng-R.pt``: dropout masks come from each rank's own stream).

Written into ``dist_state.tmp/`` by every rank, then moved into place by rank 0 once all have finished: a run stopped
mid-write leaves the previous state whole. Resumable on the same world size, bit-exactly.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..formats.atomic import atomic_write
from ..train.distributed import DistributedError

DIST_DIR = "dist_state"
RUN_FILE = "run.pt"


def save(out: Path, model: nn.Module, trainer: Any, step: int, run: dict[str, Any]) -> None:
    """Every rank: write the state after ``step`` (``run``: rank 0's config and window losses)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = out / DIST_DIR, out / f"{DIST_DIR}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, trainer.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rng = {"rng": torch.get_rng_state(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    atomic_write(tmp / f"rng-{rank}.pt", lambda f: torch.save(rng, f))
    if rank == 0:
        meta = {**run, "step": step, "world": world,
                "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
                "scaler": trainer.scaler.state_dict() if trainer.scaler else None}
        atomic_write(tmp / RUN_FILE, lambda f: torch.save(meta, f))
    dist.barrier()  # every rank's shards are down
    if rank == 0:
        old = out / f"{DIST_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def restore(out: Path, model: nn.Module, trainer: Any,
            check_config: Callable[[dict[str, Any]], Optional[str]]) -> tuple[int, list[dict[str, Any]]]:
    """Every rank: load ``out/dist_state`` into the run; (the step it was written after, the window losses before).
    ``check_config(saved)`` says what differs from this run's options (None: nothing). A missing state, another
    world size or other options are a DistributedError, alike on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = out / DIST_DIR
    if not (path / RUN_FILE).is_file():
        raise DistributedError(f"--resume: {path} holds no state of a --dist run (run once with --dist and --out "
                               f"{out} first)")
    meta = torch.load(path / RUN_FILE, weights_only=True)
    world = dist.get_world_size()
    if meta["world"] != world:
        raise DistributedError(f"--resume: {path} was written by {meta['world']} ranks, this run has {world}: a "
                               "sharded state resumes on the same world size")
    differ = check_config(meta["config"])
    if differ:
        raise DistributedError(f"--resume: {path} was written with other options: {differ}")
    model_sd, optim_sd = get_state_dict(model, trainer.optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    set_state_dict(model, trainer.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(meta["scheduler"])
    if trainer.scaler is not None:
        trainer.scaler.load_state_dict(meta["scaler"])
    rng = torch.load(path / f"rng-{dist.get_rank()}.pt", weights_only=True)
    torch.set_rng_state(rng["rng"].cpu())
    if rng["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    return int(meta["step"]), list(meta["losses"])
