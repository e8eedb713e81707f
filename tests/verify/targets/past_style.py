"""A small Llama of neither Meta's shape nor the input_pos family's, written anew for the tests: ``forward(tokens,
past=None)`` returns ``(logits, past)``, the cache a list of per-layer (keys, values) that the caller hands back
(the legacy ``past_key_values`` way, with no ``start_pos``: the position is the length of ``past``); its blocks are
``model.blocks``, checkpointed where ``model.checkpointed`` says; loralib-shaped LoRA on ``wq``/``wv``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .seed_style import LoRALinear, RMSNorm, rope_table

DIM, HEADS, LAYERS, VOCAB, LENGTH = 64, 4, 2, 256, 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(DIM, 1e-5), RMSNorm(DIM, 1e-5)
        self.wq, self.wv = LoRALinear(DIM, DIM, 4, 8), LoRALinear(DIM, DIM, 4, 8)
        self.wk, self.wo = nn.Linear(DIM, DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        self.up, self.down = nn.Linear(DIM, 4 * DIM, bias=False), nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x, table, past_kv: Optional[tuple[torch.Tensor, torch.Tensor]]):
        b, t, _ = x.shape
        y = self.norm1(x)
        q, k, v = (w(y).view(b, t, HEADS, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = (torch.view_as_real(torch.view_as_complex(z.float().reshape(*z.shape[:-1], -1, 2)) * table)
                .flatten(3).type_as(z) for z in (q, k))
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        start = k.shape[2] - t
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, DIM)
        h = x + self.wo(out)
        return h + self.down(F.gelu(self.up(self.norm2(h)))), (k, v)


class PastModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.head = RMSNorm(DIM, 1e-5), nn.Linear(DIM, VOCAB, bias=False)
        self.table = rope_table(DIM // HEADS, LENGTH, 10000.0)
        self.checkpointed: frozenset[int] = frozenset()

    def forward(self, tokens: torch.Tensor, past: Optional[list] = None):
        start = 0 if past is None else past[0][0].shape[2]
        table = self.table[start:start + tokens.shape[1]]
        h, new_past = self.embed(tokens), []
        for i, block in enumerate(self.blocks):
            kv = None if past is None else past[i]
            if i in self.checkpointed:
                h, kv = checkpoint(block, h, table, kv, use_reentrant=False)
            else:
                h, kv = block(h, table, kv)
            new_past.append(kv)
        return self.head(self.norm(h)).float(), new_past


def make(seed: int = 0) -> PastModel:
    model = PastModel()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("norm1.weight", "norm2.weight", "lora_B")) and name != "norm.weight":  # B = 0: fresh
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name == "embed.weight" else p.shape[-1] ** -0.5))
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    return model
