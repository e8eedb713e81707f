"""Property 8 (verify.checks.loss_kernel): llama_ref's chunked and fused losses and torch's linear_cross_entropy pass;
the zoo's kernels fail (tests/verify/mutants/test_mutants.py runs each), and the cases that make them fail are the
ones a weaker check would leave out; a user's kernel is checked through --loss-fn; what a kernel does not take or
cannot do is said, never passed over."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from verify.__main__ import main
from verify.checks.loss_kernel import ROWS, check_loss_kernel
from verify.mutants import MUTANTS
from verify.targets.loss_kernel import LossKernel, torch_linear_cross_entropy

from ..targets import seed_style


@pytest.fixture(scope="module")
def model():
    from llama_ref.default import default_model
    return default_model()


@pytest.mark.parametrize("kernel", ["chunked", "fused", "torch"])
def test_llama_refs_kernels_and_torchs_pass(model, kernel):
    result = check_loss_kernel(model, kernel=kernel)
    if kernel == "torch" and not hasattr(F, "linear_cross_entropy"):
        assert result.verdict == "N/A" and "appeared in torch 2.13" in result.not_applicable
        return
    assert result.verdict == "PASS", str(result)
    assert "reductions=mean,sum,none chunks=1,5,36,37,48,own" in result.case and "model B=2 L=16" in result.case
    assert ("softcap=" in result.case) == (kernel == "fused")


def test_the_fused_kernel_passes_in_bfloat16(model):
    result = check_loss_kernel(model.to(torch.bfloat16), kernel="fused")
    assert result.verdict == "PASS" and result.case.endswith("bfloat16"), str(result)


def _kernel_of(name: str) -> LossKernel:
    return MUTANTS[name].components["loss_kernel"]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(ROWS, 16, generator=g), torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (ROWS,), generator=g)
    y[5:10] = -100
    return h, w, y


def test_a_sum_of_chunk_means_is_right_with_one_chunk_so_the_sweep_is_what_catches_it(model):
    h, w, y = _inputs()
    wrong = _kernel_of("loss_sum_of_chunk_means")
    right = F.cross_entropy(F.linear(h, w), y)
    torch.testing.assert_close(wrong(h, w, y, chunk_size=ROWS), right)  # the premise: one chunk hides it
    assert not torch.allclose(wrong(h, w, y, chunk_size=5), right)
    result = check_loss_kernel(model, loss_kernel=wrong)
    assert not result.ok and not any("chunk=own" in d for d in result.details if "reduction=mean" in d)
    assert any("reduction=mean chunk=5 loss" in d for d in result.details), result.details


def test_a_first_token_upstream_gradient_is_right_for_a_uniform_one_and_caught_with_per_token_weights(model):
    h, w, y = _inputs()
    wrong = _kernel_of("loss_none_first_upstream_gradient")
    grads = []
    for fn in (wrong, lambda *a, **k: F.cross_entropy(F.linear(a[0], a[1]), a[2], reduction="none")):
        hh = h.clone().requires_grad_()
        fn(hh, w, y, reduction="none").sum().backward()  # a uniform upstream gradient: the premise
        grads.append(hh.grad)
    torch.testing.assert_close(grads[0], grads[1])
    result = check_loss_kernel(model, loss_kernel=wrong)
    assert not result.ok and all("reduction=none" in d for d in result.details), result.details


def _user_kernel(hidden, weight, labels, *, reduction="mean", chunk_size=8):
    if reduction == "none":
        raise NotImplementedError("per-token losses are not kept")
    losses = [F.cross_entropy(F.linear(hidden[s:s + chunk_size], weight).float(), labels[s:s + chunk_size],
                              reduction="sum") for s in range(0, hidden.shape[0], chunk_size)]
    total = torch.stack(losses).sum()
    return total if reduction == "sum" else total / (labels != -100).sum()


def test_a_reduction_the_kernel_does_not_implement_is_said_not_checked(model):
    result = check_loss_kernel(model, loss_kernel=LossKernel.from_function(_user_kernel, "mine"))
    assert result.verdict == "PASS" and "reductions=mean,sum chunks=" in result.case, str(result)
    assert "note: reduction none not checked: the kernel raised NotImplementedError for it" in result.details
    assert "note: accumulation with num_items_in_batch not checked: the kernel takes none" in result.details


def test_a_users_kernel_through_loss_fn_gets_a_verdict(tmp_path, capsys):
    path = tmp_path / "my_loss.py"
    path.write_text("import torch.nn.functional as F\n\n"
                    "def right(hidden, weight, labels, *, reduction='mean'):\n"
                    "    return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction=reduction)\n\n"
                    "def unshifted_mean(hidden, weight, labels, *, reduction='mean'):\n"
                    "    loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction='sum')\n"
                    "    return loss / labels.numel() if reduction == 'mean' else loss\n")
    args = ["--check", "loss_kernel", "--dtype", "float32", "--attn-impl", "math", "--loss-fn"]
    assert main(args + [f"{path}:right"]) == 0
    out = capsys.readouterr().out
    assert f"{path}:right: N=37" in out and "4/4 checks passed" in out
    assert main(args + [f"{path}:unshifted_mean"]) == 1  # the mean over every row, ignored ones included
    assert "3/4 checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [("nowhere.py:fn", "no such file"), ("os.path:basename", "positional")])
def test_a_bad_loss_fn_is_a_usage_error_naming_it(spec, message, capsys):
    assert main(["--check", "loss_kernel", "--loss-fn", spec]) == 2
    err = capsys.readouterr().err
    assert spec in err and message in err


def test_a_kernel_without_reduction_is_refused_by_name():
    with pytest.raises(TypeError, match="no `reduction` keyword"):
        LossKernel.from_function(lambda hidden, weight, labels: None, "bare")


def test_torchs_kernel_is_not_applicable_where_torch_has_none(model, monkeypatch):
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    result = check_loss_kernel(model, loss_kernel=torch_linear_cross_entropy())
    assert result.verdict == "N/A" and "appeared in torch 2.13" in result.not_applicable


def test_what_a_kernel_warns_is_reported(model):
    def warns(hidden, weight, labels, *, reduction="mean"):
        warnings.warn("falling back to the reference path")
        return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction=reduction)
    result = check_loss_kernel(model, loss_kernel=LossKernel.from_function(warns, "warns"))
    assert result.ok and any("the kernel warned" in d and "falling back" in d for d in result.details)


def test_a_foreign_model_has_no_kernel_of_its_own_but_a_users_is_checked_with_its_output_weight():
    model = seed_style.make()
    result = check_loss_kernel(model)
    assert result.verdict == "N/A" and "no loss kernel of its own" in result.not_applicable
    result = check_loss_kernel(model, loss_kernel=LossKernel.from_function(_user_kernel, "mine"))
    assert result.verdict == "PASS" and f"V={model.output.out_features} D={model.output.in_features}" in result.case
    assert any("the kernel in the model not checked: the model has no seam" in d for d in result.details)


def test_a_kernel_declining_only_the_softcap_is_checked_for_the_rest_and_says_so(model):
    from llama_ref.loss import linear_cross_entropy

    def no_softcap(hidden, weight, labels, *, reduction="mean", chunk_size=16, softcap=None):
        if softcap is not None:
            raise NotImplementedError("no softcap here")
        return linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=chunk_size)
    result = check_loss_kernel(model, loss_kernel=LossKernel.from_function(no_softcap, "no softcap"))
    assert result.verdict == "PASS" and "reductions=mean,sum,none" in result.case, str(result)
    assert "softcap=" not in result.case and "(18 cases declined)" in result.case
    assert all("softcap=" in d and "not checked" in d for d in result.details if "declined" not in d and
               "NotImplementedError" in d)
