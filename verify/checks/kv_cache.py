"""Property 1: the KV cache changes nothing.

In eval mode, for tokens T (B×L), one uncached forward over T gives the same logits as cached forwards over any
chunking of T (several-token chunks at ``start_pos > 0`` included), for every batch size up to
``max_batch_size`` and after earlier calls on the same instance have left other data in the cache. Greedy
``generate`` gives the same tokens (and log-probabilities) cached and uncached on ragged prompt batches; where the
tokens diverge, that is excused only if the uncached top-2 logit margin at that step is within twice the logit
tolerance (a genuine tie, which either path may break either way).

The check runs on a target (:class:`verify.targets.protocols.KVCacheTarget`): llama_ref's model, a Meta-style one, or
any object offering those operations; a target without a cache switch gets "not applicable", never PASS.

Logits are compared with assert_close's rtol/atol, the relative term taken on the largest |logit| of the same
position (see :func:`verify.compare.compare`), where the elementwise rule fails correct caches on small logits
(measured: ``verify.tolerances``, "Other measured choices", [kv_cache: fp32 logits, scale-relative]; half dtypes:
``OVERRIDES[("kv_cache", …)]``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..compare import compare, row_scale
from ..findings import Findings
from ..result import CheckResult, describe_exception
from ..targets.base import why_not
from ..targets.protocols import KVCacheTarget
from ..targets.spec import as_target
from ..tolerances import Tolerance, tolerance

NAME = "kv_cache"
PROTOCOLS = (KVCacheTarget,)  # what the check reads of a target
# The least the check runs before it may say PASS: so many positions, a several-token chunk at start_pos > 0, and a
# generated token. Below it the target is too small to check (N/A, saying so): a cache read with its heads axis for
# its positions axis held 2 "positions", and a check that ran on those printed PASS.
MIN_POSITIONS = 8


def random_chunking(length: int, generator: torch.Generator, max_chunk: int = 5) -> list[int]:
    """Chunk lengths summing to ``length``, drawn from ``generator``; several multi-token chunks after the first."""
    sizes, left = [], length
    while left:
        size = min(left, int(torch.randint(1, max_chunk + 1, (1,), generator=generator)))
        sizes.append(size)
        left -= size
    if length > 2 and not any(s > 1 for s in sizes[1:]):  # no several-token chunk after the first: make one
        sizes = [1, length - 1]
    return sizes


def _too_small(length: int, chunkings: Sequence[Sequence[int]], max_gen_len: int) -> Optional[str]:
    """Why this run would examine less than property 1 says (None: it examines enough)."""
    if length < MIN_POSITIONS:
        return f"{length} positions to compare, fewer than the {MIN_POSITIONS} the check needs"
    if not any(size > 1 and sum(c[:i]) > 0 for c in chunkings for i, size in enumerate(c)):
        return "no chunking has a several-token chunk at start_pos > 0"
    if max_gen_len < 1:
        return "no room to generate a token after the longest prompt"
    return None


def describe_chunking(chunking: Sequence[int]) -> str:
    """``[1, 1, 1, 4, 4]`` → ``"1x3+4x2"``: a short label for a chunking."""
    runs: list[list[int]] = []
    for size in chunking:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return "+".join(f"{s}x{n}" if n > 1 else str(s) for s, n in runs)


def _chunked_logits(target: KVCacheTarget, tokens: torch.Tensor, chunking: Sequence[int]) -> torch.Tensor:
    outs, pos = [], 0
    for size in chunking:
        outs.append(target.logits(tokens[:, pos:pos + size], pos, kv_caching=True))
        pos += size
    return torch.cat(outs, dim=1)


def check_kv_cache(model: Any, tokens: Optional[torch.Tensor] = None, *,
                   chunkings: Optional[Sequence[Sequence[int]]] = None,
                   batch_sizes: Optional[Sequence[int]] = None,
                   prompts: Optional[Sequence[Sequence[int]]] = None, max_gen_len: int = 12,
                   seed: int = 0, tol: Optional[Tolerance] = None, cache_cls: Optional[type] = None,
                   generator_cls: Optional[type] = None) -> CheckResult:
    """Check property 1 on ``model`` — a target or a model :func:`verify.targets.spec.as_target` adapts — left as it
    was (train/eval mode, cache class, cache setting and contents).

    Args:
        model: llama_ref's ``Transformer``, a Meta-style model, another model ``as_target`` adapts, or a target
            (:class:`verify.targets.protocols.KVCacheTarget`). A target missing a member of ``PROTOCOLS`` gives a
            not-applicable result naming the member (e.g. ``KVCacheTarget.kv_session``), as does one whose own
            ``not_applicable`` answer says so (no cache switch): never PASS.
        tokens: token ids (B, L), moved to the target's device. Default: random ids drawn from ``seed``, B =
            min(3, max_batch_size), L = min(24, max_seq_len).
        chunkings: chunk lengths of the cached forwards, each list positive and summing to L (else ValueError).
            Default: the whole sequence, one token at a time, and a random chunking (:func:`random_chunking`).
        batch_sizes: how many leading rows of ``tokens`` each pass runs, in that order, on the same instance, whose
            cache rows were first filled with other data; each ≤ B (else ValueError). Default: ``(B, 1)``.
        prompts: ragged prompts (lists of token ids) for greedy generation, cached vs uncached. Default: B random
            prompts of 1 to max(2, L // 2) tokens drawn from ``seed``.
        max_gen_len: tokens generated per prompt, capped so that the longest prompt and they fit ``max_seq_len``.
        seed: seed of every random draw (tokens, the random chunking, the poisoning data, prompts).
        tol: the (rtol, atol) of logits and log-probabilities, the relative term on the row's largest |logit|.
            Default: ``verify.tolerances.tolerance(dtype, "kv_cache")`` for the target's dtype.
        cache_cls: with llama_ref's model, a ``KVCache`` subclass: the cache under test (None: llama_ref's own).
        generator_cls: with llama_ref's model, a ``Llama`` subclass whose ``generate`` is under test (None:
            llama_ref's own).

    Returns:
        The result: ``max_abs`` the largest |cached − uncached| over logits and generated log-probabilities,
        ``max_rel`` the largest elementwise |cached − uncached| / |uncached|, ``margin`` the worst |cached −
        uncached| ÷ its bound (atol + rtol·the row's largest |logit|). A generation that diverges where the uncached
        top-2 margin is within twice the bound is a tie (a detail), not a failure; a crash fails with ``error`` set.
    """
    target = as_target(model, cache_cls=cache_cls, generator_cls=generator_cls)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    lim = target.limits
    tol = tol or tolerance(lim.dtype, NAME)
    g = torch.Generator().manual_seed(seed)
    if tokens is None:
        tokens = torch.randint(0, lim.vocab_size, (min(3, lim.max_batch_size), min(24, lim.max_seq_len)), generator=g)
    tokens = tokens.to(lim.device)
    bsz, length = tokens.shape
    chunkings = [list(c) for c in chunkings] if chunkings is not None else [
        [length], [1] * length, random_chunking(length, g)]
    for c in chunkings:
        if sum(c) != length or min(c) < 1:
            raise ValueError(f"chunking {c} does not split a length of {length} into positive parts")
    batch_sizes = list(batch_sizes) if batch_sizes is not None else sorted({bsz, 1}, reverse=True)
    if max(batch_sizes) > bsz:
        raise ValueError(f"batch sizes {batch_sizes} exceed the {bsz} rows of tokens")
    if prompts is None:
        lens = torch.randint(1, max(2, length // 2) + 1, (bsz,), generator=g).tolist()
        prompts = [torch.randint(0, lim.vocab_size, (n,), generator=g).tolist() for n in lens]
    max_gen_len = min(max_gen_len, lim.max_seq_len - max(len(q) for q in prompts))

    found = Findings()
    case = f"B={bsz} L={length} chunkings={len(chunkings)} batch_sizes={batch_sizes} {str(lim.dtype).replace('torch.', '')}"
    small = _too_small(length, chunkings, max_gen_len)
    if small:
        return CheckResult.na(NAME, f"target too small to check: {small} (the target holds max_seq_len="
                                    f"{lim.max_seq_len}, max_batch_size={lim.max_batch_size})", case)
    if target.cache_caveat:
        found.not_applicable(target.cache_caveat)
    if lim.max_batch_size < 2:
        found.not_applicable("a smaller batch after a larger one on the same instance not examined: the target "
                             "holds max_batch_size=1")
    try:
        with target.kv_session():
            # Fill every cache row with other data first, so that reading a stale row or position shows.
            poison_rows = min(lim.max_batch_size, bsz + 1)
            target.logits(torch.randint(0, lim.vocab_size, (poison_rows, length), generator=g).to(lim.device), 0,
                          kv_caching=True)
            _check_uncached_causal(target, tokens, tol, g, found)
            for b in batch_sizes:
                expected = target.logits(tokens[:b], 0, kv_caching=False)
                for chunking in chunkings:
                    got = _chunked_logits(target, tokens[:b], chunking)
                    found.compared(f"teacher-forced B={b} chunks={describe_chunking(chunking)}",
                                   compare(got, expected, tol, "logits", scale=row_scale(expected)))
            _check_generation(target, prompts, max_gen_len, tol, found)
    except Exception as e:  # the implementation under test crashed: that is a failure, with its message
        found.raised(describe_exception(e), aborts=True)
    return found.result(NAME, case, tol)


def _check_uncached_causal(target: KVCacheTarget, tokens: torch.Tensor, tol: Tolerance, g: torch.Generator,
                           found: Findings) -> None:
    """The reference side's own claim: changing later tokens changes no earlier logit. Where the cached and the
    uncached logits differ, this says which side is wrong (an uncached path that drops its causal mask is one real
    case: the cached path looks broken against it)."""
    length = tokens.shape[1]
    half = length // 2
    other = tokens.clone()
    shift = torch.randint(1, target.limits.vocab_size, other[:, half:].shape, generator=g).to(other.device)
    other[:, half:] = (other[:, half:] + shift) % target.limits.vocab_size  # every later token changed
    before = target.logits(tokens, 0, kv_caching=False)[:, :half]
    after = target.logits(other, 0, kv_caching=False)[:, :half]
    found.compared(f"the uncached path is not causal: logits at positions 0-{half - 1} changed when only the tokens "
                   f"at {half}-{length - 1} did (the reference side is wrong, whatever the cache does)",
                   compare(after, before, tol, "causal", scale=row_scale(before)))


def _check_generation(target: KVCacheTarget, prompts: Sequence[Sequence[int]], max_gen_len: int,
                      tol: Tolerance, found: Findings) -> None:
    runs = {kv: target.generate(prompts, max_gen_len, kv_caching=kv) for kv in (True, False)}
    (cached, cached_lp), (uncached, uncached_lp) = runs[True], runs[False]
    device = target.limits.device
    for row, (a, b) in enumerate(zip(cached, uncached)):
        n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if n < len(a) or n < len(b):
            # First divergence at generated index n: is it a genuine tie in the uncached logits?
            prefix = torch.tensor([list(prompts[row]) + a[:n]], device=device)
            logits = target.logits(prefix, 0, kv_caching=False)[0, -1]
            top2 = logits.topk(2).values
            gap = float(top2[0] - top2[1])  # not the criterion's margin
            allowed = 2 * tol.bound(float(logits.abs().max()))  # each path may be off by one bound
            where = f"generate row {row} step {n}: cached {a[n:n + 1]} vs uncached {b[n:n + 1]}"
            if gap <= allowed:
                found.tie(f"{where}, top-2 margin {gap:.2e} <= {allowed:.2e}")
            else:
                found.fail(f"{where}, top-2 margin {gap:.2e} > {allowed:.2e}: not a tie")
        if n:
            # Log-probabilities carry the rounding error of the logits they come from: scale by the row's logits.
            seq = torch.tensor([list(prompts[row]) + a[:n]], device=device)
            scale = row_scale(target.logits(seq, 0, kv_caching=False)[0, len(prompts[row]) - 1:
                                                                      len(prompts[row]) - 1 + n])[:, 0]
            found.compared(f"generate row {row} logprobs",
                           compare(torch.tensor(cached_lp[row][:n]), torch.tensor(uncached_lp[row][:n]), tol,
                                   "logprobs", scale=scale))
