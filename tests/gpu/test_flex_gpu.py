"""attn_impl "flex" on CUDA (``-m gpu``; scripts/gpu_lane.sh runs it): compiled flex_attention with the document
BlockMask trains — property 7 (packed rows equal padded ones, gradients and the loop included) and the KV cache."""
from __future__ import annotations

import pytest
import torch

from llama_ref.flex import flex_available
from verify.checks.kv_cache import check_kv_cache
from verify.checks.packing import check_packing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(flex_available() is not None, reason=str(flex_available()))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flex_packs_and_caches_on_cuda(dtype):
    from llama_ref.default import default_model
    model = default_model(attn_impl="flex").to("cuda", dtype)
    assert check_packing(model).verdict == "PASS"
    assert check_kv_cache(model).verdict == "PASS"
