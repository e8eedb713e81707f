"""``llama-verify``'s defaults are what its help promises: a run with no --dtype, --attn-impl or --check covers
float32 and bfloat16, the math and SDPA attention paths and every property of the default run (a default that
silently dropped one would pass every other test)."""
from __future__ import annotations

import verify.__main__ as cli
from verify.properties import default_names


def test_no_flags_run_every_property_in_both_dtypes_and_both_attention_paths(monkeypatch, capsys):
    asked = {}

    def recording(factory, inputs, *, checks, dtypes, attn_impls, device):
        asked.update(checks=list(checks), dtypes=list(dtypes), attn_impls=list(attn_impls), device=device)
        return []
    monkeypatch.setattr(cli, "run_checks", recording)
    assert cli.main([]) == 0
    assert asked == {"checks": default_names(), "dtypes": ["float32", "bfloat16"], "attn_impls": ["math", "sdpa"],
                     "device": "cpu"}
    help_text = " ".join(cli._parser().format_help().split())  # argparse wraps lines
    assert "default: float32 and bfloat16" in help_text and "default: both" in help_text


def test_dtype_is_never_silently_ignored_on_a_ready_target(tmp_path, capsys):
    factory = tmp_path / "ready.py"
    factory.write_text("from tests.verify.targets import seed_style\n"
                       "from verify.targets.meta_style import MetaStyleTarget\n\n\n"
                       "def make():\n    return MetaStyleTarget(seed_style.make_fixed())\n")
    assert cli.main(["--target", f"{factory}:make", "--check", "kv_cache", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-verify: error: --dtype bfloat16: the factory returned a ready target "
                          "(MetaStyleTarget)") and len(err.strip().splitlines()) == 1, err
    assert cli.main(["--target", f"{factory}:make", "--check", "kv_cache"]) == 0  # its own dtype, on the CPU


def test_a_ready_target_is_never_moved_and_only_a_device_asked_for_is_checked():
    import pytest

    from tests.verify.targets import seed_style
    from verify.properties import Inputs
    from verify.runner import run_target_checks
    from verify.targets.meta_style import MetaStyleTarget

    def factory():
        return MetaStyleTarget(seed_style.make_fixed())
    for device in (None, "cpu"):  # no --device, or the one it is on: run
        assert run_target_checks(factory, Inputs(seed=0), checks=["kv_cache"], device=device)[0].ok
    with pytest.raises(ValueError, match=r"^--device meta: the factory returned a ready target"):
        run_target_checks(factory, Inputs(seed=0), checks=["kv_cache"], device="meta")
