"""Test-suite wiring: markers and device gating, hypothesis profiles, torch global-state hygiene."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

pytest_plugins = ("pytester",)  # tests/verify/test_pytest_plugin.py runs throwaway suites

# Hypothesis profiles: `dev` for quick local runs, `ci` reproducible (derandomized, no deadline: CPU timing on
# shared machines is noise), `thorough` for nightly runs. HYPOTHESIS_PROFILE wins; CI=... selects `ci`.
settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread per process: the test models are too small to gain from more, and under pytest-xdist (or any
    # other load) OpenMP threads waiting at barriers for a preempted sibling made the suite 10x slower.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not the keyword: tests/gpu/ is a keyword too
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """Each test starts and leaves with the same default dtype, determinism, TF32 flags, threads and RNG."""
    saved = dict(
        dtype=torch.get_default_dtype(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        deterministic_warn=torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn_det=torch.backends.cudnn.deterministic,
        cudnn_bench=torch.backends.cudnn.benchmark,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
        matmul_precision=torch.get_float32_matmul_precision(),
        threads=torch.get_num_threads(),
        rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    yield
    torch.set_default_dtype(saved["dtype"])
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
            saved["deterministic"], saved["deterministic_warn"]):  # its first call costs ~3 s even as a no-op
        torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["deterministic_warn"])
    torch.backends.cudnn.deterministic = saved["cudnn_det"]
    torch.backends.cudnn.benchmark = saved["cudnn_bench"]
    torch.backends.cuda.matmul.allow_tf32 = saved["tf32_matmul"]
    torch.backends.cudnn.allow_tf32 = saved["tf32_cudnn"]
    torch.set_float32_matmul_precision(saved["matmul_precision"])
    if torch.get_num_threads() != saved["threads"]:
        torch.set_num_threads(saved["threads"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
