"""The KV check on code that is not ours: a Meta-style model (the seed report's, tests/verify/targets/seed_style.py)
through verify.targets.meta_style, and how a target is named, chosen and refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from llama_ref.default import default_model
from verify.checks.gradient_checkpointing import check_gradient_checkpointing
from verify.checks.kv_cache import check_kv_cache
from verify.targets.decode import greedy_generate
from verify.targets.llama_ref import LlamaRefTarget
from verify.targets.meta_style import MetaStyleTarget
from verify.targets.spec import as_target, load_factory

from . import seed_style

SEED_STYLE = Path(seed_style.__file__)


@pytest.fixture(scope="module")
def fixed():
    return seed_style.make_fixed()


def test_the_seed_reports_cache_indexing_fails_the_kv_check_where_it_crashes():
    result = check_kv_cache(seed_style.make())
    # cache_k[:, bsz, ...] puts the batch size where a position goes: the write does not fit, and the report points
    # at the user's line, not into torch.
    assert not result.ok and result.error.startswith("RuntimeError: ")
    assert "(at seed_style.py:" in result.error and result.error.endswith(" in update_cache)")


def test_metas_indexing_passes_and_leaves_the_model_as_it_was(fixed):
    fixed.train()
    attn = fixed.layers[0].attention
    attn.cache_k.normal_()  # whatever the user's cache held before the check
    before = attn.cache_k.clone()
    result = check_kv_cache(fixed)
    assert result.ok and result.not_applicable is None, str(result)
    assert fixed.training and attn.kv_caching is True and torch.equal(attn.cache_k, before)


class _WritesAtZero(seed_style.Attention):
    """A cache write that ignores ``start_pos`` (every chunk lands at position 0): no crash, wrong keys."""

    def update_cache(self, xk, xv, bsz, start_pos, seqlen):
        self.cache_k[:bsz, :seqlen] = xk
        self.cache_v[:bsz, :seqlen] = xv
        return self.cache_k[:bsz, :start_pos + seqlen], self.cache_v[:bsz, :start_pos + seqlen]


def test_a_wrong_cache_that_does_not_crash_is_caught_through_the_adapter():
    result = check_kv_cache(seed_style.make(_WritesAtZero))
    assert not result.ok and result.error is None
    assert any(d.startswith("teacher-forced B=3 chunks=1x24: ") for d in result.details), str(result)


def test_without_a_switch_the_kv_check_is_not_applicable_and_says_why():
    model = seed_style.make_fixed()
    for layer in model.layers:
        del layer.attention.kv_caching  # Meta's own code: always cached
    result = check_kv_cache(model)
    assert result.verdict == "N/A" and "no boolean kv_caching attribute" in result.not_applicable
    assert not hasattr(model.layers[0].attention, "kv_caching")  # nothing was created on the user's modules


def test_a_switch_given_as_a_callable_is_used():
    model = seed_style.make_fixed()
    for layer in model.layers:
        layer.attention.kv_caching = "yes"  # not a bool: not taken for a switch

    def switch(m: nn.Module, on: bool) -> None:
        for layer in m.layers:
            layer.attention.kv_caching = on
    assert check_kv_cache(MetaStyleTarget(model, kv_switch=switch)).ok


def test_a_switch_with_no_effect_is_a_failure_not_a_pass():
    # Cached compared with cached would always agree: the adapter sees the cache written while "off".
    result = check_kv_cache(MetaStyleTarget(seed_style.make_fixed(), kv_switch=lambda m, on: None))
    assert not result.ok and "the switch has no effect" in result.error


def test_gradient_properties_are_not_applicable_under_inference_mode(fixed):
    target = as_target(fixed)
    for prop in ("grad_accum", "mixed_precision", "gradient_checkpointing"):
        assert "torch.inference_mode()" in target.not_applicable(prop)


def test_a_forward_under_no_grad_is_not_applicable_too_never_a_crash():
    # torch.no_grad(), not inference_mode: the forward's output has no gradient path either.
    import types
    model = seed_style.make_lora()
    model.forward = types.MethodType(torch.no_grad()(seed_style.Transformer.forward.__wrapped__), model)
    target = as_target(model)
    for prop in ("grad_accum", "mixed_precision", "gradient_checkpointing"):
        assert "without autograd" in target.not_applicable(prop), prop
    result = check_gradient_checkpointing(model)
    assert result.not_applicable and "without autograd" in result.not_applicable and result.error is None


def test_the_check_decode_loop_generates_what_llama_refs_generate_does():
    # verify's greedy loop (for targets without a generate of their own) against the product's Meta algorithm.
    target = LlamaRefTarget(default_model(0))
    prompts = [[1, 5, 9], [1, 7], [1, 2, 3, 4, 6]]
    with target.kv_session():
        for kv in (True, False):
            ours, ours_lp = greedy_generate(target.logits, prompts, 8, target.limits.max_seq_len,
                                            target.limits.device, kv_caching=kv)
            product, product_lp = target.generate(prompts, 8, kv_caching=kv)
            assert ours == product
            # float64 log-softmax of the same fp32 logits vs the product's fp32 cross-entropy: fp32 rounding apart
            torch.testing.assert_close(torch.tensor(ours_lp, dtype=torch.float64), torch.tensor(product_lp, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5)


def test_llama_refs_uncached_logits_leave_the_cache_in_place():
    # The uncached reference is computed beside the cache, not by dropping it: the stale rows the check wrote
    # first are still there for the cached runs after it.
    target = LlamaRefTarget(default_model(0))
    tokens = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    with target.kv_session():
        target.logits(tokens, 0, kv_caching=True)
        cache = target.model.layers[0].attention.kv_cache
        written = cache.cache_k.clone()
        target.logits(tokens[:1], 0, kv_caching=False)
        assert target.model.layers[0].attention.kv_cache is cache and torch.equal(cache.cache_k, written)


# ---- choosing and refusing targets ----------------------------------------------------------------------------

def test_an_object_no_adapter_takes_is_refused_with_what_it_lacks():
    with pytest.raises(TypeError, match=r"Linear is not a model verify can adapt.*forward\(tokens, start_pos\).*"
                                        r"cache_k / cache_v"):
        as_target(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cache_cls: parts of llama_ref's Transformer"):
        as_target(seed_style.make_fixed(), cache_cls=object)


@pytest.mark.parametrize("spec,message", [
    ("nonsense", "expected PATH.py:FACTORY or package.module:FACTORY"),
    ("missing.py:make", "no such file missing.py"),
    (f"{SEED_STYLE}:nope", "has no nope"),
    ("no_such_package.mod:make", "cannot import no_such_package.mod"),
    ("tests.verify.targets.seed_style:SEED_STYLE_NOT_THERE", "has no SEED_STYLE_NOT_THERE"),
])
def test_a_bad_target_spec_is_a_message_naming_it(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_factory(spec)
    assert spec in str(info.value)


def test_cli_target_exits_1_on_the_seed_model_and_0_on_the_fixed_one_listing_what_does_not_apply(capsys):
    from verify.__main__ import main

    assert main(["--target", f"{SEED_STYLE}:make", "--check", "kv_cache", "--check", "lora_merge"]) == 1
    out = capsys.readouterr().out
    assert "kv_cache" in out and "FAIL" in out and "1 failed, 1 not applicable" in out
    assert main(["--target", "tests.verify.targets.seed_style:make_fixed"]) == 0
    out = capsys.readouterr().out
    assert "1/8 checks passed, 0 failed, 7 not applicable" in out  # packing, loss_kernel, tied: not for this model
    table = out.split("\n\n")[1].splitlines()  # after the header lines, before the notes
    assert sum(line.endswith(" N/A") for line in table) == 7 and max(map(len, table)) <= 120
    assert "not applicable: the forward runs under torch.inference_mode()" in out


def test_cli_bad_target_is_exit_2_with_one_line(capsys, tmp_path):
    from verify.__main__ import main

    factory = tmp_path / "f.py"
    factory.write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    assert main(["--target", f"{factory}:make"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-verify: error: Linear is not a model verify can adapt") and err.count("\n") == 1


def test_the_uncached_path_reads_no_cache(fixed):
    # Poisoned cache buffers change nothing uncached (the adapter itself refuses a forward that writes them: above).
    target = as_target(fixed)
    tokens = torch.randint(0, target.limits.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with target.kv_session():
        clean = target.logits(tokens, 0, kv_caching=False)
        for m in target.attention:
            m.cache_k.normal_(0, 1e3)
            m.cache_v.normal_(0, 1e3)
        assert torch.equal(target.logits(tokens, 0, kv_caching=False), clean)
