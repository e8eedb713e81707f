"""The transformers + PEFT target (the embedded default's weights in ``LlamaForCausalLM``): every property holds on
the installed stack — or fails where that release is known to be wrong, as a strict xfail naming the upstream issue,
so that a fix upstream turns the cell red until it is updated — and every mutant of its zoo is caught, for its own
reason."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from packaging.version import Version  # noqa: E402  (transformers' own dependency)

from verify.__main__ import main  # noqa: E402
from verify.checks.grad_accum import check_grad_accumulation  # noqa: E402
from verify.checks.gradient_checkpointing import check_gradient_checkpointing  # noqa: E402
from verify.checks.kv_cache import check_kv_cache  # noqa: E402
from verify.checks.lora_merge import check_lora_merge  # noqa: E402
from verify.checks.loss_kernel import check_loss_kernel  # noqa: E402
from verify.checks.packing import check_packing  # noqa: E402
from verify.checks.tied_embeddings import LORA, check_tied_embeddings  # noqa: E402
from verify.compare import Probe, probing  # noqa: E402
from verify.findings import FAILING  # noqa: E402
from verify.mutants.hf import HF_ZOO, hf_target  # noqa: E402
from verify.oracle_hf import default_hf_model, default_tied_hf_model  # noqa: E402
from verify.targets.hf import HFTarget  # noqa: E402

TRANSFORMERS = Version(transformers.__version__)
# Measured (docs/hf-peft.md): 4.45.2 and 4.57.6 fail these, 5.25.0 passes them.
OVERCOUNT = ("num_items_in_batch counts every label that is not -100, position 0's included, which the shifted causal "
             "loss never predicts: the loss and gradients are n_targets/n_labels of the token mean's (transformers#46204)")
GA_WRONG = pytest.mark.xfail(
    TRANSFORMERS < Version("5"), strict=True,
    reason=("transformers < 4.46: the accumulated loss is a mean of micro-batch means (transformers#34191)"
            if TRANSFORMERS < Version("4.46") else f"transformers 4.46 to 4.x: {OVERCOUNT}"))
MP_WRONG = pytest.mark.xfail(
    Version("4.46") <= TRANSFORMERS < Version("5"), strict=True, reason=f"transformers 4.46 to 4.x: {OVERCOUNT}")
REENTRANT_UNDER_PEFT = pytest.mark.xfail(
    TRANSFORMERS < Version("5"), strict=True,
    reason="transformers 4.x with a PeftModel: use_reentrant=True under the frozen base gives no block an input that "
           "requires grad, backward raises (transformers#26221; gradient_checkpointing_enable calls "
           "enable_input_require_grads only for transformers' own PEFT integration)")


@pytest.fixture(scope="module")
def hf_model():
    return default_hf_model()


def _explain(result) -> str:
    return f"{result.case}: {result.error or ''} " + " | ".join(result.details[:6])


def test_kv_cache_and_generate_agree_cached_and_uncached(hf_model):
    result = check_kv_cache(HFTarget(hf_model), seed=1)
    assert result.ok and result.margin < 1, _explain(result)


@pytest.mark.parametrize("targets, dtype", [(("q_proj", "v_proj"), torch.float32), (None, torch.bfloat16)],
                         ids=["q,v-fp32", "all-linear-bf16"])
def test_a_peft_merge_changes_nothing(hf_model, targets, dtype):
    result = check_lora_merge(HFTarget(hf_model.to(dtype)), targets=targets)
    hf_model.to(torch.float32)
    assert result.ok, _explain(result)
    names = "q_proj,v_proj" if targets else "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    assert f"targets={names} " in result.case and str(dtype).replace("torch.", "") in result.case


class _OneMode(HFTarget):
    def __init__(self, model, mode):
        super().__init__(model)
        self.gc_modes = (mode,)


@pytest.mark.parametrize("mode", [
    "use_reentrant=False",
    pytest.param("use_reentrant=True", marks=REENTRANT_UNDER_PEFT),
])
def test_checkpointing_changes_no_gradient(hf_model, mode):
    result = check_gradient_checkpointing(_OneMode(hf_model, mode), policies=("all",), autocast_dtype=None)
    assert result.ok, _explain(result)
    assert "LoRA r=4" in result.case  # PEFT's LoRA on a frozen base, not the blocks-only fallback


@GA_WRONG
def test_the_trainer_accumulates_as_one_large_batch(hf_model):
    result = check_grad_accumulation(HFTarget(hf_model))  # every split, SGD and AdamW, full and LoRA
    assert result.ok, _explain(result)


@GA_WRONG
def test_the_trainer_accumulates_on_a_bf16_base_with_peft_s_fp32_adapters(hf_model):
    # the loss is judged at the model's bf16, not the fp32 of the only trainable parameters (PEFT upcasts adapters)
    result = check_grad_accumulation(HFTarget(hf_model.to(torch.bfloat16)), lora=(True,), optimizer="sgd")
    hf_model.to(torch.float32)
    assert result.ok, _explain(result)
    assert "lora bfloat16" in result.case


@MP_WRONG
def test_the_trainer_in_bf16_is_really_mixed_and_right(hf_model):
    # Through verify.testing: the one mixed-precision dispatch (the CLI's and the plugin's too) checks transformers'
    # own Trainer step on a transformers model, where it used to answer "no training loop of its own".
    from verify.testing import assert_mixed_precision_right
    result = assert_mixed_precision_right(hf_model)
    assert "transformers' Trainer" in result.case and "bfloat16 autocast, full+lora" in result.case, _explain(result)


def _hook_missing(mutant) -> str:
    """Why ``mutant`` says nothing on this transformers, or ''."""
    if mutant.prop == "grad_accum" and TRANSFORMERS < Version("5"):
        return f"transformers {TRANSFORMERS}'s own Trainer already fails grad_accum (the xfail above)"
    if mutant.prop == "loss_kernel" and TRANSFORMERS < Version("4.46"):
        return f"transformers {TRANSFORMERS} has no num_items_in_batch loss to drop (4.46 added it)"
    return ""


# what each mutant's failure must say: the claim that catches it
REASONS = {
    "hf_cache_batch_blind": "teacher-forced B=",
    "hf_cache_prepends": "chunks=",
    "hf_merge_without_scaling": "vs W + (alpha/r)·B·A",
    "hf_reentrant_frozen_base": "use_reentrant=True",
    "hf_ga_mean_of_micro_means": "not a multiple of the large batch's",
    "hf_ga_counts_unshifted_labels": "the logged loss is not the window's token mean",
    "hf_forward_drops_num_items_in_batch": "the kernel in the model: loss",
}
CHECKS = {"kv_cache": check_kv_cache, "lora_merge": check_lora_merge,
          "gradient_checkpointing": lambda t: check_gradient_checkpointing(t, policies=("all",), autocast_dtype=None),
          "grad_accum": lambda t: check_grad_accumulation(t, n_sequences=4, steps=2, optimizer="sgd", fail_fast=True),
          "loss_kernel": lambda t: check_loss_kernel(t, kernel="transformers")}


@pytest.mark.parametrize("mutant", HF_ZOO, ids=[m.name for m in HF_ZOO])
def test_every_mutant_of_the_hf_zoo_is_caught_for_its_reason(hf_model, mutant):
    why = _hook_missing(mutant)
    if why:
        pytest.skip(why)
    with mutant.applied():
        result = CHECKS[mutant.prop](hf_target(hf_model, mutant))
    assert not result.ok, f"{mutant.name} not caught: {_explain(result)}"
    assert any(REASONS[mutant.name] in d for d in result.details), _explain(result)
    if mutant.name == "hf_cache_prepends":  # one token at a time the order of the keys does not matter
        assert not any("chunks=1x24" in d for d in result.details), _explain(result)
    if mutant.name == "hf_reentrant_frozen_base":
        assert not any("use_reentrant=False" in d for d in result.details), _explain(result)


def test_its_causal_lm_loss_with_num_items_in_batch_equals_the_plain_loss(hf_model):
    # transformers' fixed_cross_entropy as a kernel (mean, and the sum over num_items_in_batch under accumulation),
    # and the model's own loss path with num_items_in_batch, its loss_function calling the kernel on the hidden
    # states its lm_head receives; sum and none are not transformers' to give (said, not checked).
    result = check_loss_kernel(hf_model, kernel="transformers")
    if TRANSFORMERS < Version("4.46"):
        assert result.verdict == "N/A" and "4.46" in result.not_applicable, _explain(result)
        return
    assert result.verdict == "PASS" and "reductions=mean" in result.case, _explain(result)
    assert "accumulation K=3 model B=2 L=16" in result.case, _explain(result)


def _finds_packed_rows() -> bool:
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_its_padding_free_path_keeps_documents_apart_without_a_mask(attn):
    # DataCollatorWithFlattening's rows: position_ids restarting per document and no attention mask (use_cache off,
    # as in training). transformers builds the block-causal mask from the position resets.
    model = default_hf_model()
    model.config._attn_implementation = attn
    with probing(Probe("window loss|grad .*")) as (seen,):
        result = check_packing(HFTarget(model))
    if not _finds_packed_rows():  # before masking_utils' packed detection, eager and SDPA had no padding-free path
        assert not result.ok and any("isolation" in d for d in result.details), _explain(result)
        return
    if Version("4.46") <= TRANSFORMERS < Version("5"):
        # claims 0-4 hold; the Trainer's padded window counts position 0's labels (OVERCOUNT), its packed one not
        failing = [f.message for f in result.findings if f.kind in FAILING]
        assert failing and all("loop" in m for m in failing), _explain(result)
        assert "(the padded count wrong)" in failing[0], _explain(result)
        return
    assert result.verdict == "PASS", _explain(result)
    # claim 5 through the Trainer: its window loss, its num_items_in_batch and the gradient it stepped with
    assert not any("not checked" in d or "reports none" in d for d in result.details), _explain(result)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert [h.name for h in seen.hits].count("window loss") == 1
    assert sum(h.name.startswith("grad ") for h in seen.hits) == 2 * n_params  # the batch's and the loop's


def test_the_trainer_over_packed_micro_batches_is_judged_against_the_padded_batch():
    # claim 5's teeth through transformers' Trainer: a mean of micro-batch means (transformers before 4.46) differs
    # on the packed window, whose two micro-batches hold different numbers of targets (before 4.46, the Trainer's own)
    mutant = next(m for m in HF_ZOO if m.name == "hf_ga_mean_of_micro_means")
    model = default_hf_model()
    result = check_packing(HFTarget(model) if TRANSFORMERS < Version("4.46") else hf_target(model, mutant))
    assert not result.ok and any(d.startswith("the loop's window loss: TOO FAR") for d in result.details), \
        _explain(result)


@pytest.mark.xfail(strict=True, reason="transformers#46634: beside packed position_ids, an all-ones 2D attention mask "
                                       "takes the plain causal path and documents attend to each other")
def test_an_all_ones_mask_beside_packed_position_ids_keeps_documents_apart():
    result = check_packing(HFTarget(default_hf_model(), packed_mask="all-ones"))
    assert result.ok, _explain(result)


def test_llama_verify_target_hf_runs_on_transformers(capsys):
    assert main(["--target", "hf", "--check", "kv_cache"]) == 0
    out = capsys.readouterr().out
    assert "transformers LlamaForCausalLM" in out and f"transformers={transformers.__version__}" in out
    assert "1/1 checks passed" in out


def test_a_peft_model_from_a_factory_is_checked_with_its_own_adapters(hf_model):
    from verify.targets.peft import apply_peft_lora
    adapted = apply_peft_lora(default_hf_model(), ("k_proj", "o_proj"), rank=2, alpha=5.0, dropout=0.0,
                              use_rslora=True, generator=torch.Generator().manual_seed(0))
    merge = check_lora_merge(adapted, targets=("q_proj",), rank=8)  # a PeftModel keeps its own LoraConfig
    assert merge.ok and "targets=k_proj,o_proj r=2 alpha=5 rslora" in merge.case, _explain(merge)
    gc = check_gradient_checkpointing(adapted, policies=("all",), autocast_dtype=None, full_finetune=False)
    assert "LoRA r=2 alpha=5 rslora on k_proj,o_proj" in gc.case, _explain(gc)
    if TRANSFORMERS < Version("5"):  # REENTRANT_UNDER_PEFT (transformers#26221): that mode fails, and only it
        failing = [d for d in gc.details if not d.startswith("note:")]
        assert not gc.ok and failing, _explain(gc)
        assert all("use_reentrant=True" in d and "does not require grad" in d for d in failing), _explain(gc)
    else:
        assert gc.ok, _explain(gc)


def test_the_uncached_path_never_touches_a_cache(hf_model, monkeypatch):
    # The reference side of the KV comparison: no transformers cache is written while uncached (logits and generate),
    # else both sides would share every cache bug.
    from transformers.cache_utils import DynamicCache
    updates = []
    real = DynamicCache.update
    monkeypatch.setattr(DynamicCache, "update", lambda self, *a, **k: updates.append(1) or real(self, *a, **k))
    target = HFTarget(hf_model)
    tokens = torch.randint(0, target.limits.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with target.kv_session():
        target.logits(tokens, 0, kv_caching=True)
        assert updates, "the counter must see the cached path's updates"
        updates.clear()
        target.logits(tokens, 0, kv_caching=False)
        target.generate([[1, 5, 9], [1, 7]], 3, kv_caching=False)
    assert updates == []


# ---- property 9: a tie_word_embeddings model through transformers' and PEFT's own code ---------------------------------

def test_a_tied_model_stays_tied_through_save_load_materialise_and_resize():
    result = check_tied_embeddings(default_tied_hf_model(), transforms=("save_load", "materialize", "resize"))
    assert result.verdict == "PASS", _explain(result)
    assert result.case.endswith("transforms: save_load, materialize, resize")


def test_peft_merges_a_tied_models_adapter_into_the_shared_matrix():
    # Measured on PEFT 0.13.2 and 0.21.2: merge_and_unload folds an lm_head (or embed_tokens) adapter into the tensor
    # both modules share (huggingface/peft#2018: PEFT warns, and merges), so the other use changes too; with
    # ensure_weight_tying (PEFT >= 0.18) each tied module merges the one update, and the shared matrix gets it twice.
    # Before the merge every adapter behaves: the other module is untouched, or, kept tied, follows.
    result = check_tied_embeddings(default_tied_hf_model(), transforms=LORA + ("merge",))
    failing = [f.message for f in result.findings if f.kind in FAILING]
    assert not result.ok and all("+ merge" in m for m in failing), _explain(result)
    for what, other in (("output", "embedding"), ("tok_embeddings", "head")):
        assert any(m.startswith(f"after lora:{what} + merge: the {other} unchanged by an untied adapter")
                   for m in failing), _explain(result)
    import peft
    if Version(peft.__version__) >= Version("0.18"):
        assert any(m.startswith("logits after lora:tok_embeddings:kept + merge") for m in failing), _explain(result)
        assert "lora:tok_embeddings:kept+merge" in result.case


def test_a_trained_modules_to_save_copy_unties_at_merge_on_recent_peft_only():
    # modules_to_save=["lm_head"] (or embed_tokens) on a tied model: PEFT trains a copy of the module. Measured: PEFT
    # 0.21.2 unties at merge_and_unload (config tie_word_embeddings false, both matrices kept); 0.13.2 leaves the
    # configuration tied, so a save and reload overwrites the trained head with the embedding
    # (huggingface/transformers#45127, peft#2972).
    import peft
    version = Version(peft.__version__)
    if Version("0.14") <= version < Version("0.21"):
        pytest.skip(f"PEFT {version}: not measured")
    result = check_tied_embeddings(default_tied_hf_model(), transforms=("full:output", "full:tok_embeddings",
                                                                       "merge"))
    if version >= Version("0.21"):
        assert result.verdict == "PASS", _explain(result)
        return
    failing = [f.message for f in result.findings if f.kind in FAILING]
    for what in ("output", "tok_embeddings"):
        assert f"after full:{what} + merge: configured tied, but the embedding and the head are two parameters " \
               "whose weights differ" in failing, _explain(result)
        assert any(m.startswith(f"logits after full:{what} + merge + save_load") for m in failing), _explain(result)


def test_llama_verify_target_hf_tied_shows_property_9(capsys):
    assert main(["--target", "hf", "--tied", "--check", "tied_embeddings"]) == 1  # PEFT's merges (above)
    assert "tied_embeddings" in capsys.readouterr().out
