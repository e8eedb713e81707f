"""The one tolerance table: dtype (and, where it must differ, check kind) → (rtol, atol).

Defaults are ``torch.testing.assert_close``'s. An override is named, greppable, and says why with the error
that was measured; a tolerance is never widened just to turn a failure green.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Tolerance(NamedTuple):
    rtol: float
    atol: float

    def bound(self, expected_abs: float) -> float:
        """The largest admissible |actual − expected| where |expected| = ``expected_abs``."""
        return self.atol + self.rtol * expected_abs

    def __str__(self) -> str:
        return f"rtol={self.rtol:.1e} atol={self.atol:.1e}"


# torch.testing.assert_close's defaults (torch/testing/_comparison.py).
DTYPE_DEFAULTS: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-7, 1e-7),
    torch.float32: Tolerance(1.3e-6, 1e-5),
    torch.bfloat16: Tolerance(1.6e-2, 1e-5),
    torch.float16: Tolerance(1e-3, 1e-5),
}

# (check, dtype) → tolerance, where the check compares two *different* low-precision computations rather than a
# result with its exact value. Each entry states why, with the error that was measured.
OVERRIDES: dict[tuple[str, torch.dtype], Tolerance] = {
    # Cached vs uncached logits in half precision, relative to the row's largest |logit| (see compare's `scale`):
    # both paths round keys, values, partial sums and the logits themselves, at different points. Measured worst
    # |cached − uncached| / max|logit| = 1.3 eps in bf16 and in fp16 (presets tiny and bench, seeds 0-3, math and
    # SDPA attention, CPU); assert_close's rtol is 2 eps (bf16) and 1 eps (fp16). 4 eps leaves 3x headroom and
    # stays ~10x below the smallest mutant's error (> 0.25 of max|logit|).
    ("kv_cache", torch.bfloat16): Tolerance(4 * torch.finfo(torch.bfloat16).eps, 1e-5),
    ("kv_cache", torch.float16): Tolerance(4 * torch.finfo(torch.float16).eps, 1e-5),
    # Property 9's logits after a merge (and a resize), relative to the row's largest |logit|: merged and unmerged
    # logits each round about 1 eps away from float64, in different places. Measured |merged − unmerged| /
    # max|logit| up to 1.5 eps in fp16 (7 of 8 seeds failed assert_close's 1 eps) and 1.4 eps in bf16 (seeds 0-7);
    # 4 eps as above (the zoo's merges into the shared matrix reach > 0.05 of max|logit|).
    ("tied_embeddings", torch.bfloat16): Tolerance(4 * torch.finfo(torch.bfloat16).eps, 1e-5),
    ("tied_embeddings", torch.float16): Tolerance(4 * torch.finfo(torch.float16).eps, 1e-5),
}

# Calibrated checks (DESIGN §4): the path under test may be at most FACTOR times further from a float64 reference
# than the plain path is, in the 2-norm over the whole output (a max over elements is too spiky to calibrate).
CALIBRATION_FACTORS: dict[str, float] = {
    # Merged vs unmerged LoRA logits: ||merged − ref|| / max(||unmerged − ref||, ||right − right64||), where `right`
    # is a merge formed by the check (W + (alpha/r)·B·A in float64, stored in the dtype, adapter off) run in the
    # dtype and `right64` its float64 self: merging changes the computation, and where ΔW dominates W (alpha/r = 7
    # at r = 1, B ~ N(0, 1/r)) its logits are worse conditioned — against the unmerged error alone that regime
    # reached 22.5 (16 of 300 seeds over 4; a hypothesis example failed the old factor 4 at 4.19). Measured with
    # both comparators, fp32 unless said: one 2-layer model, 300 seeds, all seven targets: r=4 alpha=12 at most 2.35,
    # r=2 alpha=7 2.36, r=8 alpha=16 1.35, r=1 alpha=7 6.23; the hypothesis space (400 configs): 1.59, bf16 1.0,
    # median 1.0; r=1 alpha=7 on 500 random models: 8.33 (p99 3.0; bf16 1.0).
    # Two correct fp32 merges differing only in rounding differ up to 5x in error there (measured: 3.2e-4 against
    # 6.1e-5), which is the spread any factor must cover. 16 leaves 2x headroom over the worst; the mutants that
    # only the logits claim sees reach 3e5 to 1.4e6 (the others are caught on the weights or the gradients).
    "lora_merge": 16.0,
    # Trainer.step (accumulated) vs one large batch, both against a float64 oracle from the same state:
    # ||GA − ref|| / max(||large batch − ref||, eps·||ref||) over gradients and parameters (and, as a bound, the
    # reported gradient norm). Measured at most 3.73 in fp32 (tiny, 80 seeds x 30 steps, full and LoRA, SGD and
    # AdamW), 2.46 over 150 hypothesis configs, 1.36 in bf16; median 1.0. The elementwise fp32 rule fails on LoRA
    # gradients (per-sequence gradients cancel: 1.4e-5 of the tensor's max) and on AdamW updates (lr/eps
    # amplifies rounding). 8 leaves 2x headroom; the GA mutants' ratios are 30 to 1e6.
    "grad_accum": 8.0,
    # A tied weight's gradient vs the sum of an untied copy's two gradients (embedding use + head use), both against
    # that untied copy in float64. Measured exactly 1.00 over 100 comparisons (25 seeds x 2 batches x fp32/bf16,
    # tiny): autograd adds the two uses' contributions as the untied reference's sum does. A kept-tied adapter's
    # gradients against those of its update used by both uses (the model with both matrices replaced by the adapted
    # module's effective matrix): at most 1.83 in fp32 and 1.27 in bf16 over 64 comparisons (8 seeds, both
    # leaders, A and B). 8 as the other checks; the zoo's one-use gradients reach 1e6.
    "tied_embeddings": 8.0,
    # Data-parallel bf16 (DDP under autocast; FSDP2 with MixedPrecisionPolicy(param_dtype=bf16), which computes with
    # bf16 parameters where autocast keeps norms and upcasts in fp32) vs the single process under bf16 autocast, both
    # against float64. Measured over 4 seeds x W=2,3 x DDP/FSDP2 (fp32 full, LoRA + GC, bf16 full; 3 windows): the
    # worst calibrated ratio of any case, bf16 included, was 1.28 — FSDP2's policy is no further from float64 than
    # autocast here. The GA check's 8 is kept; the distributed mutants' ratios are 600 to 1e6, or a wrong norm/loss.
    "distributed_bf16": 8.0,
    # Mixed precision (autocast, fp32 master weights) vs the plain half path (model cast to bf16/fp16, no autocast,
    # same upcasts), both against float64: logits, loss (floor eps·|loss|), each parameter's gradient, GradScaler's
    # grad_norm and clipped update. Measured over 70 models (tiny seeds 0-29, 40 random configs), bf16 and fp16,
    # full and LoRA on a half base: at most 2.51 (fp16, one parameter of a 1-layer SDPA config; tiny preset
    # <= 1.23), median 0.85. 5 leaves 2x headroom; the mutants reach 500 to 1e7.
    "mixed_precision": 5.0,
    # The same comparison for one parameter's gradient at a time. On a small tensor the ratio of two rounding-error
    # norms is heavy-tailed (a few cancelling entries dominate either norm): over 2600 seeds of the smallest config
    # the hypothesis test draws (dim 8, one head, one layer, 8 positions; bf16, LoRA on wq,w2) the worst
    # parameter's ratio had median 1.30, 99.9th percentile 4.45 and maximum 7.19 (seed 12049; 12547, 5.84, failed
    # factor 5 on correct code); over 150 random configs x bf16/fp16 none exceeded 5. 10 leaves ~1.4x over the
    # measured maximum; the mutants that only a gradient shows reach 500 and more.
    "mixed_precision_grad": 10.0,
    # 8-step AdamW loss curves vs fp32, calibrated by fp32 trained from half-rounded weights (that baseline floored
    # at 0.1·eps·||curve||: unfloored it is spiky, 14.5 once). Measured over 100 models: <= 1.92 bf16, <= 3.65 fp16.
    "mixed_precision_curve": 8.0,
    # A half-weight model's logits at the end of its context (32 tokens at max_seq_len - 32) vs float64, calibrated
    # by the same model's error at positions 0-31 (RoPE is relative: float64 gives the same logits at both). Measured
    # over 40 models (tiny seeds 0-9 with theta 1e4 / 256 positions and with Llama 3.2's RoPE / 8192 positions,
    # 20 random configs: head_dim 8-64, GQA, SDPA, 128-8192 positions), bf16 and fp16: 0.91-1.09. 2 leaves ~2x
    # headroom; RoPE angles formed in the half dtype (transformers#29285) reach 3.5-4.8 at 256 positions and 26-236
    # at 8192.
    "mixed_precision_rope": 2.0,
    # A loss kernel (chunked, fused) vs the plain cross_entropy of the upcast logits in the same dtype, both against
    # float64 (floor eps·‖float64‖): the loss (scalar or per token) and the gradients of H, W and b in every case,
    # and in the model its loss and each trainable parameter's gradient. Measured over 134,604 comparisons (presets
    # tiny and bench and 20 random 1-layer configs, dim 16-128, vocabulary 64-1000; seeds 0-5; fp32, bf16, fp16;
    # llama_ref's chunked and fused kernels and torch 2.13's linear_cross_entropy): at most 3.94 (torch's, fp32,
    # a per-token loss), 3.19 for ours; median 0.45. 8 leaves 2x headroom; the zoo's kernels reach 3.9e4 (the head
    # weight's gradient summed in bf16) to 2.4e8.
    "loss_kernel": 8.0,
    # Packed rows vs padded ones (each document alone in its row), both against the padded batch in float64: each
    # document's logits, the summed loss, every gradient, and the training loop's window loss and gradients (the
    # scalars floored at eps(model dtype)·|sum|/√targets: verify.checks.packing._sum_floor). Measured over 14,112
    # comparisons (presets tiny and bench and 12 random configs, dim 16-64, 1-2 layers, MHA and GQA; seeds 0-3; fp32,
    # bf16, fp16; math and SDPA): at most 2.01 (fp32, the summed loss), median 1.0. 8 leaves 4x headroom; the zoo's
    # mask mutants reach 1.7e6, the per-row mean 1.2e4 (the packers and the count are caught by exact claims).
    "packing": 8.0,
}


# Two independent fp32 implementations of the same function compared with each other (the tests' oracles), by name.
# Each states the worst error measured and the headroom its bound leaves.
IMPLEMENTATIONS: dict[str, Tolerance] = {
    # llama_ref vs transformers' LlamaForCausalLM (complex vs cos/sin RoPE, other reduction orders), logits. Measured
    # over 900 drawn configs: <= 3.5e-6 untied; <= 4.6e-5 tied, where the output matrix is the N(0, 1) embedding and
    # |logits| reach ~130 (a few ulp of fp32 there). A wrong index costs > 1e-2 (the teeth of
    # tests/verify/test_oracle_hf.py).
    "hf_logits": Tolerance(0.0, 1e-4),
    # llama_ref + our LoRA vs transformers + PEFT on the same adapter: the logits bound above, the LoRA branch
    # adding one more matmul of the same size (measured <= 3.4e-6 on the tiny preset, up to all seven targets).
    "peft_logits": Tolerance(0.0, 1e-4),
    # SDPA attention vs the math path, whole-model logits. Measured over 300 drawn configs (hypothesis, tied and
    # untied, GQA, scaled RoPE): max |diff| 3.1e-5, at most 1.1e-5 above 1e-5·|logit|; the bound leaves ~3x.
    "sdpa_vs_math_logits": Tolerance(1e-5, 1e-4),
    # Our fp32 RoPE (complex multiply on a precomputed table) vs the rotation written out in float64, positions
    # 0-25. Measured over 300 draws: 7.8e-7; the bound leaves ~13x, far below a pair rotated by a wrong angle (~1).
    "rope_rotation": Tolerance(1e-5, 1e-5),
    # The angles of the fp32 RoPE table at position 1 vs the inverse frequencies transformers computes: one fp32
    # rounding of each (~6e-8 relative); 1e-6 leaves 16x.
    "rope_inv_freq": Tolerance(1e-6, 0.0),
}

# The GPU matrix's GA cells vs one large batch: window losses and pre-clip gradient norms, relative, keyed by
# "mixed precision on". The same tokens and mathematics, summed in another order and, under bf16 autocast, through
# matmuls of other shapes (other blocking, so other bf16 roundings). Measured on its CPU setup (bench preset, 2
# layers, 32 tokens, 3 steps): 1.9e-7 (fp32), 3.2e-4 (bf16; the loss 1.7e-4). Bounds: 1e-5 in fp32, one bf16 eps
# (2**-8) in bf16 — 12x headroom for the GPU's other kernels; a loss divided by the micro-batch count (the seed's
# log) is off by 75 %.
GA_LARGE_BATCH_RTOL: dict[bool, float] = {False: 1e-5, True: 2.0 ** -8}

# ---- Other measured choices the checks rely on ------------------------------------------------------------------
# The measurements behind choices that have no entry above; each check points here by the label in brackets.
#
# [kv_cache: fp32 logits, scale-relative] Property 1 compares logits with assert_close's defaults (DTYPE_DEFAULTS),
# the relative term taken on the row's largest |logit| (verify.compare.compare's `scale`), not elementwise. Measured
# over 300 random fp32 configs: |cached − uncached| reached 4.8e-7 of that scale (5.3e-5 on logits of 111), while
# the elementwise rule failed 14 of them on small logits.
#
# [grad_accum: AdamW eps] Properties 2 and 6 step AdamW with eps 1e-6 (RoBERTa's) rather than 1e-8
# (verify.checks.grad_accum.OPTIMIZERS). At 1e-8 the rounding of near-zero gradients, amplified up to lr·δ/eps,
# dominated the parameter error and made the calibrated ratio heavy-tailed: measured up to 3.5 with a median of 0.3.
#
# [gradient_checkpointing: defaults, not 0] Property 4 compares checkpointed with plain runs at DTYPE_DEFAULTS,
# though both do the same arithmetic in the same order. Measured on CPU (torch 2.13; presets tiny and bench with fp32
# and bf16 weights, and 150 hypothesis configs of 1-4 blocks, GQA and MHA; math and SDPA attention; LoRA on wq/wv/w2
# with dropout 0.1 and full fine-tune; policies all, seed, every:2, every:3): the largest |checkpointed − plain| over
# loss, logits and every gradient was exactly 0, in fp32 and under bf16 autocast alike. Its loss gives gradients whose
# largest entries are about 0.5 to 8 on the default model, so atol (1e-5) cannot hide a wrong one; the mutants'
# gradient errors are 0.15 (an fp32 or fp16 recomputation under bf16 autocast) to 14.


def implementation_tolerance(name: str) -> Tolerance:
    """The bound for comparing two implementations named ``name`` in :data:`IMPLEMENTATIONS`."""
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"no implementation tolerance {name!r}; known: {sorted(IMPLEMENTATIONS)}") from None


def tolerance(dtype: torch.dtype, check: Optional[str] = None) -> Tolerance:
    """The (rtol, atol) for comparing tensors of ``dtype`` in ``check``; unknown dtypes are an error."""
    if check is not None and (check, dtype) in OVERRIDES:
        return OVERRIDES[(check, dtype)]
    try:
        return DTYPE_DEFAULTS[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {sorted(map(str, DTYPE_DEFAULTS))}") from None
