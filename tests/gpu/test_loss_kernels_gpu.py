"""Property 8 on CUDA (``-m gpu``; scripts/gpu_lane.sh runs it): llama_ref's fused kernel and torch's
linear_cross_entropy on the bench model's shape with Llama 3's 128,256-word vocabulary, in fp32 and bf16 weights —
and the Triton kernels people fine-tune with, Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy,
wrapped to the documented kernel signature, where they are installed (the lane installs nothing from a registry:
absent, they skip and say so)."""
from __future__ import annotations

import pytest
import torch

from llama_ref.args import ModelArgs
from llama_ref.model import Transformer, init_weights
from verify.checks.loss_kernel import check_loss_kernel
from verify.targets.loss_kernel import LossKernel

pytestmark = pytest.mark.gpu


def _liger() -> LossKernel:
    functional = pytest.importorskip("liger_kernel.transformers.functional",
                                     reason="liger-kernel is not installed on this machine")

    def kernel(hidden, weight, labels, *, reduction="mean", bias=None, softcap=None):
        out = functional.liger_fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction,
                                                          softcap=softcap)
        return getattr(out, "loss", out[0] if isinstance(out, tuple) else out)
    return LossKernel("liger_fused_linear_cross_entropy", kernel, frozenset({"bias", "softcap"}))


def _cce() -> LossKernel:
    cce = pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy is not installed on this machine")

    def kernel(hidden, weight, labels, *, reduction="mean", bias=None, softcap=None):
        return cce.linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=softcap, reduction=reduction,
                                        ignore_index=-100)
    return LossKernel("cut_cross_entropy.linear_cross_entropy", kernel, frozenset({"bias", "softcap"}))


def _model(dtype: torch.dtype) -> Transformer:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return init_weights(Transformer(ModelArgs.preset("bench", vocab_size=128256)), 0).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["fused", "chunked", "torch"])
def test_llama_refs_and_torchs_kernels_on_cuda(kernel, dtype):
    result = check_loss_kernel(_model(dtype), kernel=kernel)
    assert result.verdict in ("PASS", "N/A"), str(result)  # N/A: torch's, below 2.13


@pytest.mark.parametrize("make", [_liger, _cce], ids=["liger", "cut_cross_entropy"])
def test_the_triton_kernels_people_use(make):
    kernel = make()
    result = check_loss_kernel(_model(torch.bfloat16), loss_kernel=kernel)
    assert result.ok, str(result)
