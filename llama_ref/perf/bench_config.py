"""llama-bench's options: ``BenchConfig``, whose fields shared with llama-finetune are TrainConfig's own (defaults,
types and choices taken from it, changed only where the benchmark deliberately differs), and a cell's TrainConfig."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..train.config import TrainConfig, check_choices, option
from .cells import CELLS, Cell


_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def shared(name: str, **changes: Any) -> Any:
    """TrainConfig's field ``name`` as a BenchConfig field: its default, help and choices, with ``changes`` (a
    ``default``, ``help`` or ``choices``) only where the benchmark deliberately differs. ``train_config`` passes
    every shared field on to the cells' TrainConfig by name (``ga`` and ``mp`` per cell)."""
    f = _TRAIN_FIELDS[name]
    default = changes.pop("default", f.default)
    return dataclasses.field(default=default, metadata={**f.metadata, **changes, "shared": True})


@dataclass
class BenchConfig:
    preset: str = shared("preset", default="bench")
    ckpt_dir: Optional[str] = shared("ckpt_dir", help="Meta checkpoint directory (needs --tokenizer)")
    tokenizer: Optional[str] = shared("tokenizer", help="tokenizer.model of --ckpt-dir")
    steps: int = option("micro-batches per cell (the seed's steps; a GA cell takes steps / ga optimizer steps)",
                        default=32)
    batch_size: int = shared("batch_size", default=4)
    seq_len: int = option("tokens per sequence", default=256)
    ga: int = shared("ga", default=8, help="micro-batches per optimizer step in the GA cells (the seed used 8)")
    mp: str = shared("mp", default="bf16", help="the half dtype of the MP cells", choices=("bf16", "fp16"))
    gc_policy: str = shared("gc_policy", help="which blocks the GC cells recompute: all, seed or every:K")
    loss_chunk: int = shared("loss_chunk", help="loss computed this many positions at a time in every cell "
                                                "(0: full logits; with --fused-loss its chunk size, 0: 512)")
    fused_loss: bool = shared("fused_loss", help="every cell's loss by the fused linear cross-entropy "
                                                 "(llama_ref.loss.linear_cross_entropy)")
    optimizer: str = shared("optimizer", default="sgd", help="optimizer (the seed's peaks are plain SGD's)")
    lr: float = shared("lr", default=0.5, help="learning rate (with clipping at 1, SGD moves at most this far per "
                                               "step)")
    clip: float = shared("clip")
    data: str = option("instructions: the bundled set packed into blocks; synthetic: seeded tokens from a "
                       "skewed distribution (any vocabulary); auto: instructions when the vocabulary allows",
                       default="auto", choices=("auto", "instructions", "synthetic"))
    cells: Optional[str] = option("comma-separated cells to run (default: all 16), e.g. plain,LoRA,GC+MP+LoRA",
                                  default=None)
    predict: bool = option("predict every cell on fake tensors instead of running it", default=False)
    world_size: Optional[str] = option("with --predict: instead of the 16 cells, the per-rank peak of FSDP2 (the plain "
                                       "cell: full fine-tune, fp32, one micro-batch per rank) at these "
                                       "comma-separated world sizes, e.g. 1,2,4,8", default=None)
    jobs: Optional[int] = option("processes predicting cells in parallel (default: one per CPU)", default=None)
    device: str = shared("device")
    threads: Optional[int] = shared("threads", help="torch CPU threads per cell")
    memory_limit_mb: Optional[float] = option("an allocation past this is an OOM: on CUDA, MiB of the device; on "
                                              "CPU, MiB of address space (RLIMIT_AS, which also counts allocator "
                                              "arenas and thread stacks) beyond what the cell's process maps at "
                                              "start (each CPU record's address_space_mb says how much it needed)",
                                              default=None)
    timeout: float = option("seconds per cell before it is stopped and recorded as timeout", default=1800.0)
    isolate: bool = option("run each measured cell in a process of its own (a fresh allocator: nothing of one cell "
                           "is left in the next); --no-isolate runs them one after the other in this process, "
                           "without the start-up cost of a process per cell (CPU peaks are MemTracker's count of "
                           "live tensors, so they do not change; --memory-limit-mb and --timeout need isolation)",
                           default=True)
    seed: int = shared("seed", help="seed of weights, data and LoRA init")
    out: str = option("output directory", default="bench-out")
    plots: bool = option("write PNG plots (needs matplotlib: pip install .[bench])", default=True)
    progress: bool = shared("progress")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ga"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps % self.ga:
            raise ValueError(f"--steps {self.steps} must be a multiple of --ga {self.ga}: GA cells and the others "
                             "must train the same micro-batches for their runtimes to compare")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2 (the loss predicts token t+1 from token t), got {self.seq_len}")
        if self.loss_chunk < 0 or not self.lr > 0 or self.clip < 0 or not self.timeout > 0:
            raise ValueError("--loss-chunk and --clip must be >= 0, --lr and --timeout > 0")
        if self.memory_limit_mb is not None and not self.memory_limit_mb > 0:
            raise ValueError(f"--memory-limit-mb must be > 0, got {self.memory_limit_mb}")
        check_choices(self)
        if self.ckpt_dir and not self.tokenizer:
            raise ValueError("--ckpt-dir needs --tokenizer")
        if self.memory_limit_mb is not None and not self.isolate and not self.predict:
            raise ValueError("--memory-limit-mb needs isolated cells (it limits the cell's own process): drop "
                             "--no-isolate")
        self.selected_cells()  # validates --cells
        self.world_sizes()  # validates --world-size

    def world_sizes(self) -> list[int]:
        """``--world-size`` as integers (empty without it); ValueError naming the bad entry."""
        if not self.world_size:
            return []
        if not self.predict:
            raise ValueError("--world-size is a prediction: add --predict")
        sizes = []
        for entry in self.world_size.split(","):
            if not entry.strip().isdigit() or int(entry) < 1:
                raise ValueError(f"--world-size: {entry.strip()!r} is not a positive number of ranks")
            sizes.append(int(entry))
        return sizes

    def selected_cells(self) -> list[Cell]:
        if not self.cells:
            return list(CELLS)
        wanted = [Cell.parse(name) for name in self.cells.split(",") if name.strip()]
        return [c for c in CELLS if c in wanted]

    def train_config(self, cell: Cell) -> TrainConfig:
        """llama-finetune's configuration of ``cell``: every shared field as it is here, ``ga`` and ``mp`` on in the
        cells that have them, ``seq_len`` as the model's ``max_seq_len``."""
        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("shared") and f.name not in ("ga", "mp", "progress")}
        return TrainConfig(**same, max_seq_len=self.seq_len, ga=self.ga if cell.ga else 1,
                           mp=self.mp if cell.mp else "off", lora=cell.lora, gc=cell.gc, progress=False)
