"""The properties as tests of the user's own suite: a pytest plugin (entry point ``pytest11``), off unless asked.

Asked by ``--llama-verify-target=SPEC`` (a factory, as for ``llama-verify --target``) or by ``llama_verify = true``
in the project's pytest configuration with a ``llama_verify_target`` fixture in its conftest returning the factory
(or a model). Only then is :class:`LlamaVerifyPlugin` registered (pytest's own ``stepwise`` pattern: an installed
but unused plugin adds no hook, no fixture, no test), and the suite also collects the tests of
``verify/pytest_checks.py``, as if they were a module ``llama_verify`` at the project's root (so the project's
conftest fixtures reach them): one test per property of the registry (:mod:`verify.properties`) × dtype,
``llama_verify::test_llama_verify[kv_cache-model dtype]`` …, failing with the check's own report, skipped with the
reason where a property does not apply. ``--llama-verify-train-step=SPEC`` (or a ``llama_verify_train_step``
fixture) is the training step for the GA check, ``--llama-verify-mp-train-step`` (``llama_verify_mp_train_step``)
the mixed-precision one for the MP check; ``--llama-verify-dtype`` (repeatable) the dtypes to check in (default:
the model's own).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest

PLUGIN_NAME = "llama-verify-checks"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llama-verify", "the llama-verify properties on your model")
    group.addoption("--llama-verify-target", metavar="SPEC", default=None,
                    help="PATH.py:FACTORY or package.module:FACTORY: run every property on the model it returns")
    group.addoption("--llama-verify-train-step", metavar="SPEC", default=None,
                    help="PATH.py:FN or package.module:FN: your training step, for the gradient-accumulation check")
    group.addoption("--llama-verify-mp-train-step", metavar="SPEC", default=None,
                    help="PATH.py:FN or package.module:FN: your mixed-precision step, for the mixed-precision check")
    group.addoption("--llama-verify-dtype", action="append", choices=["float32", "bfloat16", "float16"],
                    help="check in this dtype too (repeatable; default: the model's own)")
    parser.addini("llama_verify", type="bool", default=False,
                  help="run the llama-verify properties, on the llama_verify_target fixture of your conftest")


@pytest.hookimpl
def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin only when asked; a bad SPEC is a usage error before anything is collected."""
    if not (config.getoption("llama_verify_target") or config.getini("llama_verify")):
        return
    from .targets.spec import load_factory
    from .targets.train_step import load_train_step
    target, step = config.getoption("llama_verify_target"), config.getoption("llama_verify_train_step")
    mp_step = config.getoption("llama_verify_mp_train_step")
    try:
        plugin = LlamaVerifyPlugin(load_factory(target) if target else None,
                                   load_train_step(step) if step else None,
                                   load_train_step(mp_step) if mp_step else None)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.pluginmanager.register(plugin, PLUGIN_NAME)


class _ChecksModule(pytest.Module):
    """``verify.pytest_checks``, collected as a module at the project's root: no file of ours is put on the
    collection path (the conftest files above it would be loaded into the user's session)."""

    def _getobj(self) -> Any:
        from . import pytest_checks
        return pytest_checks


class LlamaVerifyPlugin:
    """The properties' tests, their parametrisation (read from the registry) and their default fixtures."""

    def __init__(self, factory: Optional[Callable[[], Any]], train_step: Optional[Callable[..., float]],
                 mp_train_step: Optional[Callable[..., float]]):
        self.factory, self.train_step, self.mp_train_step = factory, train_step, mp_train_step

    @pytest.hookimpl(tryfirst=True)  # before -k / -m deselect: they apply to these tests too
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        module = _ChecksModule.from_parent(session, path=config.rootpath / "llama_verify")
        items.extend(item for item in module.collect() if isinstance(item, pytest.Item))

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "llama_verify_property" in metafunc.fixturenames:
            from .properties import default_names
            metafunc.parametrize("llama_verify_property", default_names())
        if "llama_verify_dtype" in metafunc.fixturenames:
            dtypes = metafunc.config.getoption("llama_verify_dtype") or [None]
            metafunc.parametrize("llama_verify_dtype", dtypes, ids=[d or "model dtype" for d in dtypes])

    @pytest.fixture(scope="session")
    def llama_verify_target(self) -> Callable[[], Any]:
        """The factory of the model under test (override it in your conftest to give one without the option)."""
        if self.factory is None:
            raise pytest.UsageError("llama_verify = true needs a llama_verify_target fixture in your conftest "
                                    "(returning a factory or a model), or --llama-verify-target=SPEC")
        return self.factory

    @pytest.fixture(scope="session")
    def llama_verify_train_step(self) -> Optional[Callable[..., float]]:
        """Your training step for the GA check, or None (the target's own loop, where it has one)."""
        return self.train_step

    @pytest.fixture(scope="session")
    def llama_verify_mp_train_step(self) -> Optional[Callable[..., float]]:
        """Your mixed-precision step for the MP check, or None (the target's own step, where it has one)."""
        return self.mp_train_step
