"""The pytest plugin in a throwaway project's suite (pytester): inert by default; with --llama-verify-target (or
llama_verify = true and a conftest fixture) one test per property, failing with the check's report, skipped where
the property does not apply."""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401
# ^ before any pytester run: an in-process run drops from sys.modules what was first imported during it, and
# torch._dynamo cannot be imported a second time (its trace_rules registers a TORCH_LIBRARY namespace), so a later
# test whose check reaches it raised "Only a single TORCH_LIBRARY ..." (measured)

SEED_STYLE = Path(__file__).parent / "targets" / "seed_style.py"
TRAIN_STEPS = Path(__file__).parent / "targets" / "train_steps.py"


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A user's project: its own test, and a factory file of a few lines wrapping a Meta-style model."""
    monkeypatch.setenv("COLUMNS", "200")  # summary lines cut at the terminal's width (80 without one) would not match
    pytester.makepyfile(test_own="def test_own():\n    assert True\n")
    pytester.makepyfile(factory=f"""
        import importlib.util
        import sys

        spec = importlib.util.spec_from_file_location("seed_style", {str(SEED_STYLE)!r})
        seed_style = sys.modules["seed_style"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(seed_style)

        def make():
            return seed_style.make()  # the seed report's cache indexing

        def make_trainable():
            return seed_style.make_trainable()
    """)
    return pytester


def _run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    # In-process: torch is imported once. verify is imported already, so pytest cannot rewrite its asserts: say so.
    return project.runpytest("-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", *args)


def test_the_plugin_is_registered_and_inert_unless_asked(project):
    assert any(e.value == "verify.pytest_plugin" for e in entry_points(group="pytest11"))
    result = _run(project)
    result.assert_outcomes(passed=1)  # the project's own test, nothing added


def test_a_target_adds_one_test_per_property_with_our_failure_messages(project):
    result = _run(project, "--llama-verify-target=factory.py:make", "-rfs")
    result.assert_outcomes(passed=1, failed=1, skipped=7)  # skipped: packing, loss_kernel and tied_embeddings too
    result.stdout.fnmatch_lines(["*_ test_llama_verify?kv_cache-model dtype? _*",
                                 "kv_cache: FAIL max_abs=inf*",
                                 "  raised: RuntimeError*(at seed_style.py:* in update_cache)"])
    result.stdout.fnmatch_lines(["FAILED llama_verify::test_llama_verify?kv_cache-model dtype? - Failed: kv_cache: FAIL*",
                                 "*SKIPPED*lora_merge not applicable: no LoRA layers*"])
    assert "During handling" not in result.stdout.str() and "Traceback" not in result.stdout.str()


def test_a_conftest_fixture_and_a_train_step_run_every_property(project):
    project.makeini("[pytest]\nllama_verify = true\n")
    project.makeconftest("""
        import pytest
        from factory import make_trainable

        @pytest.fixture(scope="session")
        def llama_verify_target():
            return make_trainable
    """)
    result = _run(project, f"--llama-verify-train-step={TRAIN_STEPS}:token_mean_step",
                               "-k", "grad_accum or lora_merge or mixed_precision", "-rs")
    result.assert_outcomes(passed=2, skipped=1, deselected=6)
    result.stdout.fnmatch_lines(["*SKIPPED*mixed_precision not applicable*"])


def test_asked_without_a_target_is_a_usage_error(project):
    project.makeini("[pytest]\nllama_verify = true\n")
    result = _run(project)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*llama_verify = true needs a llama_verify_target fixture*"])
