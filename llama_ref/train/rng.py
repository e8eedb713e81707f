"""Seeding without touching the caller's random state: what a training run, a benchmark cell or a memory
measurement draws (LoRA's ``A``, dropout masks) comes from its own seed, and the caller's generators are as they
were afterwards."""
from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch


@contextlib.contextmanager
def seeded(seed: int, device: Union[str, torch.device] = "cpu") -> Iterator[None]:
    """Inside: torch's global generators seeded with ``seed`` (CPU, and every CUDA device when ``device`` is CUDA);
    outside: the caller's states restored (``torch.random.fork_rng``)."""
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.manual_seed(seed)
        yield
