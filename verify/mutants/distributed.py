"""The bug zoo of property 6 (data-parallel training): ``DistributedTrainer`` subclasses, each overriding the one
decision it gets wrong. Outside :data:`verify.mutants.MUTANTS` (every check runs on every mutant there; these need
spawned ranks): ``DIST_ZOO``, run by ``check_distributed_many`` in one spawn per world size.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from llama_ref.train.distributed import DistributedTrainer, split_window
from llama_ref.train.trainer import Batch

from .base import Mutant, collector

PROP = "distributed"
DIST_ZOO: list[Mutant] = []
# Mutants only FSDP2 can show (a DDP gradient is whole on every rank, its local norm the global one): where FSDP2
# does not run, they are not applicable, never "missed".
FSDP2_ONLY = frozenset({"dist_clip_local_shard_norm"})
mutant = collector(DIST_ZOO, PROP)
ZOO = DIST_ZOO  # the name the properties' registry reads


@mutant("dist_per_rank_token_mean",
        "each rank divides its loss by its own target count: DDP's average then gives a mean of per-rank means",
        "the data-parallel factor of the accumulation fix, transformers#34511", component="trainer_cls")
class _PerRankMean(DistributedTrainer):
    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return max(sum(self.count_targets(b["labels"]) for b in window), 1)


def _sum_hook(state, bucket):
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


@mutant("dist_grads_not_averaged",
        "the gradient reduction sums over the ranks without dividing by the world size (a DDP comm hook; under "
        "FSDP2, the averaged shards multiplied back by the world size)",
        "FSDP2 on gloo in torch 2.7.0 returning world-size-multiplied gradients, pytorch#162338",
        component="trainer_cls")
class _NotAveraged(DistributedTrainer):
    # FSDP2's own way, set_gradient_divide_factor(1.0), makes its reduce-scatter a PREMUL_SUM, which gloo refuses:
    # the rank raises in backward at a point the other ranks may already have passed, and the job's later cases lose
    # their results (seen as a flaky spawn). The sum is the average times the world size: that is what it does here.
    def __init__(self, model, optimizer, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        if self.kind == "ddp":
            model.register_comm_hook(None, _sum_hook)

    def prepare_gradients(self, loss: float):  # after the last backward, before clipping (clipped or not)
        if self.kind != "ddp":
            with torch.no_grad():
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(dist.get_world_size())
        return super().prepare_gradients(loss)


@mutant("dist_divided_twice",
        "the loss divided by the global target count and then averaged by DDP/FSDP2 as well: gradients 1/W",
        "the inverse of transformers#34511's fix: a global token mean without undoing the average over ranks",
        component="trainer_cls")
class _DividedTwice(DistributedTrainer):
    def loss_divisor(self, batch: Batch, window: Sequence[Batch], window_tokens: int) -> float:
        return window_tokens


@mutant("dist_sync_off_by_one",
        "gradients synchronised on every micro-batch but the last (the no_sync condition inverted): the last "
        "micro-batch's gradients stay rank-local",
        "FunASR#3472 (found with a 2-rank CPU repro)", component="trainer_cls")
class _SyncOffByOne(DistributedTrainer):
    def gradient_sync(self, index: int, count: int):
        return self._sync(index != count - 1)


@mutant("dist_sync_every_micro_batch",
        "gradients synchronised on every micro-batch of a window (no no_sync / set_requires_gradient_sync): the same "
        "numbers, K times the communication",
        "karpathy/nanochat#33 and huggingface/accelerate#106 (DDP without no_sync); NVIDIA/cosmos-framework#161 "
        "(FSDP2: a DDP-only no_sync helper made every micro-step reduce, 4x the step time)", component="trainer_cls")
class _SyncEveryMicroBatch(DistributedTrainer):
    def gradient_sync(self, index: int, count: int):
        return self._sync(True)


@mutant("dist_clip_local_shard_norm",
        "clipping by the norm of the rank's own gradient shard (FSDP2) instead of the global norm",
        "clip_grad_norm_ applied to local shards; FSDP's documented reason for FullyShardedDataParallel.clip_grad_norm_",
        component="trainer_cls")
class _ClipLocalNorm(DistributedTrainer):
    def clip_gradients(self) -> float:
        local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in self.params
                 if p.grad is not None]
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in local))
        coef = min(1.0, self.clip / (norm + 1e-6))
        with torch.no_grad():
            for g in local:
                g.mul_(coef)
        return norm


@mutant("dist_same_data_every_rank",
        "every rank trains on rank 0's share of the window (no DistributedSampler): the others' micro-batches are "
        "never seen",
        "a DataLoader without a DistributedSampler under DDP", component="trainer_cls")
class _SameData(DistributedTrainer):
    def local_window(self, window: Sequence[Batch]) -> list[Batch]:
        return split_window(window, 0, self.world)  # rank 0's share is the longest: no rank waits on another


@mutant("dist_loss_from_rank0",
        "the logged loss is each rank's own share's mean, not all-reduced: rank 0 logs its micro-batches only",
        "logging the local loss on rank 0 (the loss curves of transformers#34511's report)", component="trainer_cls")
class _LocalLoss(DistributedTrainer):
    def window_loss(self, sums: Sequence[torch.Tensor], window: Sequence[Batch], window_tokens: int) -> float:
        local = sum(self.count_targets(b["labels"]) for b in window)
        return float(sum(float(s) for s in sums)) / max(local, 1)


@mutant("dist_clip_on_rank0_only",
        "gradients clipped on rank 0 only: the other ranks step unclipped and drift from rank 0, which under DDP "
        "stays right for the whole first window (it sees the drift only through the next window's shared gradients: "
        "a check of rank 0 alone misses it in a one-window run)",
        "a training step inside an `if rank == 0:` block meant for logging; per-rank divergence that no rank-0 "
        "metric shows: karpathy/nanochat#857 (the learning rate diverging between ranks)", component="trainer_cls")
class _ClipOnRank0(DistributedTrainer):
    def clip_gradients(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        kept = None if dist.get_rank() == 0 else [g.detach().clone() for g in grads]
        norm = super().clip_gradients()  # every rank takes part in the norm's collective: nobody waits
        if kept is not None:
            with torch.no_grad():
                for g, k in zip(grads, kept):
                    g.copy_(k)
        return norm
