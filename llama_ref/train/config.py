"""What a training run is made of: ``TrainConfig`` (the one source of llama-finetune's options: the command line is
generated from its fields), the model built as it says (``build_model``) and prepared for training
(``prepare_for_training``: cache off, LoRA, the frozen base in half precision, gradient checkpointing), and the
trainer that steps it (``make_trainer``: optimizer, schedule, precision, clipping, data parallelism)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from ..args import ModelArgs
from ..generation import SEED_PROMPTS
from ..lora import ALL_TARGETS, apply_lora_to_llama
from ..loss import DEFAULT_LOSS_CHUNK, linear_cross_entropy
from ..model import Transformer, checkpoint_policy_layers, init_weights
from ..tokenizer import Tokenizer, default_tokenizer_path
from .optim import make_optimizer, make_scheduler
from .trainer import PRECISIONS, Trainer


def option(help: str, **kw: Any) -> Any:
    """A config field that is also a command-line flag (see ``dataclass_parser``): its default, help and choices."""
    return field(default=kw.pop("default"), metadata={"help": help, **kw})


def check_choices(config: Any) -> None:
    """ValueError naming the flag whose value is not among its field's ``choices``."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ValueError(f"--{f.name.replace('_', '-')} must be one of {choices}, got {getattr(config, f.name)!r}")


@dataclass
class TrainConfig:
    # model and data
    preset: str = option("model preset (ignored with --ckpt-dir)", default="tiny")
    ckpt_dir: Optional[str] = option("Meta checkpoint directory (params.json + consolidated.*.pth)", default=None)
    tokenizer: Optional[str] = option("tokenizer.model (default: the bundled SentencePiece model)", default=None)
    data: Optional[str] = option("Alpaca-style JSON/JSONL (default: the bundled instruction set)", default=None)
    max_seq_len: Optional[int] = option("truncate examples to this many tokens (default: the model's)", default=None)
    # the seed report's four techniques
    ga: int = option("micro-batches per optimizer step (gradient accumulation; the seed used 8)", default=1)
    mp: str = option("mixed precision", default="off", choices=tuple(PRECISIONS))
    half_base: Optional[bool] = option("with --mp and --lora, store the frozen base in the half dtype "
                                       "(default: on; off with --dist fsdp2)", default=None)
    lora: bool = option("train LoRA adapters only", default=False)
    lora_r: int = option("LoRA rank", default=16)
    lora_alpha: float = option("LoRA alpha (scaling alpha / r)", default=32.0)
    lora_dropout: float = option("dropout on the LoRA branch input", default=0.05)
    lora_targets: str = option("comma-separated targets among wq,wk,wv,wo,w1,w2,w3", default="wq,wv")
    gc: bool = option("gradient checkpointing", default=False)
    gc_policy: str = option("which blocks: all, seed (i %% 3 != 0) or every:K", default="all")
    loss_chunk: int = option("compute the loss this many positions at a time, each chunk's logits recomputed in "
                             "backward instead of kept (0: full logits; with --fused-loss its chunk size, 0: 512)",
                             default=0)
    pack: bool = option("pack several examples into each row (padding-free): positions restart and attention stays "
                        "inside each example; each window's examples are the ones it has without --pack",
                        default=False)
    pack_len: Optional[int] = option("with --pack, the tokens of a packed row (default: --max-seq-len, the model's)",
                                    default=None)
    split_long: bool = option("with --pack, cut an example longer than a row into pieces (each loses the context "
                              "before it) instead of refusing it", default=False)
    fused_loss: bool = option("fuse the output projection into the loss (llama_ref.loss.linear_cross_entropy): the "
                              "logits never exist whole; backward recomputes them a chunk at a time", default=False)
    # optimisation
    batch_size: int = option("sequences per micro-batch", default=1)
    lr: float = option("learning rate", default=1e-3)
    optimizer: str = option("optimizer", default="adamw", choices=("sgd", "adamw"))
    weight_decay: float = option("AdamW weight decay", default=0.0)
    schedule: str = option("LR schedule", default="constant", choices=("constant", "linear", "cosine"))
    warmup_steps: int = option("linear warm-up steps", default=0)
    clip: float = option("clip the gradient norm to this (0: no clipping)", default=1.0)
    epochs: int = option("passes over the data", default=1)
    max_steps: Optional[int] = option("train for this many optimizer steps (the schedule's length)", default=None)
    stop_after: Optional[int] = option("end this invocation after this many steps, keeping the schedule of the "
                                       "whole run (continue later with --resume)", default=None)
    seed: int = option("seed of weights (presets), data order, LoRA init and dropout", default=0)
    device: str = option("torch device", default="cpu")
    dist: str = option("data parallel over torchrun's ranks (each rank takes --ga micro-batches of every window of "
                       "ranks x ga): ddp or fsdp2; off: one process", default="off", choices=("off", "ddp", "fsdp2"))
    threads: Optional[int] = option("torch CPU threads (default: torch's choice; 1 is fastest for tiny models on "
                                    "a busy machine)", default=None)
    # output
    out: Optional[str] = option("directory for metrics.json, the result and train_state.pt", default=None)
    resume: bool = option("continue from --out DIR/train_state.pt, bit-exactly", default=False)
    log_every: int = option("print the window loss every N steps", default=10)
    sample: bool = option("print greedy generations on the seed's four prompts before and after", default=False)
    progress: bool = option("show a progress bar", default=True)

    def __post_init__(self) -> None:
        if (self.pack_len is not None or self.split_long) and not self.pack:
            raise ValueError("--pack-len and --split-long shape packed rows: add --pack")
        if self.loss_chunk < 0:
            raise ValueError(f"--loss-chunk must be >= 0 (0: full logits), got {self.loss_chunk}")
        for name in ("ga", "batch_size", "epochs", "lora_r", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_seq_len", "pack_len", "stop_after", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("--clip, --warmup-steps and --weight-decay must be >= 0")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"--weight-decay is AdamW's (decoupled); --optimizer {self.optimizer} takes none")
        check_choices(self)
        checkpoint_policy_layers(self.gc_policy, 1)  # validates the policy's syntax
        if self.half_base and not (self.lora and self.mp != "off"):
            raise ValueError("--half-base needs --lora and --mp fp16/bf16 (a trained weight must stay fp32)")
        if self.resume and not self.out:
            raise ValueError("--resume needs --out DIR holding train_state.pt")
        if self.dist == "fsdp2" and self.half_base:
            raise ValueError("--half-base with --dist fsdp2: FSDP2 shards parameters of one dtype; its "
                             "MixedPrecisionPolicy computes in the --mp dtype instead")
        if self.dist == "fsdp2" and self.mp == "fp16":
            raise ValueError("--mp fp16 with --dist fsdp2: FSDP2 needs a sharded GradScaler; use --mp bf16")
        if self.dist != "off" and self.sample:
            raise ValueError("--sample with --dist: generation runs in one process; sample the result instead")
        if self.ckpt_dir and not self.tokenizer:
            raise ValueError("--ckpt-dir needs --tokenizer")
        odd = [t for t in self.targets if t not in ALL_TARGETS]
        if odd or not self.targets:
            raise ValueError(f"--lora-targets {self.lora_targets!r}: {odd or 'none'} not among {','.join(ALL_TARGETS)} "
                             "(the blocks' projections; the vocabulary matrices' adapters are apply_lora_to_llama's, "
                             "exported with export_peft_adapter, not llama-finetune's adapter files)")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


def build_model(cfg: TrainConfig, *, require_tokenizer: bool = True) -> tuple[Transformer, Optional[Tokenizer]]:
    """The model ``cfg`` names (a Meta checkpoint, or a preset with seeded weights) prepared for training, and its
    tokenizer. A preset whose vocabulary is not the tokenizer's is a ValueError, or with ``require_tokenizer=False``
    (a benchmark on synthetic tokens) comes with tokenizer ``None``."""
    tokenizer: Optional[Tokenizer] = Tokenizer(cfg.tokenizer or default_tokenizer_path())
    if cfg.ckpt_dir:
        from ..formats.meta import load_model
        overrides: dict[str, Any] = dict(max_batch_size=max(cfg.batch_size, len(SEED_PROMPTS)))
        if cfg.max_seq_len:
            overrides["max_seq_len"] = cfg.max_seq_len
        model = load_model(cfg.ckpt_dir, device=cfg.device, dtype=torch.float32, tokenizer=tokenizer, **overrides)
    else:
        args = ModelArgs.preset(cfg.preset, max_batch_size=max(cfg.batch_size, len(SEED_PROMPTS)),
                                **({"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}))
        if args.vocab_size != tokenizer.n_words:
            if require_tokenizer:
                raise ValueError(f"preset {cfg.preset!r} has vocab_size {args.vocab_size} but the tokenizer has "
                                 f"{tokenizer.n_words} tokens; pass the model's own --tokenizer")
            tokenizer = None
        model = init_weights(Transformer(args), cfg.seed).to(cfg.device)
    return prepare_for_training(model, cfg), tokenizer


def prepare_for_training(model: Transformer, cfg: TrainConfig) -> Transformer:
    """What ``cfg`` does to a model before training, in place: cache off, LoRA (fp32 adapters; the frozen base in
    the half dtype with ``--mp``), gradient checkpointing, train mode."""
    model.kv_caching = False  # training never uses the cache
    if cfg.lora:
        apply_lora_to_llama(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets,
                            merge_weights=False, lora_dtype=torch.float32)
        if PRECISIONS[cfg.mp] is not None and cfg.half_base is not False and cfg.dist != "fsdp2":
            half_frozen_base(model, PRECISIONS[cfg.mp])
    if cfg.gc:
        model.set_gradient_checkpointing(cfg.gc_policy)
    return model.train()


def half_frozen_base(model: Transformer, half: torch.dtype) -> Transformer:
    """Store every frozen parameter in ``half``, in place (trainable ones keep their dtype): the frozen base of
    ``--mp --lora`` takes half the bytes, and autocast would cast it to ``half`` for every matmul anyway."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(half)
    return model


def make_trainer(cfg: TrainConfig, model: Transformer, *, total_steps: Optional[int] = None,
                 trainer_cls: Optional[type[Trainer]] = None, device_type: Optional[str] = None,
                 foreach: Optional[bool] = None, one_process: bool = False) -> Trainer:
    """The trainer ``cfg`` describes for ``model`` (built by ``build_model``): ``make_optimizer``'s optimizer,
    ``cfg.mp``, clipping at ``cfg.clip`` (0: none), the loss of ``cfg.loss_chunk`` and ``cfg.fused_loss``
    (:func:`loss_options`). ``total_steps``: the
    run's length, over which ``cfg.schedule`` runs (None: no schedule, the LR stays ``cfg.lr``).

    With ``cfg.dist`` (inside a process group): ``model`` wrapped by ``distributed.wrap`` before the optimizer is
    built (FSDP2 replaces the parameters; its ``MixedPrecisionPolicy`` computes in the ``--mp`` dtype instead of
    autocast) and stepped by ``DistributedTrainer``. ``trainer_cls`` replaces the trainer's class (a prediction's
    trainer on fake tensors), ``device_type`` the autocast and GradScaler device (default: ``cfg.device``'s),
    ``foreach`` is ``make_optimizer``'s; ``one_process=True`` ignores ``cfg.dist`` (a measurement or prediction of
    one process's step)."""
    device_type = device_type or torch.device(cfg.device).type
    net, precision = model, cfg.mp
    if cfg.dist != "off" and not one_process:
        from .distributed import DistributedTrainer, wrap
        fsdp_half = PRECISIONS[cfg.mp] if cfg.dist == "fsdp2" else None  # FSDP2's MixedPrecisionPolicy, no autocast
        net = wrap(model, cfg.dist, device_type=device_type, mp=fsdp_half)
        trainer_cls = trainer_cls or DistributedTrainer
        precision = "off" if fsdp_half is not None else cfg.mp
    optimizer = make_optimizer(cfg, model, foreach=foreach)  # after wrapping: FSDP2 replaces the parameters
    scheduler = (make_scheduler(optimizer, cfg.schedule, total_steps, cfg.warmup_steps)
                 if total_steps is not None else None)
    return (trainer_cls or Trainer)(net, optimizer, scheduler=scheduler, precision=precision,
                                    clip=cfg.clip or None, device_type=device_type, **loss_options(cfg))


def loss_options(cfg: TrainConfig) -> dict:
    """The Trainer's loss keywords for ``cfg``: ``loss_chunk`` (0: full logits), or with ``fused_loss`` a
    ``loss_kernel``, the fused linear cross-entropy in chunks of ``loss_chunk`` positions (0: its default)."""
    if not cfg.fused_loss:
        return {"loss_chunk": cfg.loss_chunk or None}
    return {"loss_kernel": functools.partial(linear_cross_entropy, chunk_size=cfg.loss_chunk or DEFAULT_LOSS_CHUNK)}
