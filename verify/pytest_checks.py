"""The tests the llama-verify pytest plugin adds to a suite (collected only when it is asked: see
:mod:`verify.pytest_plugin`). Not named test_*: no suite's own collection picks it up by itself."""
from __future__ import annotations

import copy

import pytest
import torch

from verify.properties import Inputs
from verify.runner import run_target_checks
from verify.testing import verdict


def test_llama_verify(llama_verify_property, llama_verify_target, llama_verify_train_step,
                      llama_verify_mp_train_step, llama_verify_dtype):
    # a factory; a model given as such is copied for each check (the checks may move it to another dtype)
    factory = llama_verify_target if not isinstance(llama_verify_target, torch.nn.Module) else (
        lambda: copy.deepcopy(llama_verify_target))
    inputs = Inputs(seed=0, train_step=llama_verify_train_step, mp_train_step=llama_verify_mp_train_step)
    results = run_target_checks(factory, inputs, checks=[llama_verify_property], dtypes=[llama_verify_dtype])
    failed = [str(r) for r in results if not r.ok]  # a property may check several implementations (its kernels)
    if failed:
        pytest.fail("\n".join(failed), pytrace=False)  # the check's report, without a traceback into verify
    verdict(next((r for r in results if not r.not_applicable), results[0]))  # skips where nothing applied
