"""Property 7: packed (padding-free) batches equal padded ones.

Seven documents of ragged lengths (every other one beginning with a prompt the loss ignores) are packed by the target's own
packer into rows of 24 tokens and, for the reference, padded one per row. On the packed rows:

0. the packing itself: every document is in exactly one row, whole; its first label is ignored and the others are
   its own; without document ids (the documents read from position resets), its positions run 0, 1, …;
1. each document's logits from the packed rows equal its logits in the padded batch;
2. the summed loss equals the padded batch's, and so does the count of target tokens (so the token mean does);
3. every gradient equals the padded batch's;
4. isolation, which needs no oracle: changing every token of one document leaves the logits of the other documents
   of its row unchanged (elementwise, at the dtype's tolerance on the row's scale);
5. the target's own training loop on a window of packed micro-batches reports the padded window's loss and target
   count and steps with its gradients (properties 2 × 7).

Claims 1-3 and 5 are calibrated against float64 (the padded batch on a float64 copy; factor
``CALIBRATION_FACTORS["packing"]``): the packed path may be at most that many times further from it than the padded
path in the same dtype is. A target that cannot be asked for packed input is not applicable, with why.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..compare import compare, compare_calibrated, row_scale
from ..findings import Findings
from ..result import CheckResult, describe_exception
from ..result import name_list as _names
from ..targets.base import why_not
from ..targets.protocols import PackingTarget
from ..targets.spec import as_target
from ..tolerances import CALIBRATION_FACTORS, tolerance

NAME = "packing"
PROTOCOLS = (PackingTarget,)
IGNORE_INDEX = -100
LENGTHS = (9, 4, 13, 6, 3, 11, 7)  # 53 tokens: three or more rows of 24, and a document alone with its padding
PROMPT = 2  # the first tokens of every other document, ignored by the loss
ROW = 24


def documents(vocab: int, seed: int, lengths: tuple[int, ...] = LENGTHS) -> list[dict[str, torch.Tensor]]:
    """Documents of ``lengths`` tokens drawn from ``seed``: ``input_ids`` and ``labels`` (every other one's prompt
    ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        if len(out) % 2 == 0:  # every other document has a prompt; the others are learned from their first token
            labels[:PROMPT] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def padded(docs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One document per row, right-padded (ids 0, labels ignored): the reference batch."""
    width = max(len(d["input_ids"]) for d in docs)
    ids = torch.zeros((len(docs), width), dtype=torch.long)
    labels = torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long)
    for r, d in enumerate(docs):
        ids[r, :len(d["input_ids"])] = d["input_ids"]
        labels[r, :len(d["labels"])] = d["labels"]
    return {"input_ids": ids, "labels": labels}


def targets(labels: torch.Tensor) -> int:
    """The positions a shifted loss averages over."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each document of a packed batch: runs of one ``document_ids`` value (not -1), or, without
    them, runs whose ``positions`` count up from 0 (a reset starts a document)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        if "document_ids" in batch:
            key = batch["document_ids"][r].tolist()
            starts = [i for i in range(len(key)) if key[i] >= 0 and (i == 0 or key[i] != key[i - 1])]
            ends = [next((j for j in range(s + 1, len(key)) if key[j] != key[s]), len(key)) for s in starts]
        else:
            pos = batch["positions"][r].tolist()
            starts = [i for i in range(len(pos)) if pos[i] == 0]
            ends = starts[1:] + [len(pos)]
        out += [(r, s, e) for s, e in zip(starts, ends)]
    return out


def check_packing(model: Any, *, seed: int = 0, packer: Optional[Any] = None,
                  trainer_cls: Optional[type] = None) -> CheckResult:
    """Check property 7 on ``model`` (a target, or a model :func:`as_target` adapts).

    Args:
        model: llama_ref's ``Transformer`` or a target offering :class:`verify.targets.protocols.PackingTarget`.
        seed: seed of the documents and of the tokens the isolation claim changes.
        packer: a packer to check instead of the target's (``packer(documents, row_len, n_micro)`` → micro-batches;
            the zoo's).
        trainer_cls: with llama_ref's model, a ``Trainer`` subclass under test (its loss and counts).

    Returns:
        The result: ``max_abs`` the largest |packed − padded| of logits, loss and gradients, ``margin`` the worst
        calibrated ratio ÷ the factor or elementwise margin.
    """
    target = as_target(model, trainer_cls=trainer_cls)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    lim = target.limits
    tol = tolerance(lim.dtype)
    factor = CALIBRATION_FACTORS[NAME]
    found = Findings()
    case = str(target)
    try:
        docs = documents(lim.vocab_size, seed)
        pack = packer or target.pack
        window = pack(docs, ROW, 2)
        rows, widest = sum(len(b["input_ids"]) for b in window), max(b["input_ids"].shape[1] for b in window)
        case = (f"{len(docs)} documents of {min(LENGTHS)}-{max(LENGTHS)} tokens in {rows} rows of at most {widest} "
                f"(asked: {ROW}) over {len(window)} micro-batches {str(lim.dtype).replace('torch.', '')}")
        located = _check_layout(window, docs, found)
        if located is None:
            return found.result(NAME, case, tol)
        pad = padded(docs)
        shared: list = []  # the rows holding two documents or more: where isolation is examined
        pad_logits = target.batch_logits(pad)
        exact_logits = target.batch_logits(pad, float64=True)
        for m, batch in enumerate(window):
            logits = target.batch_logits(batch)
            for d, (r, s, e) in located[m].items():
                n = e - s
                label = f"document {d} logits (micro-batch {m}, row {r})"
                found.compared(label, compare_calibrated(logits[r, s:e], pad_logits[d, :n], exact_logits[d, :n],
                                                         factor, name="document logits"))
            _check_isolation(target, batch, located[m], tol, seed + m, found, shared)
        if not shared:
            found.not_applicable("isolation not examined: no packed row holds two documents")
        case += f", {len(shared)} shared rows"
        # 2, 3: one micro-batch holding every row (the whole window) against the padded batch
        whole = _concat(window)
        if targets(whole["labels"]) != targets(pad["labels"]):
            found.fail(f"target tokens: {targets(whole['labels'])} in the packed rows, {targets(pad['labels'])} padded")
        loss, grads = target.batch_loss_and_grads(whole)
        pad_loss, pad_grads = target.batch_loss_and_grads(pad)
        exact_loss, exact_grads = target.batch_loss_and_grads(pad, float64=True)
        floor = _sum_floor(exact_loss, lim.dtype, targets(pad["labels"]))
        found.compared("summed loss", compare_calibrated(loss, pad_loss, exact_loss, factor, floor=floor, name="loss"))
        _grads(found, "", grads, pad_grads, exact_grads, factor)
        # 5: the target's loop on the packed window vs one padded batch
        try:
            step, pad_step = target.train_window(window), target.train_window([pad])
        except NotImplementedError as e:
            found.not_applicable(f"the training loop on packed micro-batches not checked: {e}")
            return found.result(NAME, case, tol, f"calibrated <= {factor:g}x the padded path's distance from "
                                                 f"float64; isolation {tol}")
        exact_step = target.train_window([pad], float64=True)
        n_targets = targets(pad["labels"])
        if step[1] is None or pad_step[1] is None:
            found.not_applicable("the training loop's target count not compared: it reports none")
        elif step[1] != pad_step[1]:
            wrong = " and ".join(side for side, n in (("packed", step[1]), ("padded", pad_step[1])) if n != n_targets)
            found.fail(f"the training loop's window: {step[1]} target tokens counted over the packed micro-batches, "
                       f"{pad_step[1]} over the padded batch, of {n_targets} (the {wrong} count wrong)")
        exact_window = torch.tensor(exact_step[0], dtype=torch.float64)
        found.compared("the loop's window loss", compare_calibrated(
            torch.tensor(step[0]), torch.tensor(pad_step[0]), exact_window, factor,
            floor=_sum_floor(exact_window, lim.dtype, n_targets), name="window loss"))
        _grads(found, "the loop's ", step[2], pad_step[2], exact_step[2], factor)
        criterion = f"calibrated <= {factor:g}x the padded path's distance from float64; isolation {tol}"
        return found.result(NAME, case, tol, criterion)
    except Exception as e:
        found.raised(describe_exception(e), aborts=True)
        return found.result(NAME, case, tol)


def _check_layout(window: list[dict[str, torch.Tensor]], docs: list[dict[str, torch.Tensor]], found: Findings
                  ) -> Optional[list[dict[int, tuple[int, int, int]]]]:
    """Claim 0: each document once, whole, positions from 0, first label ignored; per micro-batch, document index →
    (row, start, end). None (with the failures recorded) where the packing is wrong."""
    wanted = {tuple(d["input_ids"].tolist()): i for i, d in enumerate(docs)}
    seen: dict[int, int] = {}
    located: list[dict[int, tuple[int, int, int]]] = []
    ok = True
    for m, batch in enumerate(window):
        where = {}
        found_spans = spans(batch)
        for i, (r, s, e) in enumerate(found_spans):
            key = tuple(batch["input_ids"][r, s:e].tolist())
            d = wanted.get(key)
            last_in_row = i + 1 == len(found_spans) or found_spans[i + 1][0] != r
            if d is None and last_in_row and s > 0 and bool((batch["labels"][r, s:e] == IGNORE_INDEX).all()):
                continue  # the row's padding (found by its positions restarting): nothing learned there
            if d is None:
                found.fail(f"micro-batch {m} row {r} positions {s}-{e - 1}: not one of the documents (cut, merged or "
                           "padded into another)")
                ok = False
                continue
            seen[d] = seen.get(d, 0) + 1
            where[d] = (r, s, e)
            # With document ids, RoPE's relative angles make positions counted by column harmless (the logits
            # claims see any difference); without them the positions are the documents' only boundaries.
            if ("document_ids" not in batch and "positions" in batch
                    and batch["positions"][r, s:e].tolist() != list(range(e - s))):
                found.fail(f"document {d}: positions {batch['positions'][r, s:e].tolist()[:6]}… do not restart at 0 "
                           "(RoPE by column, not by position in the document)")
                ok = False
            want = docs[d]["labels"].clone()
            want[0] = IGNORE_INDEX
            got = batch["labels"][r, s:e].clone()
            if s == 0:  # a row's first label is never predicted (the loss shifts): whatever it holds
                got[0] = IGNORE_INDEX
            if got.tolist() != want.tolist():
                first = int(batch["labels"][r, s])
                found.fail(f"document {d}: labels differ from its own" + (
                    f" — its first token is labelled ({first}): predicted from the document before it"
                    if first != IGNORE_INDEX and s > 0 else ""))
                ok = False
        located.append(where)
    missing = [i for i in range(len(docs)) if i not in seen]
    twice = [i for i, n in seen.items() if n > 1]
    if missing:
        found.fail(f"document(s) {_names(missing)} missing from the packed rows")
    if twice:
        found.fail(f"document(s) {_names(twice)} packed more than once")
    return located if ok and not missing and not twice else None


def _check_isolation(target: Any, batch: dict[str, torch.Tensor], where: dict[int, tuple[int, int, int]],
                     tol: Any, seed: int, found: Findings, pairs: list) -> None:
    """Claim 4: every token of one document of a row changed; the row's other documents' logits unchanged (each row
    examined is appended to ``pairs``)."""
    by_row: dict[int, list[int]] = {}
    for d, (r, _, _) in where.items():
        by_row.setdefault(r, []).append(d)
    g = torch.Generator().manual_seed(seed)
    before = target.batch_logits(batch)
    for r, ds in by_row.items():
        if len(ds) < 2:
            continue
        pairs.append(r)
        first = min(ds, key=lambda d: where[d][1])  # the first document: every other one sees it were it to leak
        _, s, e = where[first]
        changed = {k: v.clone() for k, v in batch.items()}
        vocab = target.limits.vocab_size
        changed["input_ids"][r, s:e] = (changed["input_ids"][r, s:e] + 1 + torch.randint(0, vocab - 1, (e - s,),
                                                                                             generator=g)) % vocab
        after = target.batch_logits(changed)
        for d in ds:
            if d == first:
                continue
            _, s2, e2 = where[d]
            found.compared(f"isolation: document {d}'s logits with document {first}'s tokens changed (row {r})",
                           compare(after[r, s2:e2], before[r, s2:e2], tol, "isolation",
                                   scale=row_scale(before[r, s2:e2])))


def _sum_floor(exact: torch.Tensor, dtype: torch.dtype, n: int) -> float:
    """The calibrated floor of a loss summed (or averaged) over ``n`` target tokens of a ``dtype`` model: each
    token's loss carries its own rounding of about eps(dtype) relative, independently, so the sum's is about
    eps·|sum|/√n (at least fp32's eps·|sum|: the loss is summed in fp32). Measured why: in bf16 and fp16 the padded
    scalar's own error is sometimes far below that by chance, and the packed one was then 12-16x it (CPU, 8 configs
    x 3 seeds)."""
    eps = max(torch.finfo(dtype).eps / max(n, 1) ** 0.5, torch.finfo(torch.float32).eps)
    return eps * float(exact.abs())


def _grads(found: Findings, label: str, grads: dict[str, torch.Tensor], pad: dict[str, torch.Tensor],
           exact: dict[str, torch.Tensor], factor: float) -> None:
    missing = [n for n in exact if grads.get(n) is None]
    if missing:
        found.fail(f"{label}gradients missing: {_names(missing)}")
    for n in exact:
        if grads.get(n) is not None:
            found.compared(f"{label}gradient of {n}", compare_calibrated(grads[n], pad[n], exact[n], factor,
                                                                        name=f"grad {n}"))


def _concat(window: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The window's micro-batches as one batch (rows padded to the widest; ids 0, labels ignored, positions 0 …,
    documents -1)."""
    width = max(b["input_ids"].shape[1] for b in window)
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "positions": 0, "document_ids": -1}
    out = {}
    for key in ("input_ids", "labels", "positions", "document_ids"):
        if key not in window[0]:
            continue
        rows = []
        for b in window:
            t = b[key]
            pad = torch.full((t.shape[0], width - t.shape[1]), fill[key], dtype=t.dtype)
            if key == "positions":
                pad = torch.arange(t.shape[1], width).expand(t.shape[0], -1)
            rows.append(torch.cat([t, pad], dim=1))
        out[key] = torch.cat(rows)
    return out
