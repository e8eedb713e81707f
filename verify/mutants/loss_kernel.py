"""The bug zoo of property 8 (chunked and fused losses): reductions over chunks, counts, upstream gradients, softcaps
and accumulators that real loss kernels got wrong. Each is llama_ref's fused kernel with one decision changed, given to
the check as its ``loss_kernel``; the last one leaves the kernel right and bypasses it in the model."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import llama_ref.loss as LL
import llama_ref.model as LM

from ..targets.loss_kernel import LossKernel
from .base import Mutant, collector

PROP = "loss_kernel"
ZOO: list[Mutant] = []
mutant = collector(ZOO, PROP)
ALL = frozenset({"bias", "chunk_size", "num_items_in_batch", "softcap"})


def _kernel(fn) -> LossKernel:
    return LossKernel(f"mutant {fn.__name__.strip('_')}", fn, ALL)


def _right(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
           num_items_in_batch=None, softcap=None):
    return LL.linear_cross_entropy(hidden, weight, labels, reduction=reduction, bias=bias, chunk_size=chunk_size,
                                   num_items_in_batch=num_items_in_batch, softcap=softcap)


def _chunk_means(hidden, weight, labels, bias, chunk_size, softcap) -> list[torch.Tensor]:
    """The mean loss of each chunk that holds a target."""
    means = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if bool((labels[rows] != LL.IGNORE_INDEX).any()):
            means.append(_right(hidden[rows], weight, labels[rows], bias=bias, chunk_size=chunk_size,
                                softcap=softcap))
    return means


@mutant("loss_sum_of_chunk_means", "mean = the sum of the chunks' means (the number of chunks x the loss; right "
        "with one chunk)", "NVIDIA-NeMo/Automodel#3803: a chunked mean returning n_chunks x the loss, unseen by a "
        "smoke test with one chunk", component="loss_kernel")
def _sum_of_chunk_means(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                        num_items_in_batch=None, softcap=None):
    if reduction != "mean" or num_items_in_batch is not None:
        return _right(hidden, weight, labels, reduction=reduction, bias=bias, chunk_size=chunk_size,
                      num_items_in_batch=num_items_in_batch, softcap=softcap)
    return torch.stack(_chunk_means(hidden, weight, labels, bias, chunk_size, softcap)).sum()


@mutant("loss_mean_of_chunk_means", "mean = the mean of the chunks' means (each chunk weighted alike, whatever its "
        "targets)", "chunked losses that average per-chunk means: exact only when every chunk holds as many targets "
        "(the mean-of-means of transformers' accumulation bug, inside one batch)", component="loss_kernel")
def _mean_of_chunk_means(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                         num_items_in_batch=None, softcap=None):
    if reduction != "mean" or num_items_in_batch is not None:
        return _right(hidden, weight, labels, reduction=reduction, bias=bias, chunk_size=chunk_size,
                      num_items_in_batch=num_items_in_batch, softcap=softcap)
    return torch.stack(_chunk_means(hidden, weight, labels, bias, chunk_size, softcap)).mean()


class _GradsInForward(torch.autograd.Function):
    """Gradients formed in forward for a uniform upstream gradient and scaled in backward by the first element of
    the upstream gradient: right for mean and sum, wrong for ``none`` backpropagated with per-token weights."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, reduction, softcap):
        inputs = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
        with torch.enable_grad():
            z = F.linear(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None).float()
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            loss = F.cross_entropy(z, labels, ignore_index=LL.IGNORE_INDEX, reduction=reduction)
            grads = torch.autograd.grad(loss.sum(), inputs)
        ctx.grads = grads
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        first = grad_output.flatten()[0]
        grads = [g * first for g in ctx.grads] + [None]
        return grads[0], grads[1], grads[2] if len(grads) > 3 else None, None, None, None


@mutant("loss_none_first_upstream_gradient", "reduction='none': every token's gradient scaled by the first token's "
        "upstream gradient (gradients formed in forward)", "linkedin/Liger-Kernel#968 (fixed in #1298): "
        "FusedLinearCrossEntropy with reduction='none' scaled all gradients by grad_output[0]",
        component="loss_kernel")
def _none_first_upstream(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                         num_items_in_batch=None, softcap=None):
    if reduction != "none":
        return _right(hidden, weight, labels, reduction=reduction, bias=bias, chunk_size=chunk_size,
                      num_items_in_batch=num_items_in_batch, softcap=softcap)
    return _GradsInForward.apply(hidden, weight, bias, labels, reduction, softcap)


@mutant("loss_ignores_num_items_in_batch", "num_items_in_batch taken and ignored: each micro-batch its own mean (the "
        "window's loss x the accumulation steps, its targets weighted by micro-batch)", "linkedin/Liger-Kernel#802: "
        "a patched forward ignoring num_items_in_batch put the loss x the gradient-accumulation steps",
        component="loss_kernel")
def _ignores_num_items(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                       num_items_in_batch=None, softcap=None):
    return _right(hidden, weight, labels, reduction=reduction, bias=bias, chunk_size=chunk_size, softcap=softcap)


@mutant("loss_softcap_dropped", "softcap taken and never applied", "apple/ml-cross-entropy#48: the logit softcap "
        "not applied", component="loss_kernel")
def _softcap_dropped(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                     num_items_in_batch=None, softcap=None):
    return _right(hidden, weight, labels, reduction=reduction, bias=bias, chunk_size=chunk_size,
                  num_items_in_batch=num_items_in_batch)


@mutant("loss_counts_a_chunks_ignored_labels", "the mean's denominator counts the ignored labels of the first chunk "
        "holding any (a chunk's rows counted instead of its targets)", "the off-by-a-count family of unsloth-zoo#348 "
        "(a packed count off by batch_size - 1) and transformers PR #46204, here in one chunk",
        component="loss_kernel")
def _counts_ignored(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                    num_items_in_batch=None, softcap=None):
    if reduction != "mean":
        return _right(hidden, weight, labels, reduction=reduction, bias=bias, chunk_size=chunk_size,
                      num_items_in_batch=num_items_in_batch, softcap=softcap)
    total = _right(hidden, weight, labels, reduction="sum", bias=bias, chunk_size=chunk_size, softcap=softcap)
    count = num_items_in_batch if num_items_in_batch is not None else int((labels != LL.IGNORE_INDEX).sum())
    for start in range(0, labels.shape[0], chunk_size):
        ignored = int((labels[start:start + chunk_size] == LL.IGNORE_INDEX).sum())
        if ignored:
            return total / (count + ignored)
    return total / count


@mutant("loss_last_partial_chunk_dropped", "the rows after the last whole chunk are never scored", "chunk loops "
        "written as range(0, N - N % chunk, chunk): right whenever the chunk divides N", component="loss_kernel")
def _drops_partial_chunk(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                         num_items_in_batch=None, softcap=None):
    end = hidden.shape[0] - hidden.shape[0] % chunk_size
    kept = labels.clone()
    kept[end:] = LL.IGNORE_INDEX  # the tail scores nothing
    if reduction == "mean" and num_items_in_batch is None:
        num_items_in_batch = int((labels != LL.IGNORE_INDEX).sum())  # the count still counts them
    return _right(hidden, weight, kept, reduction=reduction, bias=bias, chunk_size=chunk_size,
                  num_items_in_batch=num_items_in_batch, softcap=softcap)


class _HalfWeightGrad(LL.LinearCrossEntropyFunction):
    """llama_ref's fused kernel with the output weight's gradient summed over chunks in bfloat16."""

    @staticmethod
    def backward(ctx, grad_losses):
        grads = list(LL.LinearCrossEntropyFunction.backward(ctx, grad_losses))
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        if grads[1] is not None:  # the weight's sum over chunks, redone in bfloat16
            acc = torch.zeros(weight.shape, dtype=torch.bfloat16, device=weight.device)
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                g = LL.LinearCrossEntropyFunction.logit_grad(hidden[rows], weight, bias, labels[rows], lse[rows],
                                                             grad_losses[rows], ctx.softcap, ctx.ignore_index,
                                                             ctx.dtype)
                acc += (g.T @ hidden[rows].to(g.dtype)).to(torch.bfloat16)
            grads[1] = acc.to(weight.dtype)
        return tuple(grads)


@mutant("loss_head_grad_accumulated_in_half", "the output weight's gradient summed over chunks in bfloat16",
        "fused kernels whose weight-gradient accumulator takes the activations' half dtype (the precision the "
        "issue's zoo names: gradients of the head weight accumulated in half precision)", component="loss_kernel")
def _half_weight_grad(hidden, weight, labels, *, reduction="mean", bias=None, chunk_size=LL.DEFAULT_LOSS_CHUNK,
                      num_items_in_batch=None, softcap=None):
    losses = _HalfWeightGrad.apply(hidden, weight, bias, labels, chunk_size, softcap, LL.IGNORE_INDEX,
                                   LL._compute_dtype(hidden))
    return LL._reduce(losses, labels, reduction, LL.IGNORE_INDEX, num_items_in_batch)


def _bypassing_forward(self, tokens, start_pos=0, *, labels=None, loss_chunk=None, loss_kernel=None):
    return _ORIGINAL_FORWARD(self, tokens, start_pos, labels=labels, loss_chunk=loss_chunk)


_ORIGINAL_FORWARD = LM.Transformer.forward


@mutant("loss_kernel_bypassed", "the model's forward drops the loss kernel it is given and scores full logits "
        "(right values, no memory saved)", "a kernel patched in where the model never calls it — what the issue's "
        "model-level claim is for (TRL's chunked_nll and the model's forward going separate ways: "
        "unslothai/unsloth#8261)")
def _bypassed():
    return [(LM.Transformer, "forward", _bypassing_forward)]


for _m in list(ZOO):  # the components are kernels with the full signature
    if "loss_kernel" in _m.components and not isinstance(_m.components["loss_kernel"], LossKernel):
        ZOO[ZOO.index(_m)] = Mutant(_m.name, _m.prop, _m.description, _m.origin, _m.patches, _m.model_overrides,
                                    {"loss_kernel": _kernel(_m.components["loss_kernel"])})
