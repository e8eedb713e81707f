"""The oracles (verify/oracles.py) against the product functions they restate: they are written independently, so
each pair agreeing is evidence for both (and a disagreement points at one of them)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from llama_ref.loss import IGNORE_INDEX as PRODUCT_IGNORE_INDEX, token_loss_sum as product_token_loss_sum
from llama_ref.model import checkpoint_policy_layers
from llama_ref.train.optim import make_scheduler
from llama_ref.train.trainer import Trainer
from verify import oracles

KINDS = ("constant", "linear", "cosine")


# ---- lr_factor against make_scheduler ----------------------------------------------------------------------------

def _assert_schedule_matches(kind: str, total: int, warmup: int, extra: int = 3) -> None:
    """make_scheduler driving a real optimizer, step by step, past total_steps, against the oracle's factor."""
    base_lr = 0.2
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = make_scheduler(opt, kind, total_steps=total, warmup_steps=warmup)
    for step in range(max(total, warmup) + extra):
        want = base_lr * oracles.lr_factor(step, kind, total, warmup)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), (kind, total, warmup, step)
        opt.step()
        scheduler.step()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("total, warmup", [
    (7, 0), (7, 1), (7, 3), (7, 6),  # no warm-up, the one-step warm-up, a typical one, the decay one step long
    (7, 7), (5, 8),  # total_steps == warmup, and total_steps < warmup: full rate at step `warmup`, then 0
    (1, 0), (1, 1), (0, 0), (20, 5),
])
def test_lr_factor_is_make_schedulers_step_by_step(kind, total, warmup):
    _assert_schedule_matches(kind, total, warmup)


@given(kind=st.sampled_from(KINDS), total=st.integers(0, 25), warmup=st.integers(0, 25))
def test_lr_factor_is_make_schedulers_for_any_small_schedule(kind, total, warmup):
    _assert_schedule_matches(kind, total, warmup)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_decay_stays_at_zero_after_total_steps(kind):  # torch's CosineAnnealingLR alone would climb back
    assert [oracles.lr_factor(s, kind, 6, 2) for s in range(6, 30)] == [0.0] * 24


def test_lr_factor_rejects_what_has_no_meaning():
    with pytest.raises(ValueError, match="'warm'"):
        oracles.lr_factor(0, "warm", 5, 1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        oracles.lr_factor(-1, "linear", 5, 1)


# ---- the losses --------------------------------------------------------------------------------------------------

def _logits_and_labels(seed: int, bsz: int = 3, length: int = 9, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (bsz, length), generator=g)
    labels[0, -3:] = PRODUCT_IGNORE_INDEX  # right padding
    labels[1, :4] = PRODUCT_IGNORE_INDEX  # a masked prompt
    return logits, labels


def test_the_ignore_index_is_the_products():
    assert oracles.IGNORE_INDEX == PRODUCT_IGNORE_INDEX


def test_token_loss_sum_is_the_products():
    logits, labels = _logits_and_labels(0)
    torch.testing.assert_close(oracles.token_loss_sum(logits, labels), product_token_loss_sum(logits, labels))
    torch.testing.assert_close(oracles.token_loss_sum(logits.double(), labels),  # fp64 oracle vs fp32 product
                               product_token_loss_sum(logits, labels).double(), rtol=1e-5, atol=1e-5)


class _FixedLogits(nn.Module):
    """A 'model' whose logits at a position depend on its token only: one row of a table per token id."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.table[ids]


def test_mean_token_loss_is_the_trainers_window_loss():
    g = torch.Generator().manual_seed(1)
    vocab = 13
    model = _FixedLogits(torch.randn(vocab, vocab, generator=g))
    ids = torch.randint(0, vocab, (4, 8), generator=g)
    labels = ids.clone()
    labels[0, 5:] = PRODUCT_IGNORE_INDEX
    labels[3, :6] = PRODUCT_IGNORE_INDEX  # micro-batches with different target counts: a token mean, not a mean of means
    with torch.no_grad():
        expected = oracles.mean_token_loss(model(ids, 0), labels)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0))
    window = [{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]
    assert trainer.step(window).loss == pytest.approx(float(expected), rel=1e-6)


# ---- the gradient norm and the clip coefficient ------------------------------------------------------------------

@pytest.mark.parametrize("clip", [0.5, 1e3])  # clipped, and not
def test_grad_norm_and_clip_coefficient_are_the_trainers_clipping(clip):
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), clip=clip)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = [p.grad.clone() for p in model.parameters()]
    norm = oracles.total_grad_norm(before)
    assert trainer.clip_gradients() == pytest.approx(norm, rel=1e-6)
    coef = oracles.clip_coefficient(norm, clip)
    assert (coef < 1.0) == (clip < norm)
    for p, g0 in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g0 * coef)


# ---- the checkpointing policies ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", [None, "none", "all", "seed", "every:1", "every:2", "every:3", "every:05",
                                    "every:100"])
def test_policy_layers_is_checkpoint_policy_layers(policy):
    for n_layers in range(13):
        assert oracles.policy_layers(policy, n_layers) == checkpoint_policy_layers(policy, n_layers), n_layers


@pytest.mark.parametrize("bad", ["every:0", "every:", "every:-1", "every:+2", "every:2\n", "every: 2", "every",
                                 "All", "", " all", "every:²", "every:١"])
def test_policy_layers_rejects_what_checkpoint_policy_layers_rejects(bad):
    with pytest.raises(ValueError):
        checkpoint_policy_layers(bad, 4)
    with pytest.raises(ValueError, match="unknown gradient-checkpointing policy"):
        oracles.policy_layers(bad, 4)
