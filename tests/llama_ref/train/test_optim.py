"""The optimizer llama-finetune builds: AdamW's decoupled weight decay is the one the flag asks for."""
import pytest
import torch
from torch import nn

from llama_ref.train.config import TrainConfig
from llama_ref.train.optim import make_optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_decays_by_lr_times_weight_decay(weight_decay):
    # With a zero gradient Adam's moments stay 0 and its update is 0/(0 + eps) = 0: all that moves a weight is the
    # decoupled decay, p ← p·(1 − lr·λ) (Loshchilov & Hutter; torch.optim.AdamW).
    lin = nn.Linear(3, 2, bias=False)
    w0 = lin.weight.detach().clone()
    cfg = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=weight_decay, progress=False)
    opt = make_optimizer(cfg, lin)
    lin.weight.grad = torch.zeros_like(lin.weight)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.01 * weight_decay), rtol=1e-6, atol=0.0)


def test_frozen_parameters_are_not_given_to_the_optimizer():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    opt = make_optimizer(TrainConfig(optimizer="sgd", progress=False), model)
    given = {id(p) for group in opt.param_groups for p in group["params"]}
    assert given == {id(p) for p in model[1].parameters()}


def test_weight_decay_with_sgd_is_a_clear_error():
    with pytest.raises(ValueError, match="--weight-decay"):
        TrainConfig(optimizer="sgd", weight_decay=0.1)
