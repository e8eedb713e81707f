"""The mixed-precision check on the user's own step (verify.checks.mixed_precision_step): correct bf16 and fp16
steps pass on the Meta-style model; the seed report's loop, and steps and models wrong in one way each, fail with
the reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from verify.checks.mixed_precision_step import check_mixed_precision_step

from . import seed_style as S
from . import train_steps as TS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # GradScaler / autocast advice on CPU


@pytest.mark.parametrize("step", [TS.bf16_step, TS.fp16_step], ids=["bf16", "fp16+GradScaler"])
def test_a_correct_autocast_step_passes(step):
    result = check_mixed_precision_step(S.make_trainable(), step)
    assert result.ok, str(result)
    assert "full+lora" in result.case


def test_the_seeds_mixed_precision_loop_is_mixed_but_its_loss_is_scaled():
    result = check_mixed_precision_step(S.make_trainable(), TS.seed_mp_step)
    assert not result.ok
    assert all("they are 0.125x the reference's: scaled (a window loss that is not the token mean" in d for d in result.details), \
        str(result)  # its autocast, upcasts, master weights and GradScaler hold


def _half_logits_step(model, optimizer, window, max_norm):
    """The loss taken on half logits outside autocast (which would have upcast it): log-softmax in bf16."""
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    for b in window:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(b["input_ids"], 0).to(torch.bfloat16)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum") / n
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss)


def _plain_fp16(model, optimizer, window, max_norm):
    """fp16 autocast without GradScaler."""
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    for b in window:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(b["input_ids"], 0)
        (F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum")
         / n).backward()
    optimizer.step()
    optimizer.zero_grad()
    return 0.0


def _half_master_step(model, optimizer, window, max_norm):
    """Training the weights themselves in bf16: no fp32 master copy."""
    model.to(torch.bfloat16)
    return TS.token_mean_step(model, optimizer, window, max_norm)


class _HalfNorm(S.RMSNorm):
    def forward(self, x):  # the mean of squares in the input's (half) dtype
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.parametrize("step, model, message", [
    (TS.token_mean_step, S.make_trainable, "not mixed: its Linear matmuls ran in float32"),
    (_half_logits_step, S.make_trainable, "softmax / loss reductions not upcast to fp32"),
    (_plain_fp16, S.make_trainable, "a step with inf gradients changed"),
    (_half_master_step, S.make_trainable, "master weights / their gradients not fp32"),
], ids=["no-autocast", "loss-on-half-logits", "fp16-without-GradScaler", "half-master-weights"])
def test_each_wrong_variant_fails_with_its_reason(step, model, message):
    result = check_mixed_precision_step(model(), step)
    assert not result.ok and any(message in d for d in result.details), str(result)


def test_a_norm_without_its_upcast_fails_on_a_half_base():
    # With fp32 master weights the residual stream is fp32 and any norm computes in fp32; on a LoRA model whose
    # frozen base is stored in bf16 (llama-finetune --mp --lora's), only the norm's own upcast keeps it fp32.
    correct = check_mixed_precision_step(_half_base(S.make_trainable()), TS.bf16_step, full=False)
    assert correct.ok, str(correct)
    result = check_mixed_precision_step(_half_base(_with_half_norms(S.make_trainable())), TS.bf16_step, full=False)
    assert not result.ok and any("norm reductions (mean of squares) not upcast to fp32" in d
                                 for d in result.details), str(result)


def _half_base(model):
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def _with_half_norms(model):
    for block in model.layers:
        for name in ("attention_norm", "ffn_norm"):
            old = getattr(block, name)
            new = _HalfNorm(old.weight.shape[0], old.eps)
            new.load_state_dict(old.state_dict())
            setattr(block, name, new)
    return model


def test_under_inference_mode_or_without_a_step_it_is_not_applicable():
    result = check_mixed_precision_step(S.make_lora(), TS.bf16_step)  # Meta's @torch.inference_mode() forward
    assert result.verdict == "N/A" and "mixed_precision needs one" in result.not_applicable
    from verify.checks.mixed_precision import check_mixed_precision
    result = check_mixed_precision(S.make_trainable())  # no step given: llama_ref's own trainer cannot drive it
    assert result.verdict == "N/A" and "--mp-train-step PATH.py:FN" in result.not_applicable


def test_the_case_says_what_ran_not_what_was_meant():
    # bf16 weights and no autocast: its matmuls are bf16, but nothing autocast; the case line says so.
    result = check_mixed_precision_step(S.make_trainable(), _half_master_step)
    assert ", bfloat16 matmuls, no autocast, " in result.case, result.case
    assert ", bfloat16 autocast, " in check_mixed_precision_step(S.make_trainable(), TS.bf16_step).case
