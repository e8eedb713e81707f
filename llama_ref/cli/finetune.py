"""``llama-finetune``: the seed report's training run (``--ga``, ``--mp``, ``--lora``, ``--gc``), done right.

One ``TrainConfig`` dataclass is the single source of the options: the command line is generated from its fields,
so defaults cannot drift between the two. Logging reports the *true* window loss (never the loss divided by the
accumulation steps), and ``--out DIR`` receives ``metrics.json``, the result (a Meta checkpoint, or a LoRA adapter)
and ``train_state.pt`` for ``--resume``, each written atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..train.config import TrainConfig
from ..train.data import DataError
from ..train.rng import seeded
from ..train.trainer import NonFiniteLossError
from . import finetune_run
from .finetune_run import METRICS_FILE, micro_batches  # noqa: F401 — this module's names before the split
from .options import dataclass_parser
from .resume import STATE_FILE

EXIT_OOM, EXIT_NONFINITE = 3, 4


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from TrainConfig's fields (names, types, defaults, help, choices)."""
    return dataclass_parser(TrainConfig, "llama-finetune", __doc__.split("\n\n")[0])


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(ns))
    except ValueError as e:
        parser.error(str(e))


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; return the metrics (also written to ``--out``). Raises NonFiniteLossError and
    out-of-memory errors after recording them in ``metrics.json`` (``main`` turns them into exit codes). Draws from
    ``cfg.seed``, leaving the caller's random state as it was; ``cfg.threads`` is applied by ``main``. With
    ``--dist``, every rank of torchrun's process group runs this; rank 0 alone prints and writes."""
    with _process_group(cfg) as (rank, world), seeded(cfg.seed, cfg.device):
        return _run(cfg, rank, world)


@contextlib.contextmanager
def _process_group(cfg: TrainConfig) -> Iterator[tuple[int, int]]:
    """(rank, world size): torchrun's process group for ``--dist`` (destroyed on exit; the other ranks' output
    silenced), else (0, 1)."""
    if cfg.dist == "off":
        yield 0, 1
        return
    import torch.distributed as dist
    from ..train.distributed import DistributedError, init_from_env
    rank, world = init_from_env(torch.device(cfg.device).type)
    _RAN.append(rank)
    try:
        with contextlib.ExitStack() as quiet:
            if rank != 0:
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            yield rank, world
        dist.barrier()  # no rank tears its group down while another still writes (rank 0) or gathers
    except DistributedError as e:  # raised alike on every rank, before any collective of the step
        print(f"llama-finetune: error: {e}", file=sys.stderr, flush=True)
        e.printed = True  # type: ignore[attr-defined]
        dist.barrier()  # every rank has said it before any exits (torchrun stops the others at the first exit)
        raise
    finally:
        dist.destroy_process_group()


_RAN: list[int] = []  # the ranks this process ran as (in a process group): see __main__ below


def _run(cfg: TrainConfig, rank: int = 0, world: int = 1) -> dict[str, Any]:
    run = finetune_run.build(cfg, rank, world)
    try:
        finetune_run.loop(run)
    finally:
        finetune_run.write_records(run)  # whatever ended the loop: metrics.json, and the state after a whole step
    if run.metrics["status"] == "ok":
        finetune_run.finish(run)
    return run.metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        run(cfg)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        print(f"llama-finetune: OUT OF MEMORY: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return EXIT_OOM
    except NonFiniteLossError as e:
        print(f"llama-finetune: stopped, non-finite loss: {e}; the last good state was kept"
              + (f" in {Path(cfg.out) / STATE_FILE}" if cfg.out else ""), file=sys.stderr)
        return EXIT_NONFINITE
    except (DataError, FileNotFoundError, ValueError) as e:
        if not getattr(e, "printed", False):
            print(f"llama-finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    if _RAN:
        # A rank under torchrun, its process group destroyed and every file written: leave without the interpreter's
        # teardown, where a gloo/FSDP2 thread still joinable aborted the process ("terminate called without an
        # active exception", SIGABRT) in about 1 of 10 FSDP2 runs on a loaded CPU — after the run had completed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
