"""The registry of properties: a property is one record, and everything a user reaches is derived from it — the CLI's
table and ``--check``, the pytest plugin's tests, ``verify.testing`` and the mutant registry; a target is validated
against its property's protocols before the check runs."""
from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from typing import Optional, Protocol

import pytest
import torch
import torch._dynamo  # noqa: F401  (before pytester's in-process run: tests/verify/test_pytest_plugin.py says why)

import verify.mutants as zoo
from verify.mutants import mutants_for
from verify.properties import PROPERTIES, Inputs, Property, default_names, registered
from verify.result import CheckResult
from verify.runner import PropertyUnavailable, run_target_checks
from verify.targets.base import Target, why_not
from verify.targets.protocols import Limits, members, missing_members


class ToyTarget(Protocol):
    """The toy property's protocol: one member."""

    @property
    def limits(self) -> Limits:
        """The model's limits."""
        ...


def check_toy(model, *, seed: int = 0, toy_part: Optional[object] = None) -> CheckResult:
    """A toy property: the target's vocabulary is positive (fails when ``toy_part`` is given: its zoo's bug)."""
    from verify.targets.spec import as_target
    target = as_target(model)
    why = why_not(target, "toy", (ToyTarget,))
    if why:
        return CheckResult.na("toy", why, str(target))
    ok = target.limits.vocab_size > 0 and toy_part is None
    return CheckResult("toy", ok, 0.0, 0.0, None, [] if ok else ["the toy part is wrong"], f"toy seed={seed}")


class _ToyZoo:  # a zoo module's shape: a ZOO list
    from verify.mutants.base import Mutant
    ZOO = [Mutant("toy_wrong_part", "toy", "a wrong toy part", "this test", components={"toy_part": object()})]


TOY = Property("toy", "toy", "the vocabulary is positive", check_toy, (ToyTarget,), _ToyZoo, "assert_toy_right",
               parts=frozenset({"toy_part"}))


@pytest.fixture
def toy():
    with registered(TOY) as prop:
        yield prop


def test_a_toy_property_is_one_record_and_found_everywhere(toy, capsys):
    from verify import testing
    from verify.__main__ import main

    assert "toy" in default_names()
    assert main(["--check", "toy", "--dtype", "float32", "--attn-impl", "math"]) == 0  # --check takes it
    out = capsys.readouterr().out
    assert "toy" in out.split("---")[-1] and "PASS" in out and "1/1 checks passed" in out  # a row of the table
    assert testing.assert_toy_right(_llama_ref()).name == "toy"
    assert "assert_toy_right" in dir(testing)
    assert [m.name for m in mutants_for("toy")] == ["toy_wrong_part"] and "toy_wrong_part" in zoo.MUTANTS  # read at each access
    assert not TOY(_llama_ref(), Inputs(), toy_part=object()).ok  # its component reaches its check
    assert main(["--check", "toy", "--dtype", "float32", "--attn-impl", "math", "--mutants"]) == 0  # zoo caught
    assert re.search(r"^toy_wrong_part +toy +FAILS +caught$", capsys.readouterr().out, re.M)


def test_the_kill_matrix_gives_a_mutants_parts_only_to_the_checks_that_take_them(toy):
    from verify.runner import kill_matrix, uncaught
    kv = mutants_for("kv_cache")[0]
    mutants = [_ToyZoo.ZOO[0], kv]
    matrix = kill_matrix(lambda **over: _llama_ref(), Inputs(), mutants, checks=["toy", "kv_cache"])
    assert not matrix["toy_wrong_part"]["toy"].ok and matrix["toy_wrong_part"]["kv_cache"].ok
    assert matrix[kv.name]["toy"].ok and not matrix[kv.name]["kv_cache"].ok
    assert uncaught(matrix, mutants) == []


def test_without_the_record_it_is_nowhere(capsys):
    from verify import testing
    from verify.__main__ import main

    assert "toy" not in default_names() and not hasattr(testing, "assert_toy_right")
    with pytest.raises(SystemExit):
        main(["--check", "toy"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_a_toy_property_becomes_a_test_of_the_plugin(toy, pytester):
    pytester.makepyfile(factory="def make():\n    from llama_ref.default import default_model\n"
                                "    return default_model()\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                                "--llama-verify-target=factory.py:make", "-k", "toy", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["llama_verify::test_llama_verify?toy-model dtype?"])


def test_a_record_checks_its_parts_against_its_check():
    with pytest.raises(TypeError, match=r"parts \['nope'\] are not keyword-only arguments of check_toy"):
        Property("toy2", "toy", "…", check_toy, parts=frozenset({"nope"}))
    with pytest.raises(ValueError, match="registered already"):
        with registered(PROPERTIES["kv_cache"]):
            pass
    with pytest.raises(TypeError, match=r"takes no components \['cache_cls'\]"):
        PROPERTIES["lora_merge"](None, Inputs(), cache_cls=object)


def test_every_property_of_the_default_run_has_a_zoo_and_a_protocol():
    for name in default_names():
        prop = PROPERTIES[name]
        assert len(prop.zoo) >= 6 and prop.protocols, name
        assert all(m.prop == name for m in prop.zoo)
        assert "Args:" in inspect.getdoc(prop.check), f"{prop.check.__qualname__}: no Args:"


def test_every_public_check_documents_each_parameter_under_args():
    from pathlib import Path

    import verify.checks
    checks = []
    for path in sorted(Path(verify.checks.__file__).parent.glob("[!_]*.py")):
        module = importlib.import_module(f"verify.checks.{path.stem}")
        checks += [f for n, f in vars(module).items()
                   if n.startswith("check_") and inspect.isfunction(f) and f.__module__ == module.__name__]
    assert len(checks) >= 8, [f.__qualname__ for f in checks]
    for check in checks:
        doc = inspect.getdoc(check) or ""
        assert re.search(r"^Args:$", doc, re.M), f"{check.__module__}.{check.__qualname__}: no Args:"
        args = doc.split("Args:", 1)[1]
        missing = [n for n in inspect.signature(check).parameters if not re.search(rf"^    {n}:", args, re.M)]
        assert not missing, f"{check.__module__}.{check.__qualname__}: Args: lacks {missing}"


# ---- declared protocols, validated up front ----------------------------------------------------------------------

class _Half(Target):
    """A target written from the protocols, with one member of the LoRA layer missing (its ``alpha``)."""

    description = "a half-written target"

    @property
    def limits(self) -> Limits:
        return Limits(16, 2, 8, torch.float32, torch.device("cpu"))

    def lora_target(self, **_):
        layer = type("Layer", (), {n: None for n in ("name", "weight", "lora_A", "lora_B", "rank", "use_rslora",
                                                     "dropout", "merged", "merges_on_eval", "set_merges_on_eval",
                                                     "merge", "unmerge")})()
        lora = type("Lora", (), {n: None for n in ("description", "no_gradient", "unloaded_logits", "logits",
                                                   "base_logits", "train", "merge", "unmerge", "to_float64",
                                                   "lora_parameter_names", "named_parameters", "zero_grad")})()
        lora.layers = [layer]
        return lora


def test_a_target_short_of_a_member_is_not_applicable_naming_it_never_a_failure():
    target = _Half()
    assert missing_members(target, PROPERTIES["lora_merge"].protocols) == []
    from verify.checks.lora_merge import check_lora_merge
    result = check_lora_merge(target)
    assert result.not_applicable and "LoRALayer.alpha" in result.not_applicable, result
    kv = run_target_checks(lambda: target, Inputs(), checks=["kv_cache"])[0]
    assert kv.not_applicable and "KVCacheTarget.kv_session" in kv.not_applicable
    with pytest.raises(PropertyUnavailable, match=r"^property kv_cache needs KVCacheTarget.kv_session, "
                                                   r"KVCacheTarget.logits, KVCacheTarget.generate of the target "
                                                   r"\(verify.targets.protocols\); a half-written target does "
                                                   r"not offer them$"):
        run_target_checks(lambda: target, Inputs(), checks=["kv_cache"], asked=True)


def test_asking_the_cli_for_a_property_the_target_lacks_is_a_one_line_usage_error(tmp_path, capsys):
    from verify.__main__ import main

    (tmp_path / "half.py").write_text(textwrap.dedent("""
        import torch
        from verify.targets.base import Target
        from verify.targets.protocols import Limits

        class Half(Target):  # limits only: nothing of property 4's copies
            description = "a half-written target"
            limits = Limits(16, 2, 8, torch.float32, torch.device("cpu"))

        def make():
            return Half()
    """))
    assert main(["--target", f"{tmp_path / 'half.py'}:make", "--check", "gradient_checkpointing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama-verify: error: property gradient_checkpointing needs TrainingCopies.fresh_model")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_protocols_declare_each_member_once_with_its_owner():
    from verify.targets.protocols import CheckpointingTarget, LoRALayer
    declared = members(CheckpointingTarget)
    assert declared["recompute_probes"] == "CheckpointingTarget" and declared["fresh_model"] == "TrainingCopies"
    assert declared["not_applicable"] == "Applicability" and "scaling" not in members(LoRALayer)


def _llama_ref():
    from llama_ref.default import default_model
    return default_model()
