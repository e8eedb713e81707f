"""attn_impl "flex" (llama_ref.flex): the causal, cached and packed masks as BlockMasks give the math path's logits;
off CUDA it runs forward-only and says so when asked for gradients (tests/gpu/test_flex_gpu.py trains it)."""
from __future__ import annotations

import pytest
import torch

from llama_ref.flex import flex_available

pytestmark = pytest.mark.skipif(flex_available() is not None, reason=str(flex_available()))


@pytest.fixture(scope="module")
def pair():
    from llama_ref.default import default_model
    return default_model(attn_impl="math"), default_model(attn_impl="flex")


def test_flex_gives_the_math_paths_logits_plain_cached_and_packed(pair):
    math_, flex = pair
    tokens = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6]] * 3)
    with torch.no_grad():
        for m in pair:  # cached: a chunk of 12, then one of 8 at start_pos 12 (bottom-right alignment)
            m.kv_caching = True
        first = [m(tokens[:, :12], 0) for m in pair]
        second = [m(tokens[:, 12:], 12) for m in pair]
        for m in pair:
            m.kv_caching = False
        plain = [m(tokens, 0) for m in pair]
        packed = [m(tokens, 0, positions=positions) for m in pair]
    for name, (a, b) in {"first chunk": first, "second chunk": second, "plain": plain, "packed": packed}.items():
        torch.testing.assert_close(b, a, msg=lambda m, name=name: f"{name}: {m}")
    # the packed mask is not the plain one: documents do not see each other
    assert not torch.allclose(packed[1], plain[1])


def test_off_cuda_a_forward_with_gradients_is_an_error_saying_so(pair):
    _, flex = pair
    flex.kv_caching = False
    with pytest.raises(ValueError, match="trains on CUDA only: torch's FlexAttention has no backward on cpu"):
        flex(torch.zeros((1, 4), dtype=torch.long), 0)

