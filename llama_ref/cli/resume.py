"""llama-finetune's resumable state, written after every invocation that ends on a whole step and read back by
``--resume``: bit-exact continuation on the same options (those in ``RESUMABLE`` may change).

One process: ``--out DIR/train_state.pt`` (rank 0; the trainable weights, optimizer, schedule, GradScaler, RNG and
the window losses so far). ``--dist``: ``torch.distributed.checkpoint`` (each rank writes its shards of the model
and optimizer state; DDP's replicated state is written once) in ``--out DIR/dist_state/``, beside it the run's step,
window losses, schedule, GradScaler and world size (``run.pt``, rank 0) and every rank's RNG state (``rng-R.pt``:
dropout masks come from each rank's own stream). It is written into ``dist_state.tmp/`` by every rank, then moved
into place by rank 0 once all have finished: a run stopped mid-write leaves the previous state whole. Resumable on
the same world size.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..formats.atomic import atomic_write
from ..train.config import TrainConfig
from ..train.trainer import Trainer

STATE_FILE = "train_state.pt"
DIST_DIR = "dist_state"
RUN_FILE = "run.pt"

# Options that may differ between a run and its resumption; every other one must match.
RESUMABLE = {"stop_after", "out", "resume", "log_every", "sample", "progress", "device", "threads"}

Losses = list[dict[str, Any]]


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> Optional[str]:
    """The options (other than those a resumption may change) that ``saved`` has otherwise, as flags, or None."""
    differ = [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]
    return ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in differ) or None


def save(cfg: TrainConfig, model: nn.Module, trainer: Trainer, step: int, losses: Losses, rank: int = 0) -> None:
    """The state after ``step`` into ``cfg.out``: with ``--dist`` every rank writes its shards, else rank 0 writes
    ``train_state.pt``. ``losses``: the whole run's window losses."""
    out = Path(cfg.out)
    if cfg.dist != "off":
        save_sharded(out, model, trainer, step, {"config": dataclasses.asdict(cfg), "losses": losses})
    elif rank == 0:
        state = _state(model, trainer, step, cfg, losses)
        atomic_write(out / STATE_FILE, lambda f: torch.save(state, f))


def restore(cfg: TrainConfig, model: nn.Module, trainer: Trainer) -> tuple[int, Losses]:
    """``cfg.out``'s state loaded into the run (every rank with ``--dist``); (the step it was written after, the
    window losses of the steps before). A missing state or other options are an error naming them."""
    if cfg.dist != "off":
        return restore_sharded(Path(cfg.out), model, trainer, lambda saved: config_differences(saved, cfg))
    return _restore(Path(cfg.out) / STATE_FILE, model, trainer, cfg)


# --- one process: train_state.pt --------------------------------------------------------------------------------

def _state(model: nn.Module, trainer: Trainer, step: int, cfg: TrainConfig, losses: Losses) -> dict[str, Any]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        "config": dataclasses.asdict(cfg), "step": step,
        "losses": losses,  # the whole run's history, so that a resumed run's metrics.json holds every step
        "model": {k: v for k, v in model.state_dict().items() if not cfg.lora or k in trainable},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _restore(path: Path, model: nn.Module, trainer: Trainer, cfg: TrainConfig) -> tuple[int, Losses]:
    """Load ``path`` into the run; the step it was written after and the window losses of the steps before."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (run once with --out {path.parent} first)")
    state = torch.load(path, map_location=cfg.device, weights_only=True)
    differ = config_differences(state["config"], cfg)
    if differ:
        raise ValueError(f"--resume: {path} was written with other options: {differ}")
    model.load_state_dict(state["model"], strict=not cfg.lora)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state.get("losses", []))  # a state of an earlier version has no history


# --- --dist: the sharded state ----------------------------------------------------------------------------------

def save_sharded(out: Path, model: nn.Module, trainer: Trainer, step: int, run: dict[str, Any]) -> None:
    """Every rank: write the state after ``step`` into ``out/dist_state`` (``run``: rank 0's config and window
    losses)."""
    import torch.distributed as dist
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


def restore_sharded(out: Path, model: nn.Module, trainer: Trainer,
                    check_config: Callable[[dict[str, Any]], Optional[str]]) -> tuple[int, Losses]:
    """Every rank: load ``out/dist_state`` into the run; (the step it was written after, the window losses before).
    ``check_config(saved)`` says what differs from this run's options (None: nothing). A missing state, another
    world size or other options are a DistributedError, alike on every rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ..train.distributed import DistributedError

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
