"""Property 2's hints: what accumulated gradients that are not the large batch's are instead — a mean of
per-micro-batch means (not a multiple of the right gradients), a token count off by some per sequence or per
micro-batch, divided K times too often or not at all, or some other uniform scale — so that a failure names the
likely cause, not the first that comes to mind."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..compare import scale_factor


def diagnose(got: torch.Tensor, truth: torch.Tensor, window: Sequence[Mapping[str, torch.Tensor]],
             n_tokens: int, ga: int, clipped: bool) -> str:
    """``"; …"``: what the stepped gradients ``got`` are, against the large batch's ``truth`` (both flattened), for a
    window of micro-batches holding ``n_tokens`` targets in all, grouped ``ga`` at a time (the last window may hold
    fewer); empty where they are the large batch's within 1 %. Where clipping bound on either side (``clipped``) a
    multiple says nothing of the loss's scale: it is only reported."""
    c = scale_factor(got, truth)
    if c is None:
        return ("; they are not a multiple of the large batch's: the window's loss is not its token mean — each "
                "micro-batch weighted otherwise than by its share of the window's targets (a mean of per-micro-batch "
                "means; a per-micro-batch count taken on other labels than the loss's, e.g. before the shift)")
    if abs(c - 1) <= 1e-2:
        return ""
    said = f"; they are {c:.4g}x the large batch's: the window's loss is scaled"
    if clipped:
        return (f"; they are {c:.4g}x the large batch's after clipping, which rescales either side: the window's "
                "loss is scaled (its factor shows in an unclipped step)")
    k = len(window)

    def near(x: float) -> bool:
        return abs(c / x - 1) < 1e-2
    for m in dict.fromkeys((k, ga)):
        if m > 1 and near(1 / m):
            return said + f" by 1/{m}: divided by the number of micro-batches as well as by the window's tokens"
        if m > 1 and near(m):
            return said + (f" by {m}: divided by a micro-batch's token count (on average) rather than the window's, "
                           "or micro-batch means summed rather than averaged")
    if k < ga and near(k / ga):
        return said + f" by {k}/{ga}: this short window of {k} micro-batches divided as if it held {ga}"
    if near(n_tokens):
        return said + f" by {n_tokens}, its token count: the summed loss was not divided by it"
    used = n_tokens / c  # the count the window's loss was divided by
    off = round(used)
    rows = sum(int(b["input_ids"].shape[0]) for b in window)
    diff = off - n_tokens
    if abs(used - off) > 0.05 or diff == 0 or off <= 0 or abs(diff) > 2 * max(rows, k):
        return said  # not a count off by a few per sequence or micro-batch
    per = [f"{diff // n:+d} per {what}" for what, n in (("sequence", rows), ("micro-batch", k))
           if n > 0 and diff % n == 0 and diff // n in (-2, -1, 1, 2)]
    return (said + f": divided by {off} tokens where the window has {n_tokens} targets ({diff:+d}"
            + (f": {' or '.join(per)}" if per else "") + "; targets counted before the shift, or padding counted?)")
