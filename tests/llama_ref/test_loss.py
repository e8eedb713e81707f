"""The chunked loss (``--loss-chunk``) and the fused one (``--fused-loss``) are the full-logits loss: the same summed
loss and the same gradients for every chunk size, padding and prompt masking — and a chunking that drops a tail or
forgets the shift is caught."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from llama_ref.args import ModelArgs
from llama_ref.train.data import IGNORE_INDEX
from llama_ref.loss import chunked_cross_entropy, linear_cross_entropy, token_loss_sum
from llama_ref.model import Transformer, init_weights
from llama_ref.train.trainer import Trainer

B, T = 2, 11  # 22 positions: chunks of 1, 5 (a ragged tail), 22, and more than there are


def _model(dtype=torch.float64) -> Transformer:
    return init_weights(Transformer(ModelArgs.preset("tiny", n_layers=1)), 0).to(dtype)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (B, T), generator=g)
    labels = tokens.clone()
    labels[0, 8:] = IGNORE_INDEX  # padding
    labels[1, :4] = IGNORE_INDEX  # a prompt (the ragged tail of 5-position chunks, positions 20-21, has a target)
    return tokens, labels


def _loss_and_grads(model: Transformer, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    tokens, labels = _batch()
    loss = loss_fn(model, tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _full(model, tokens, labels):
    return token_loss_sum(model(tokens, 0), labels)


def _chunked(chunk):
    return lambda model, tokens, labels: model(tokens, 0, labels=labels, loss_chunk=chunk)


def _fused(chunk):
    kernel = functools.partial(linear_cross_entropy, chunk_size=chunk)
    return lambda model, tokens, labels: model(tokens, 0, labels=labels, loss_kernel=kernel)


@pytest.mark.parametrize("path", [_chunked, _fused])
@pytest.mark.parametrize("chunk", [1, 5, B * T, 64])
def test_chunked_and_fused_loss_and_gradients_equal_the_full_logits_ones(chunk, path):
    # (Property 8's check, verify.checks.loss_kernel, asks each kernel much more: every reduction, softcap, bias,
    # accumulation with an external count; this is the model's own path at its shapes.)
    model = _model()
    loss, grads = _loss_and_grads(model, _full)
    chunked_loss, chunked_grads = _loss_and_grads(model, path(chunk))
    # Per-token losses and logit gradients are computed row by row either way; only the order of the sums over
    # positions differs (the loss is at least fp32: float64 here, as the model).
    torch.testing.assert_close(chunked_loss, loss)
    assert chunked_loss.dtype == loss.dtype == torch.float64  # a float64 model's loss stays float64 (fp32 otherwise)
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=lambda m: f"{name}: {m}")


def test_labels_without_chunking_return_the_full_logits_loss():
    model = _model()
    tokens, labels = _batch()
    torch.testing.assert_close(model(tokens, 0, labels=labels), _full(model, tokens, labels), rtol=0, atol=0)


def _drops_the_tail(hidden, weight, labels, *, reduction, chunk_size):
    end = hidden.shape[0] - hidden.shape[0] % chunk_size
    return F.cross_entropy(F.linear(hidden[:end], weight).float(), labels[:end], ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _forgets_the_shift(hidden, weight, labels, *, reduction, chunk_size):  # shifts the shifted labels again
    return F.cross_entropy(F.linear(hidden[:-1], weight).float(), labels[1:], ignore_index=IGNORE_INDEX,
                           reduction="sum")


@pytest.mark.parametrize("wrong", [_drops_the_tail, _forgets_the_shift])
def test_the_comparison_catches_a_wrong_chunking(wrong, monkeypatch):
    import llama_ref.model as M

    model = _model()
    loss, _ = _loss_and_grads(model, _full)
    monkeypatch.setattr(M, "chunked_cross_entropy", wrong)
    wrong_loss, _ = _loss_and_grads(model, _chunked(5))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong_loss, loss)


def test_trainer_step_with_a_chunked_loss_is_the_same_step():
    # fp32 end to end, AdamW + clipping: the step's loss and the updated weights agree to fp32 rounding.
    reference, chunked = _model(torch.float32), _model(torch.float32)
    results, states = [], []
    fused = _model(torch.float32)
    for model, options in ((reference, {}), (chunked, {"loss_chunk": 4}),
                           (fused, {"loss_kernel": functools.partial(linear_cross_entropy, chunk_size=4)})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        trainer = Trainer(model, opt, clip=1.0, **options)
        tokens, labels = _batch(1)
        results.append(trainer.step([{"input_ids": tokens, "labels": labels}]))
        states.append(copy.deepcopy(model.state_dict()))
    for result, state in zip(results[1:], states[1:]):
        assert result.loss == pytest.approx(results[0].loss, rel=1e-6)
        # AdamW's first update and clipping are scale-invariant: the gradient norm catches a gradient off by a factor.
        assert result.grad_norm == pytest.approx(results[0].grad_norm, rel=1e-5)
        assert result.n_tokens == results[0].n_tokens
        for name, value in states[0].items():
            torch.testing.assert_close(state[name], value, msg=lambda m: f"{name}: {m}")


def test_chunked_loss_under_no_grad_needs_no_checkpoint():
    model = _model()
    tokens, labels = _batch()
    with torch.no_grad():
        loss = model(tokens, 0, labels=labels, loss_chunk=3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _full(model, tokens, labels).detach())


@pytest.mark.parametrize("chunk", [0, -2])
def test_a_chunk_below_one_position_is_refused(chunk):
    hidden, labels = torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="loss chunk must be >= 1"):
        chunked_cross_entropy(hidden, torch.zeros(3, 8), labels, chunk_size=chunk)
    with pytest.raises(ValueError, match="loss_chunk"):
        Trainer(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), loss_chunk=chunk)
