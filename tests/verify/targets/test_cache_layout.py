"""Never a weakened PASS: a Meta-style model whose cache is laid out (batch, heads, positions, head_dim) — gpt-fast's,
litgpt's and torchtune's layout — has its positions read from the positions axis, not the heads axis (2 here, where
the check once ran on 2 positions, skipped generation and printed PASS); a target too small to check is N/A, saying
so; a layout nothing tells apart is refused, naming the shape."""
from __future__ import annotations

import torch

from verify.checks.kv_cache import MIN_POSITIONS, check_kv_cache
from verify.targets.meta_style import MetaStyleTarget

from . import seed_style


class HeadsFirstAttention(seed_style.Attention):
    """Meta's attention with its cache laid out (batch, heads, positions, head_dim)."""

    def __init__(self, args):
        super().__init__(args)
        shape = (args.max_batch_size, self.n_kv_heads, args.max_seq_len, self.head_dim)
        self.cache_k, self.cache_v = torch.zeros(shape), torch.zeros(shape)

    def update_cache(self, xk, xv, bsz, start_pos, seqlen):
        self.cache_k[:bsz, :, start_pos:start_pos + seqlen] = xk.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:start_pos + seqlen] = xv.transpose(1, 2)
        return (self.cache_k[:bsz, :, :start_pos + seqlen].transpose(1, 2),
                self.cache_v[:bsz, :, :start_pos + seqlen].transpose(1, 2))


class WrapsAfterEight(HeadsFirstAttention):
    """A ring buffer of 8 positions posing as a longer cache: position p is kept at slot p % 8."""

    def update_cache(self, xk, xv, bsz, start_pos, seqlen):
        for i in range(seqlen):
            slot = (start_pos + i) % 8
            self.cache_k[:bsz, :, slot] = xk[:, i]
            self.cache_v[:bsz, :, slot] = xv[:, i]
        n = start_pos + seqlen
        order = [p % 8 for p in range(max(0, n - 8), n)]
        return self.cache_k[:bsz, :, order].transpose(1, 2), self.cache_v[:bsz, :, order].transpose(1, 2)


def test_a_heads_first_cache_is_read_by_its_positions_and_checked_in_full():
    result = check_kv_cache(seed_style.make(HeadsFirstAttention))
    assert result.verdict == "PASS" and "L=24" in result.case, str(result)


def test_a_cache_that_wraps_after_eight_positions_fails():
    result = check_kv_cache(seed_style.make(WrapsAfterEight))
    assert result.verdict == "FAIL", str(result)


def test_a_target_whose_cache_holds_two_positions_is_never_reported_pass():
    model = seed_style.make_fixed()
    for m in (layer.attention for layer in model.layers):
        m.cache_k, m.cache_v = m.cache_k[:, :2].clone(), m.cache_v[:, :2].clone()
    result = check_kv_cache(model)
    assert result.verdict == "N/A", str(result)
    assert result.not_applicable.startswith(f"target too small to check: 2 positions to compare, fewer than the "
                                            f"{MIN_POSITIONS}")


class Opaque(torch.nn.Module):
    """Meta's shape — forward(tokens, start_pos), an attention module holding cache_k/cache_v — and nothing that says
    how many heads it has."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.attention = torch.nn.Module()
        self.attention.cache_k, self.attention.cache_v = torch.zeros(4, 2, 64, 16), torch.zeros(4, 2, 64, 16)
        self.attention.kv_caching = True

    def forward(self, tokens, start_pos):
        return self.embed(tokens)


def test_a_layout_nothing_tells_apart_is_refused_naming_the_shape():
    result = check_kv_cache(MetaStyleTarget(Opaque(), vocab_size=16))
    assert result.verdict == "N/A" and result.not_applicable.startswith(
        "cache_k of shape (4, 2, 64, 16): cannot tell its positions axis from its heads axis"), str(result)
    assert MetaStyleTarget(Opaque(), vocab_size=16, max_seq_len=64).limits.max_seq_len == 64  # said by the user
