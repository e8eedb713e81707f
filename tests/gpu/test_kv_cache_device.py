"""The KV-cache property on each device: the same test body runs on CPU with the tiny model (default suite) and on
CUDA with the bench model (``-m gpu``), in fp32, bf16 and fp16, on both attention paths."""
from __future__ import annotations

import pytest
import torch

from llama_ref.args import ModelArgs
from llama_ref.model import Transformer, init_weights
from verify.checks.kv_cache import check_kv_cache

DEVICES = [
    pytest.param("cpu", "tiny", id="cpu-tiny"),
    pytest.param("cuda", "bench", id="cuda-bench", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device, preset", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_cached_equals_uncached_on_device(device, preset, dtype, attn_impl):
    model = init_weights(Transformer(ModelArgs.preset(preset, attn_impl=attn_impl)), 0).to(device, dtype)
    result = check_kv_cache(model, seed=0)
    assert result.ok, str(result)
    assert model.layers[0].attention.kv_cache.cache_k.device.type == device  # the cache moved with the model
