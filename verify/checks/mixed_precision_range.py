"""Property 5's claims at the extremes of range: the upcasts hold on half activations of ±512 (RMSNorm, the token
loss), and a half model's logits at the end of its context are as accurate as at its start (RoPE angles formed in
the half dtype are off by whole radians there) (:mod:`verify.checks.mixed_precision`)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch

import llama_ref.train.trainer as T  # looked up at call time: the loss is the implementation's, mutants reach it
from llama_ref.loss import IGNORE_INDEX
from llama_ref.model import Transformer

from ..compare import compare, compare_calibrated
from ..oracles import token_loss_sum
from ..tolerances import Tolerance
from ..targets.base import cast_floating
from .mixed_precision_base import FACTORS, LONG_CHUNK, PRECISION_NAMES, ClaimFindings
from .precision_policy import dtype_names as _dt


def upcast_claim(model: Transformer, halves: Sequence[torch.dtype], g: torch.Generator,
                 found: ClaimFindings) -> None:
    """RMSNorm on half activations of ±512 within two roundings of float64 (fp16 squares overflow above 256), and
    ``token_loss_sum`` on half logits an fp32 sum within fp32 rounding of float64."""
    device = next(model.parameters()).device
    for half in dict.fromkeys(halves):
        eps = torch.finfo(half).eps
        norm = cast_floating(copy.deepcopy(model.norm), half)
        x = (torch.randn(2, 8, model.params.dim, generator=g) * 512).to(device, half)  # squares overflow fp16
        with torch.no_grad():
            out = norm(x)
        x64, w64 = x.double(), norm.weight.double()
        expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * w64
        c = compare(out, expected, Tolerance(2 * eps, torch.finfo(half).tiny), "RMSNorm")  # two roundings to half
        if not c.ok or out.dtype != half:
            found.fail(f"RMSNorm on {_dt((half,))} activations of ±512 (output {_dt((out.dtype,))}): {c}")
        logits = (torch.randn(2, 17, model.params.vocab_size, generator=g) * 3).to(device, half)
        labels = torch.randint(0, model.params.vocab_size, (2, 17), generator=g).to(device)
        labels[0, :5] = IGNORE_INDEX
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss = T.token_loss_sum(logits, labels)
        expected_loss = float(token_loss_sum(logits.double(), labels))
        bound = (n + 4) * torch.finfo(torch.float32).eps * expected_loss  # fp32 log-softmax and an n-term sum
        if loss.dtype != torch.float32 or not abs(float(loss) - expected_loss) <= bound:
            found.fail(f"token_loss_sum on {_dt((half,))} logits returned {float(loss):.6f} "
                       f"({_dt((loss.dtype,))}), float64 says {expected_loss:.6f} (allowed ±{bound:.1e})")


def long_position_claim(model: Transformer, halves: Sequence[torch.dtype], g: torch.Generator,
                        device: torch.device, found: ClaimFindings) -> None:
    """The whole model in each half dtype, no autocast: logits of one chunk at the end of the context against
    float64, calibrated by the same chunk at position 0 (RoPE is relative: float64 gives the same logits at both)."""
    p = model.params
    chunk = min(LONG_CHUNK, p.max_seq_len // 2)
    far = p.max_seq_len - chunk
    if far < 2 * chunk:
        found.not_applicable(f"long positions not checked: max_seq_len={p.max_seq_len} has no position far from "
                             "the start")
        return
    tokens = torch.randint(0, p.vocab_size, (2, chunk), generator=g).to(device)
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = {0: exact(tokens, 0), far: exact(tokens, far)}
    factor = FACTORS["mixed_precision_rope"]
    for half in halves:
        test = cast_floating(copy.deepcopy(model), half)
        with torch.no_grad():
            near, end = test(tokens, 0), test(tokens, far)
        # The baseline: the error at positions 0 on, moved onto the reference at the far positions (both float64).
        c = compare_calibrated(end, near.double() - ref[0] + ref[far], ref[far], factor, name="rope")
        if not found.calibrated("mixed_precision_rope", f"rope {PRECISION_NAMES[half]}", c):
            found.fail(f"{PRECISION_NAMES[half]} weights, positions {far}-{far + chunk - 1} vs float64: {c} "
                       f"(the error at positions 0-{chunk - 1} is the baseline; RoPE angles formed in "
                       f"{PRECISION_NAMES[half]}?)")
