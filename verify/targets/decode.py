"""Greedy generation over a target's ``logits``, for models whose own generation loop is not part of the target.

Meta's algorithm (``generation.py``), written anew: prompts right-padded into one (B, total) batch, the first step
at the shortest prompt's length, rows whose prompt is longer teacher-forced with their own tokens, one new token per
step. Cached, each step feeds only the tokens since the last step, at ``start_pos`` = the last step's position;
uncached, each step recomputes the whole prefix from position 0. A padded position is never fed: at each step the
positions before it hold prompt or generated tokens.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Logits = Callable[..., torch.Tensor]  # logits(tokens, start_pos, *, kv_caching) → (B, T, V)


def greedy_generate(logits: Logits, prompts: Sequence[Sequence[int]], max_gen_len: int, max_seq_len: int,
                    device: torch.device, *, kv_caching: bool) -> tuple[list[list[int]], list[list[float]]]:
    """The new tokens (up to ``max_gen_len`` per row, fewer where ``max_seq_len`` ends first) and the
    log-probability of each under the logits it was chosen from."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("greedy_generate needs at least one prompt, none of them empty")
    lens = [len(p) for p in prompts]
    total = min(max_seq_len, max(lens) + max_gen_len)
    tokens = torch.zeros((len(prompts), total), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    is_prompt = torch.arange(total, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    logprobs = torch.zeros((len(prompts), total), dtype=torch.float64)
    prev = 0
    for cur in range(min(lens), total):
        if kv_caching:
            out = logits(tokens[:, prev:cur], prev, kv_caching=True)[:, -1]
        else:
            out = logits(tokens[:, :cur], 0, kv_caching=False)[:, -1]
        chosen = torch.where(is_prompt[:, cur], tokens[:, cur], out.argmax(dim=-1))
        tokens[:, cur] = chosen
        logprobs[:, cur] = torch.log_softmax(out.double(), dim=-1).gather(1, chosen[:, None])[:, 0].cpu()
        prev = cur
    rows = tokens.tolist()
    return ([rows[r][lens[r]:lens[r] + max_gen_len] for r in range(len(prompts))],
            [logprobs[r, lens[r]:lens[r] + max_gen_len].tolist() for r in range(len(prompts))])
