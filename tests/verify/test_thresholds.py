"""Each claim's detection threshold (verify.thresholds): an error of a fraction of its allowance, put at a stated
place of every comparison judging the claim, passes; twice the allowance fails. The allowances come from
verify/tolerances.py, and docs/verification.md lists them: loosening or tightening one moves both."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from verify.compare import Probe, compare, compare_calibrated, probing
from verify.thresholds import CLAIMS, RUNS, probe, rows

from .test_coverage import COVERED

DOCS = Path(__file__).resolve().parents[2] / "docs" / "verification.md"
# The runs the pass test makes: each check once, every claim of it probed at once — those test_coverage.py does not
# make already (its runs carry the same probes and also record what each check compared).
ALL_GROUPS = sorted({(c.run, tuple(sorted(c.kwargs.items()))) for c in CLAIMS})
GROUPS = [(r, k) for r, k in ALL_GROUPS if k or r not in COVERED]
# Cheaper inputs for the failing runs: the claim is still examined (the probe's hits say so), and stopping at the
# first failure does not change whether the check fails.
QUICK = {"grad_accum": {"fail_fast": True, "lora": (False,), "optimizer": "sgd", "steps": 2},
         "mixed_precision": {"fail_fast": True}, "kv_cache": {"batch_sizes": (3,)},
         "kv_cache bf16": {"batch_sizes": (3,)}}


SLOW = pytest.mark.slow  # property 6 spawns ranks: the slow lane


@pytest.mark.parametrize("run, kwargs", [pytest.param(r, k, marks=[SLOW] if r == "distributed" else [],
                                                      id=f"{r}{'-' + str(dict(k)) if k else ''}") for r, k in GROUPS])
def test_every_claim_passes_with_an_error_below_its_allowance(run, kwargs):
    claims = [c for c in CLAIMS if c.run == run and tuple(sorted(c.kwargs.items())) == kwargs]
    probes = [Probe(c.names, c.passes_at, c.place) for c in claims]
    with probing(*probes):
        result = RUNS[run](**dict(kwargs))
    assert result.ok, str(result)
    for c, p in zip(claims, probes):
        assert p.hits and not p.missed, (c.key, p.missed)
        assert all(h.at is not None and h.error > 0 for h in p.hits), c.key  # an error really was put in


@pytest.mark.parametrize("claim", [pytest.param(c, marks=[SLOW] if c.run == "distributed" else [], id=c.key)
                                   for c in CLAIMS])
def test_each_claim_fails_with_twice_its_allowance_at_its_place(claim):
    result, p = probe(claim, 2.0, **QUICK.get(claim.run, {}))
    assert p.hits and not p.missed, p.missed
    assert not result.ok and result.details, str(result)


def test_every_run_is_probed_below_its_allowance_here_or_in_test_coverage():
    assert {r for r, k in ALL_GROUPS if not k} - set(COVERED) == {r for r, k in GROUPS if not k}
    assert set(COVERED) <= set(RUNS)


def test_the_probe_puts_exactly_the_multiple_of_the_allowance():
    import torch
    from verify.tolerances import Tolerance
    e = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    tol = Tolerance(1e-3, 1e-4)
    for multiple, ok in ((0.99, True), (1.01, False)):
        with probing(Probe("x", multiple, (1, 0))) as (p,):
            c = compare(e.clone(), e, tol, "x", scale=torch.tensor([[4.0], [2.0]]))
        assert c.ok is ok and c.where == (1, 0) and c.margin == pytest.approx(multiple)
        assert p.hits[0].error == pytest.approx(multiple * (1e-4 + 1e-3 * 2.0))
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    plain = ref + torch.tensor([0.0, 1e-3], dtype=torch.float64)
    for multiple, ok in ((0.99, True), (1.01, False)):
        with probing(Probe("y", multiple, (0,))):
            c = compare_calibrated(ref + torch.tensor([0.0, 2e-3], dtype=torch.float64), plain, ref, 4.0, name="y")
        assert c.ok is ok and c.ratio == pytest.approx(4.0 * multiple)
    with probing(Probe("y", 0.1, (0,))) as (p,):  # the error elsewhere (2x) already exceeds 0.1·4x: said
        assert compare_calibrated(ref + torch.tensor([0.0, 2e-3], dtype=torch.float64), plain, ref, 4.0,
                                  name="y").ok
    assert p.missed and not p.hits
    with probing(Probe("z", 2.0, (5,))) as (p,):  # no such element: said, nothing changed
        assert compare(e[0], e[0], tol, "z").ok
    assert p.missed == ["z: no element at (5,) of a tensor of shape (2,)"]


def test_the_documented_allowances_are_the_tolerance_tables():
    documented = [line for line in DOCS.read_text().splitlines() if re.match(r"\| `\w+\.\w+` \|", line)]
    assert [" | ".join(d.split(" | ")[:4]) + " |" for d in documented] == rows(), \
        "docs/verification.md's threshold table is stale: re-run python -m verify.thresholds"


def test_the_documented_command_measures_a_claim(capsys):
    from verify.thresholds import main
    assert main(["--claim", "lora_merge.fresh"]) == 0
    rows_out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `lora_merge.fresh`")]
    assert len(rows_out) == 1 and rows_out[0].startswith(rows()[[c.key for c in CLAIMS].index("lora_merge.fresh")])
    assert float(rows_out[0].split(" | ")[4]) == pytest.approx(1.0, abs=0.02)  # fails at its allowance, no sooner
