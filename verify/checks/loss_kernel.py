"""Property 8: a chunked or fused cross-entropy equals the plain loss — its value and its gradients, for any chunking,
every reduction, under accumulation, and in place in the model.

A loss kernel (:mod:`verify.targets.loss_kernel`) maps the final hidden states ``H`` (N×D), the output weight ``W``
(V×D, a copy of the model's; a bias where the kernel takes one) and labels ``y`` (-100 where ignored) to a loss. On
N = 37 rows (prime: no chunk size from 2 to 36 divides it) with a run of five ignored labels (a whole chunk of 5 and
some of 1 see no target) and a few more scattered:

1. its value equals ``cross_entropy(linear(H, W, b), y)`` formed here in float64 (a softcap ``c·tanh(z/c)`` where the
   kernel takes one, asked with ``c`` at half the largest |logit| so that it bends);
2. its gradients with respect to ``H``, ``W`` and ``b`` equal the float64 ones;
3. for ``mean``, ``sum`` and ``none`` — ``none`` backpropagated with a different upstream gradient for every token,
   so that a kernel applying one token's upstream gradient to all is seen;
4. for chunk sizes 1, 5 (ragged, with an all-ignored chunk), N−1, N, N+11 and the kernel's own default;
5. accumulated over three ragged micro-batches with the window's target count as ``num_items_in_batch``, the summed
   losses and accumulated gradients equal the window's mean and its gradients (properties 2 × 8);
6. in the model: with the kernel in place of its loss (chunks of 5), the model's summed loss and the gradients of
   its trainable parameters equal its plain forward's, and the kernel was really called.

Each comparison is calibrated (DESIGN §4): the kernel may be at most ``CALIBRATION_FACTORS["loss_kernel"]`` times
further from the float64 answer than the plain computation in the same dtype (``cross_entropy`` of the fp32-upcast
logits) is, in the 2-norm, with a floor of eps·‖answer‖. What a kernel does not take (a chunk size, a count, a softcap,
a bias, a reduction it raises ``NotImplementedError`` for) is not asked, and a note names it; a kernel that cannot run
here is not applicable. Warnings the kernel raises (torch's fall-back to its reference path, say) are reported.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..compare import compare_calibrated
from ..findings import Findings
from ..result import CheckResult, describe_exception
from ..targets.base import why_not
from ..targets.loss_kernel import IGNORE_INDEX, REDUCTIONS, LossKernel
from ..targets.protocols import LossKernelTarget
from ..targets.spec import as_target
from ..tolerances import CALIBRATION_FACTORS, tolerance

NAME = "loss_kernel"
PROTOCOLS = (LossKernelTarget,)
ROWS = 37
IGNORED = (0, 5, 6, 7, 8, 9, 20)  # a run of five: with chunks of 5, rows 5-9 are a chunk without a target
SPLIT = (11, 19, 7)  # the accumulation case's micro-batches (rows), ragged


def chunk_sizes(n: int = ROWS) -> list[Optional[int]]:
    """The chunkings asked: 1, 5, N−1, N, more than N, and the kernel's own (None)."""
    return [1, 5, n - 1, n, n + 11, None]


def check_loss_kernel(model: Any, *, kernel: Optional[str] = None, loss_kernel: Optional[LossKernel] = None,
                      seed: int = 0) -> CheckResult:
    """Check property 8 on one loss kernel of ``model`` (a target, or a model :func:`as_target` adapts).

    Args:
        model: llama_ref's ``Transformer`` or a target offering :class:`verify.targets.protocols.LossKernelTarget`.
        kernel: the name of one of the target's kernels (``target.loss_kernels()``); default: its first.
        loss_kernel: a kernel to check instead, in the target's model (a user's ``--loss-fn``, a zoo mutant).
        seed: seed of the hidden states, bias, labels, upstream gradients and the model case's tokens.

    Returns:
        The result: ``max_abs`` the largest |kernel − float64| of any loss or gradient, ``margin`` the worst
        calibrated ratio ÷ the factor.
    """
    target = as_target(model)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    if loss_kernel is None:
        kernels = target.loss_kernels()
        if not kernels:
            return CheckResult.na(NAME, "the target has no loss kernel of its own to check (give yours with "
                                        "--loss-fn, or loss_kernel=)", str(target))
        if kernel is not None and kernel not in kernels:
            raise ValueError(f"no loss kernel {kernel!r}; the target's: {sorted(kernels)}")
        loss_kernel = kernels[kernel or next(iter(kernels))]
    if loss_kernel.unavailable:
        return CheckResult.na(NAME, f"{loss_kernel.name}: {loss_kernel.unavailable}", f"{loss_kernel.name} on {target}")
    lim = target.limits
    factor = CALIBRATION_FACTORS[NAME]
    found = Findings()
    case = f"{loss_kernel.name} on {target}"
    try:
        cases = _Cases(target, loss_kernel, seed, found)
        ran = cases.run_all()
        case = (f"{loss_kernel.name}: N={ROWS} V={cases.w.shape[0]} D={cases.w.shape[1]} {ran} "
                f"{str(lim.dtype).replace('torch.', '')}")
        criterion = f"calibrated <= {factor:g}x the plain path's distance from float64 (loss and gradients)"
        return found.result(NAME, case, tolerance(lim.dtype), criterion)
    except Exception as e:  # the kernel crashed: a failure, with its message
        found.raised(describe_exception(e), aborts=True)
        return found.result(NAME, case, tolerance(lim.dtype))


class _Cases:
    """The data of one check and its cases, each recorded in ``found``."""

    def __init__(self, target: Any, kernel: LossKernel, seed: int, found: Findings):
        self.target, self.kernel, self.found = target, kernel, found
        lim = target.limits
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.device = lim.dtype, lim.device
        w = target.output_weight().detach()
        vocab, dim = w.shape
        self.w = w.to(self.dtype).clone()
        self.h = torch.randn(ROWS, dim, generator=g).to(self.device, self.dtype)
        self.b = (torch.randn(vocab, generator=g) * 0.1).to(self.device, self.dtype) if "bias" in kernel.takes else None
        y = torch.randint(0, vocab, (ROWS,), generator=g)
        y[list(IGNORED)] = IGNORE_INDEX
        self.y = y.to(self.device)
        self.upstream = torch.randn(ROWS, generator=g, dtype=torch.float64).to(self.device)  # for "none"
        with torch.no_grad():
            z = F.linear(self.h.double(), self.w.double(), None if self.b is None else self.b.double())
        self.softcap = round(0.5 * float(z.abs().max()), 3) if "softcap" in kernel.takes else None
        self.tokens = torch.randint(0, vocab, (2, 16), generator=g).to(self.device)
        self.labels = self.tokens.clone()
        self.labels[0, :5] = IGNORE_INDEX  # a prompt
        self.labels[1, 12:] = IGNORE_INDEX  # padding
        self.warned: set[str] = set()
        self.refused: list[str] = []  # the cases the kernel declined (NotImplementedError), said in notes
        self.softcap_checked = False  # at least one softcap case judged

    # ---- the three computations of one case -------------------------------------------------------------------

    def _inputs(self, dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
        out = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (self.h, self.w, self.b) if t is not None]
        return out

    def _backward(self, loss: torch.Tensor, inputs: list[torch.Tensor], reduction: str) -> list[torch.Tensor]:
        up = self.upstream.to(loss.dtype) if reduction == "none" else torch.ones((), dtype=loss.dtype,
                                                                                 device=loss.device)
        grads = torch.autograd.grad(loss, inputs, grad_outputs=up, allow_unused=True)
        return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]

    def _plain(self, reduction: str, softcap: Optional[float], dtype: Optional[torch.dtype] = None,
               rows: slice = slice(None), num_items: Optional[int] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``cross_entropy(linear(H, W, b))`` of the upcast logits: in the target's dtype (the baseline) or, with
        ``dtype`` float64, the exact answer."""
        inputs = self._inputs(dtype)
        h, w, b = inputs[0][rows], inputs[1], inputs[2] if len(inputs) > 2 else None
        z = F.linear(h, w, b)
        z = z.double() if z.dtype == torch.float64 else z.float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        y = self.y[rows]
        if num_items is not None:
            loss = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum") / num_items
        else:
            loss = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss.detach(), self._backward(loss, inputs, reduction)

    def _kernel(self, reduction: str, chunk: Optional[int], softcap: Optional[float]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = self._inputs()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = self.kernel(inputs[0], inputs[1], self.y, reduction=reduction,
                               bias=inputs[2] if len(inputs) > 2 else None, chunk_size=chunk, softcap=softcap)
            grads = self._backward(loss, inputs, reduction)
        self._note_warnings(caught, f"reduction={reduction} chunk={chunk}")
        return loss.detach(), grads

    def _note_warnings(self, caught: list, where: str) -> None:
        for w in caught:
            text = str(w.message).splitlines()[0][:200]
            if text not in self.warned:
                self.warned.add(text)
                self.found.note(f"the kernel warned ({where}): {text}")

    def _judge(self, label: str, got: tuple[torch.Tensor, list[torch.Tensor]],
               plain: tuple[torch.Tensor, list[torch.Tensor]], exact: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
        names = ["loss", "grad H", "grad W", "grad b"]
        for name, test, base, ref in zip(names, [got[0], *got[1]], [plain[0], *plain[1]], [exact[0], *exact[1]]):
            if test.shape != ref.shape:
                self.found.fail(f"{label} {name}: shape {tuple(test.shape)}, expected {tuple(ref.shape)}")
                continue
            self.found.compared(f"{label} {name}",
                                compare_calibrated(test, base, ref, CALIBRATION_FACTORS[NAME], name=f"{label} {name}"))

    # ---- the claims -------------------------------------------------------------------------------------------

    def run_all(self) -> str:
        takes = self.kernel.takes
        reductions = []
        for reduction in REDUCTIONS:
            if self._reduction(reduction):
                reductions.append(reduction)
        skipped = [r for r in REDUCTIONS if r not in reductions]
        if not reductions:
            raise NotImplementedError("the kernel implements none of the reductions mean, sum, none")
        if skipped:
            self.found.not_applicable(f"reduction {', '.join(skipped)} not checked: the kernel raised "
                                      "NotImplementedError for it")
        if "chunk_size" not in takes:
            self.found.not_applicable("chunk sizes not swept: the kernel takes no chunk_size (its own chunking only)")
        if "softcap" not in takes:
            self.found.not_applicable("softcap not checked: the kernel takes none")
        accumulated = self._accumulation()
        model = self._model()
        parts = [f"reductions={','.join(reductions)}",
                 "chunks=" + ",".join(str(c) for c in chunk_sizes() if c is not None) + ",own"
                 if "chunk_size" in takes else "chunks=own",
                 f"softcap={self.softcap:g}" if self.softcap_checked else "",
                 f"({len(self.refused)} cases declined)" if self.refused else "",
                 "bias" if self.b is not None else "",
                 f"accumulation K={len(SPLIT)}" if accumulated else "",
                 "model B=2 L=16" if model else ""]
        return " ".join(p for p in parts if p)

    def _reduction(self, reduction: str) -> bool:
        """Claims 1-4 for one reduction: every chunking, with and without the softcap; False where the kernel says
        (``NotImplementedError``, its first case) it does not implement the reduction. A refusal of a later case —
        one chunk size, the softcap — is that case not checked, said in a note (``self.refused``)."""
        for softcap in ([None, self.softcap] if self.softcap is not None else [None]):
            plain = self._plain(reduction, softcap)
            exact = self._plain(reduction, softcap, torch.float64)
            for chunk in (chunk_sizes() if "chunk_size" in self.kernel.takes else [None]):
                cap = f" softcap={softcap:g}" if softcap is not None else ""
                label = f"reduction={reduction} chunk={chunk or 'own'}{cap}"
                try:
                    got = self._kernel(reduction, chunk, softcap)
                except NotImplementedError as e:
                    if softcap is None and chunk == chunk_sizes()[0] or "chunk_size" not in self.kernel.takes:
                        return False  # the reduction itself
                    self.refused.append(label)
                    self.found.not_applicable(f"{label} not checked: the kernel raised NotImplementedError ({e})")
                    continue
                self._judge(label, got, plain, exact)
                self.softcap_checked |= softcap is not None
        return True

    def _accumulation(self) -> bool:
        """Claim 5: three micro-batches, each its own kernel call with the window's count, sum to the window."""
        if "num_items_in_batch" not in self.kernel.takes:
            self.found.not_applicable("accumulation with num_items_in_batch not checked: the kernel takes none")
            return False
        count = int((self.y != IGNORE_INDEX).sum())
        chunk = 5 if "chunk_size" in self.kernel.takes else None
        inputs = self._inputs()
        total = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = 0
            for n in SPLIT:
                rows = slice(start, start + n)
                loss = self.kernel(inputs[0][rows], inputs[1], self.y[rows], reduction="mean",
                                   bias=inputs[2] if len(inputs) > 2 else None, chunk_size=chunk,
                                   num_items_in_batch=count)
                loss.backward()  # accumulated into .grad, as a training loop does
                total = loss.detach() if total is None else total + loss.detach()
                start += n
        self._note_warnings(caught, "accumulation")
        grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in inputs]
        plain = self._plain("mean", None, num_items=count)
        exact = self._plain("mean", None, torch.float64, num_items=count)
        self._judge(f"accumulation over {len(SPLIT)} micro-batches {list(SPLIT)} with num_items_in_batch={count}",
                    (total, grads), plain, exact)
        return True

    def _model(self) -> bool:
        """Claim 6: the kernel in the model's place gives its plain forward's loss and gradients, and is called."""
        calls = [0]
        chunk = 5 if "chunk_size" in self.kernel.takes else None

        def counted(hidden, weight, labels, *, reduction):
            calls[0] += 1
            try:
                return self.kernel(hidden, weight, labels, reduction=reduction, chunk_size=chunk)
            except NotImplementedError:
                if reduction != "sum" or "num_items_in_batch" not in self.kernel.takes:
                    raise
                # a mean-only kernel (transformers'): the sum is the mean over a count of 1
                return self.kernel(hidden, weight, labels, reduction="mean", chunk_size=chunk, num_items_in_batch=1)
        try:
            got = self.target.kernel_model_loss(self.tokens, self.labels, counted)
        except NotImplementedError as e:
            self.found.not_applicable(f"the kernel in the model not checked: {e}")
            return False
        if not calls[0]:
            self.found.fail("the kernel in the model: never called — the model computed its loss without it "
                            "(the kernel bypassed)")
            return True
        plain = self.target.kernel_model_loss(self.tokens, self.labels, None)
        exact = self.target.kernel_model_loss(self.tokens, self.labels, None, float64=True)
        names = sorted(set(exact[1]))
        missing = [n for n in names if n not in got[1] or got[1][n] is None]
        if missing:
            self.found.fail(f"the kernel in the model: no gradient for {', '.join(missing[:4])}")
        for label, test, base, ref in [("the kernel in the model: loss", got[0], plain[0], exact[0])] + [
                (f"the kernel in the model: grad {n}", got[1][n], plain[1][n], exact[1][n])
                for n in names if n not in missing]:
            self.found.compared(label, compare_calibrated(test, base, ref, CALIBRATION_FACTORS[NAME], name=label))
        return True

