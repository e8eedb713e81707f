"""A check never examines less than it says: what each check compared (recorded by a probe on every comparison,
verify.compare.Probe) is what its case states — positions, batch sizes, chunkings, scenarios, policies, parameters,
eval-merge on/off — so that a check made to compare fewer positions, rows, layers or steps fails here.

The same run is each check's half of tests/verify/test_thresholds.py: every claim of the check carries an error of
a fraction of its allowance (verify.thresholds.CLAIMS' ``passes_at``), and the check must still PASS."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from llama_ref.default import default_model
from verify.checks.grad_accum import check_grad_accumulation
from verify.checks.gradient_checkpointing import check_gradient_checkpointing
from verify.checks.kv_cache import check_kv_cache
from verify.checks.lora_merge import check_lora_merge
from verify.checks.loss_kernel import ROWS, SPLIT, chunk_sizes, check_loss_kernel
from verify.checks.packing import LENGTHS, check_packing
from verify.checks.mixed_precision import check_mixed_precision
from verify.compare import Probe, probing
from verify.targets.spec import as_target
from verify.thresholds import CLAIMS


# The runs of verify.thresholds.RUNS that these tests make (with its default model), so test_thresholds skips them.
COVERED = ("kv_cache", "grad_accum", "lora_merge", "gradient_checkpointing", "mixed_precision", "loss_kernel",
           "packing")


def _recorded(run_key, run):
    """``run()`` with every claim of ``run_key`` probed below its allowance, and every comparison recorded."""
    claims = [c for c in CLAIMS if c.run == run_key and not c.kwargs]
    probes = [Probe(c.names, c.passes_at, c.place) for c in claims]
    with probing(*probes, Probe(".*")) as every:
        result = run()
    assert result.ok, str(result)  # a fraction of each claim's allowance: still PASS
    for c, p in zip(claims, probes):
        assert p.hits and not p.missed, (c.key, p.missed)
        assert all(h.at is not None and h.error > 0 for h in p.hits), c.key  # an error really was put in
    return result, [h for p in every for h in p.hits]


@pytest.fixture(scope="module")
def model():
    return default_model()


def test_kv_cache_compares_every_position_of_every_batch_size_chunking_and_generated_token(model):
    target = as_target(model)
    calls = []
    logits = target.logits

    def spy(tokens, start_pos, *, kv_caching):
        calls.append((tokens.shape[0], start_pos, tokens.shape[1], kv_caching))
        return logits(tokens, start_pos, kv_caching=kv_caching)
    target.logits = spy
    result, hits = _recorded("kv_cache", lambda: check_kv_cache(target))
    m = re.search(r"B=(\d+) L=(\d+) chunkings=(\d+) batch_sizes=\[([\d, ]+)\]", result.case)
    bsz, length, n_chunkings = int(m[1]), int(m[2]), int(m[3])
    batch_sizes = [int(b) for b in m[4].split(",")]
    vocab = model.params.vocab_size
    teacher = [h.shape for h in hits if h.name == "logits"]
    assert teacher == [(b, length, vocab) for b in batch_sizes for _ in range(n_chunkings)]  # every position
    assert (bsz, batch_sizes) == (3, [3, 1])  # a smaller batch after a larger one on the same instance
    for b in batch_sizes:  # each batch size: one chunk, one token at a time, and multi-token chunks at start_pos > 0
        cached = [(s, n) for rows, s, n, kv in calls if kv and rows == b]
        assert (0, length) in cached and sum(n == 1 for _, n in cached) >= length
        assert any(s > 0 and n > 1 for s, n in cached), cached
    assert [h.shape for h in hits if h.name == "causal"] == [(bsz, length // 2, vocab)]  # the reference is causal
    generated = [h.shape for h in hits if h.name == "logprobs"]
    assert len(generated) == bsz and all(n[0] >= 6 for n in generated), generated  # every row, several tokens


def test_grad_accum_judges_every_scenario_step_and_parameter(model):
    result, hits = _recorded("grad_accum", lambda: check_grad_accumulation(model))
    m = re.search(r"splits=(\d+) stream_ga=\d+ steps=(\d+) .* (full\+lora)", result.case)
    scenarios = (int(m[1]) + 1) * int(m[2]) * 2  # splits and the stream, each step, full and LoRA
    counts = Counter(h.name for h in hits)
    assert counts["grads"] == counts["params"] == scenarios, counts
    assert counts["loss"] == scenarios and counts["lr"] == 2 * scenarios, counts  # lr reported and stepped with
    clipped = re.search(r"bound in (\d+)/(\d+) steps, (\d+) unclipped", result.case)
    assert counts["grad_norm"] == int(clipped[2]) == scenarios - int(clipped[3]), counts  # each clipped step's norm
    n_params = sum(p.numel() for p in model.parameters())
    sizes = Counter(h.shape[0] for h in hits if h.name == "grads")
    assert sizes[n_params] == scenarios // 2, sizes  # full fine-tune: every parameter's gradient, flattened


def test_gradient_checkpointing_compares_every_policy_mode_precision_and_gradient(model):
    result, hits = _recorded("gradient_checkpointing", lambda: check_gradient_checkpointing(model))
    assert "policies=all,seed,every:2" in result.case and "full fine-tune policy=all (train, eval)" in result.case
    assert "float32 + bfloat16 autocast" in result.case
    runs = 2 * (3 + 2)  # two precisions x (three LoRA policies + the full fine-tune in train and eval mode)
    counts = Counter(h.name for h in hits)
    assert counts["loss"] == counts["logits"] == runs, counts
    per_run_lora = 3 * 2 * 2  # wq, wv, w2 in 2 layers, A and B
    n_full = len(list(model.parameters()))
    assert sum(n.startswith("grad ") for n in counts.elements()) == 2 * (3 * per_run_lora + 2 * n_full)


def test_lora_merge_compares_every_layer_merged_twice_restored_and_eval_merged(model):
    result, hits = _recorded("lora_merge", lambda: check_lora_merge(model))
    m = re.search(r"targets=([\w,]+) .* eval-merge (\d+)/(\d+)", result.case)
    n_layers = len(m[1].split(",")) * model.params.n_layers
    assert int(m[3]) == n_layers and int(m[2]) == n_layers  # llama_ref's layers merge on eval()
    counts = Counter(h.name.split(" ")[-1] for h in hits)
    assert counts["merged"] == 2 * n_layers  # after merge(), and after merging twice / eval() twice
    assert counts["restored"] == n_layers + int(m[2])  # after unmerge(), and after train() for each eval-merger
    assert counts["logits"] == 3  # the fresh adapter in eval and train mode, and merged vs unmerged


def test_mixed_precision_judges_every_claim_in_both_half_dtypes(model):
    result, hits = _recorded("mixed_precision", lambda: check_mixed_precision(model))
    assert result.case.startswith("bf16 lora=wq,wv,w2 steps=8") and "(no fp16)" not in result.case
    counts = Counter(h.name for h in hits)
    assert counts["logits"] == counts["loss"] == 2  # full and LoRA
    assert counts["rope"] == counts["RMSNorm"] == counts["curve"] == 2  # bf16 and fp16
    assert counts["grad_norm"] == counts["clipped update"] == 1  # GradScaler, fp16
    n_grads = len(list(model.parameters())) + 3 * 2 * model.params.n_layers
    assert sum(n.startswith("grad ") for n in counts.elements()) == n_grads  # every trainable parameter, both runs


def test_loss_kernel_compares_every_reduction_chunking_softcap_the_accumulation_and_the_model(model):
    result, hits = _recorded("loss_kernel", lambda: check_loss_kernel(model, kernel="fused"))
    assert "reductions=mean,sum,none chunks=1,5,36,37,48,own softcap=" in result.case
    assert "bias accumulation K=3 model B=2 L=16" in result.case
    shapes = {h.name: h.shape for h in hits}
    vocab, dim = model.output.weight.shape
    for reduction in ("mean", "sum", "none"):
        for chunk in [c or "own" for c in chunk_sizes()]:
            for cap in ("", *{re.search(r"softcap=(\S+)", result.case)[0]}):
                label = f"reduction={reduction} chunk={chunk}{' ' + cap if cap else ''}"
                assert shapes[f"{label} loss"] == (() if reduction != "none" else (ROWS,)), label
                assert shapes[f"{label} grad H"] == (ROWS, dim) and shapes[f"{label} grad W"] == (vocab, dim)
                assert shapes[f"{label} grad b"] == (vocab,), label
    accumulated = [n for n in shapes if n.startswith(f"accumulation over {len(SPLIT)} micro-batches")]
    assert len(accumulated) == 4  # loss, H, W, b
    in_model = [n for n in shapes if n.startswith("the kernel in the model: ")]
    assert len(in_model) == 1 + len(list(model.parameters()))  # the loss and every trainable parameter


def test_packing_compares_every_document_row_neighbour_gradient_and_the_loops_window(model):
    result, hits = _recorded("packing", lambda: check_packing(model))
    counts = Counter(h.name for h in hits)
    assert counts["document logits"] == len(LENGTHS)  # every document, from its packed row
    assert counts["isolation"] >= len(LENGTHS) - 3  # each row's documents after its first (3 rows)
    assert counts["loss"] == counts["window loss"] == 1
    n_params = len(list(model.parameters()))
    assert sum(n.startswith("grad ") for n in counts.elements()) == 2 * n_params  # the batch's and the loop's
    assert f"{len(LENGTHS)} documents" in result.case and "rows of at most 24" in result.case
