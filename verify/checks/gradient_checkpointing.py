"""Property 4: gradient checkpointing changes no gradient.

For every policy, the checkpointed run and the plain run (no checkpointing) of the same model on the same tokens,
with the same RNG seed right before the forward, give the same logits, the same loss and the same gradient on every
trainable parameter — a ``None`` against a tensor is a failure, never a skip. Cases:

* a frozen base with LoRA adapters (``B`` drawn non-zero, so that ``A`` gets a real gradient) and dropout > 0: no
  input of any block requires grad, which is where the reentrant checkpoint loses gradients, and the recomputation
  must redraw exactly the forward's dropout masks;
* a full fine-tune under the ``"all"`` policy, in train mode and in eval mode (checkpointing does not depend on the
  module mode, where the target declares so: ``checkpoints_in_eval``; a target that does not declare it and recomputes
  in train mode only gets a note);
* all of the above in fp32 and again under ``torch.autocast(dtype=autocast_dtype)``, where the recomputation must
  replay the forward's autocast state.

The check runs on a target (:class:`verify.targets.protocols.CheckpointingTarget`): llama_ref's model (any policy, LoRA
applied here) or a Meta-style one (its blocks are the modules holding the cached attention; the policies its switch
offers; its own LoRA layers, if it has any — without, the LoRA case becomes the blocks trained with everything
outside them frozen, where the reentrant checkpoint fails the same way). A target without a switch, or whose
forward lets no gradient through, is "not applicable".

And the checkpointed blocks really were recomputed: over one forward + backward, every block that the policy selects
runs twice, every other block once (counted from outside, by forward pre-hooks the check installs on its copies).
The blocks a policy selects are taken from the
policy's definition (:func:`policy_layers`), not from the implementation's parser, so a policy that silently maps to
no block ("checkpoint silently not applied") fails.

Tolerance: both runs do the same arithmetic in the same order, so their results are expected to be equal bit for
bit, as they were on CPU. The check still uses assert_close's defaults for the parameters' dtype (fp32: rtol
1.3e-6, atol 1e-5), not zero, so that devices whose backward kernels accumulate in a non-deterministic order (CUDA
atomics) are not failed for rounding. The loss, a per-token mean of a random linear functional of the logits, gives
gradients large enough that atol cannot hide a wrong one; a mutant shows as a gradient error well above it — or a
missing gradient, or a missing recomputation (measured: ``verify.tolerances``, "Other measured choices",
[gradient_checkpointing: defaults, not 0]).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..compare import compare, compare_grads
from ..findings import Findings
from ..oracles import policy_layers
from ..result import CheckResult, describe_exception, name_list
from ..targets.base import canonical_name, parameter_names, why_not
from ..targets.lora import describe_layers, draw_nonzero_b, draw_nonzero_zeros, loralib_layers
from ..targets.protocols import CheckpointingTarget
from ..targets.spec import as_target
from ..tolerances import Tolerance, tolerance

NAME = "gradient_checkpointing"
PROTOCOLS = (CheckpointingTarget,)  # what the check reads of a target
LORA_RANK = 4
LORA_ALPHA = 8


@dataclass
class _Run:
    loss: torch.Tensor
    logits: torch.Tensor
    grads: dict[str, Optional[torch.Tensor]]
    forwards: list[int]  # forwards of each block during one forward + backward (recomputations included)
    selected: Optional[frozenset[int]]  # the blocks the implementation says it checkpoints (None: it does not say)
    warned: list[str]


@contextlib.contextmanager
def counting_forwards(blocks: Sequence[torch.nn.Module]) -> Iterator[list[int]]:
    """Inside the block, ``counts[i]`` is how many times ``blocks[i]`` was called (a forward pre-hook each, removed on
    exit): a recomputation by gradient checkpointing calls the module again, so it counts. A pre-hook, not a forward
    hook: the non-reentrant checkpoint stops a recomputation as soon as it has what backward needs
    (``set_checkpoint_early_stop``), so the block's forward may never return there."""
    counts = [0] * len(blocks)

    def hook(i: int) -> Callable[..., None]:
        def count(module, args) -> None:
            counts[i] += 1
        return count
    handles = [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _rng_fork(device: torch.device) -> contextlib.AbstractContextManager:
    """Fork the global RNG of the CPU and of ``device``: the check seeds it freely, the caller's state comes back."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else getattr(torch, device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _run(target: CheckpointingTarget, template: nn.Module, policy: Optional[str], tokens: torch.Tensor,
         weights: torch.Tensor, autocast_dtype: Optional[torch.dtype], seed: int, mode: Optional[str] = None) -> _Run:
    """One forward + backward of ``template`` under ``policy`` (in place: no step is taken, so the weights stay as
    they are, and the gradients of each run are its own tensors); the loss is the per-token mean of
    ``logits · weights``, so every logit is weighted (a mean over logits would hide permuted ones)."""
    model = template
    model.zero_grad(set_to_none=True)  # the previous run's gradients stay with its _Run
    names = parameter_names(model)  # by identity: a switch that wraps blocks renames their parameters
    target.set_checkpointing(model, policy, mode)
    device_type = tokens.device.type
    counted = target.recompute_probes(model)  # where a block's call is counted (the block, by default)
    with warnings.catch_warnings(record=True) as caught, counting_forwards(counted) as forwards:
        # warnings recorded, not shown: reported with the failure they explain
        warnings.simplefilter("always")
        torch.manual_seed(seed)  # the same dropout masks in every run
        with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            logits = target.train_logits(model, tokens)  # (B, T, V)
        loss = (logits * weights.to(logits.dtype)).sum() / (tokens.shape[0] * tokens.shape[1])
        loss.backward()
    grads = {names.get(id(p), canonical_name(n)): p.grad for n, p in model.named_parameters()}
    run = _Run(loss.detach(), logits.detach(), grads, forwards,
               target.checkpointed_blocks(model), [str(w.message) for w in caught])
    target.set_checkpointing(model, None, mode)
    model.zero_grad(set_to_none=True)
    return run


def _lora_template(target: CheckpointingTarget, targets: Sequence[str], dropout: float,
                   g: torch.Generator) -> Optional[nn.Module]:
    """A copy with LoRA on a frozen base (on ``targets`` where the target applies it: ``A`` drawn from ``g``) and a
    non-zero ``B`` drawn from ``g`` — with ``B = 0``, ``A`` would get a zero gradient and a lost one would not show.
    None where the target has no LoRA layers. Adapters not of loralib's shape (torchtune's, litgpt's): every
    all-zero trainable tensor drawn instead."""
    lora = target.fresh_lora_model(targets, LORA_RANK, LORA_ALPHA, dropout, g)
    if lora is not None:
        layers = target.lora_layers(lora)
        if layers:
            draw_nonzero_b(layers, g)
        else:
            draw_nonzero_zeros(lora, g)
    return lora


def _blocks_only_template(target: CheckpointingTarget) -> nn.Module:
    """A copy whose blocks are trainable and everything outside them frozen: no block's input requires grad, as
    under LoRA on a frozen base."""
    model = target.fresh_model().requires_grad_(False)
    for block in target.blocks(model):
        block.requires_grad_(True)
    return model


def _full_template(target: CheckpointingTarget) -> nn.Module:
    """A copy with every parameter trainable; a model that comes adapted keeps its adapters unmerged in eval mode."""
    full = target.fresh_model().requires_grad_(True)
    for layer in loralib_layers(full).values():
        if isinstance(getattr(layer, "merge_weights", None), bool):
            layer.merge_weights = False
    return full


def check_gradient_checkpointing(model: Any, tokens: Optional[torch.Tensor] = None, *,
                                 policies: Sequence[str] = ("all", "seed", "every:2"), lora: bool = True,
                                 lora_targets: Sequence[str] = ("wq", "wv", "w2"), dropout: float = 0.1,
                                 autocast_dtype: Optional[torch.dtype] = torch.bfloat16, full_finetune: bool = True,
                                 seed: int = 0, block_runner: Optional[Callable[..., torch.Tensor]] = None
                                 ) -> CheckResult:
    """Check property 4 on copies of ``model`` — a target or a model :func:`verify.targets.spec.as_target` adapts —
    which is left untouched, the global RNG included.

    Args:
        model: llama_ref's ``Transformer``, a Meta-style model, another model ``as_target`` adapts, or a target
            (:class:`verify.targets.protocols.CheckpointingTarget`). A target missing a member of ``PROTOCOLS``
            gives a not-applicable result naming the member (e.g. ``CheckpointingTarget.set_checkpointing``), as
            does one whose own ``not_applicable`` answer says so (no switch, or a forward that lets no gradient
            through), or whose switch offers none of ``policies``.
        tokens: token ids (B, L), moved to the target's device. Default: random ids drawn from ``seed``, B =
            min(2, max_batch_size), L = min(16, max_seq_len).
        policies: checkpointing policies compared with the plain run ("all", "seed", "every:K", as
            :func:`verify.oracles.policy_layers` defines them; an unknown one raises ValueError before anything
            runs). Those the target's switch does not offer are skipped, saying so.
        lora: run the LoRA case: a frozen base with adapters (with llama_ref rank 4, alpha 8, ``B`` drawn
            non-zero), every policy on it; a model without LoRA layers trains its blocks with the rest frozen.
        lora_targets: with llama_ref's model, the projections of every block that get adapters.
        dropout: the adapters' dropout probability (> 0: the recomputation must redraw the forward's masks).
        autocast_dtype: every case again under ``torch.autocast`` in this dtype; None: the model's dtype only.
        full_finetune: add the fully trainable model under ``"all"`` (or the target's first offered policy), in
            train and in eval mode. ``lora`` and ``full_finetune`` both False raises ValueError.
        seed: seed of the tokens, the loss's random weights, the adapters and the dropout masks.
        block_runner: with llama_ref's model, the copies' way of running a block (another implementation's
            checkpointing, under test); None: llama_ref's own.

    Returns:
        The result: ``max_abs`` the largest |checkpointed − plain| over loss, logits and every gradient,
        ``max_rel`` the largest elementwise relative difference, ``margin`` the worst |checkpointed − plain| ÷
        (atol + rtol·|plain|). A missing gradient, a wrong block selection or recomputation count fails too.
    """
    policies = list(policies)
    for policy in policies:
        policy_layers(policy, 1)  # a bad policy is the caller's error, raised before anything runs
    if not (lora or full_finetune):
        raise ValueError("nothing to check: lora and full_finetune are both False")
    target = as_target(model, block_runner=block_runner)
    why = why_not(target, NAME, PROTOCOLS)
    if why:
        return CheckResult.na(NAME, why, str(target))
    found = Findings()
    if target.policies is not None:
        offered = [q for q in policies if q in target.policies]
        if not offered:
            return CheckResult.na(NAME, f"its checkpointing switch offers policies {list(target.policies)}, none of "
                                  f"{policies}", str(target))
        if offered != policies:
            found.not_applicable(f"policies {[q for q in policies if q not in offered]} not checked: the target's "
                                 f"switch offers {list(target.policies)}")
        policies = offered
    full_policy = "all" if target.policies is None else policies[0]
    gc_modes: Sequence[Optional[str]] = tuple(target.gc_modes) or (None,)
    if target.checkpoints_in_eval is False:
        found.note("the target checkpoints in train mode only: in eval mode no block is expected to be recomputed")
    lim = target.limits
    tol = tolerance(lim.dtype, NAME)
    g = torch.Generator().manual_seed(seed)
    if tokens is None:
        tokens = torch.randint(0, lim.vocab_size, (min(2, lim.max_batch_size), min(16, lim.max_seq_len)),
                               generator=g)
    tokens = tokens.to(lim.device)
    weights = torch.randn((*tokens.shape, lim.vocab_size), generator=g).to(lim.device)

    precisions: list[Optional[torch.dtype]] = [None] + ([autocast_dtype] if autocast_dtype is not None else [])
    modes_of_dtype = [_dtype_name(lim.dtype)] + [f"{_dtype_name(d)} autocast" for d in precisions[1:]]
    stage = "copying the model and applying LoRA"
    case = str(target)
    criterion = f"loss, logits, grads {tol}; checkpointed blocks 2 forwards, others 1"
    try:
        with _rng_fork(lim.device):
            # One model alive at a time (beside the caller's), each run on it in place: memory is the model, its
            # plain run's gradients and one checkpointed run's.
            cases: list[tuple[str, Callable[[], Optional[nn.Module]], list[str]]] = []
            if lora:
                cases.append(("LoRA", lambda: _lora_template(target, lora_targets, dropout, g), policies))
            if full_finetune:
                cases.append(("full", lambda: _full_template(target), [full_policy]))
            n_layers, parts = None, []
            for label, make, case_policies in cases:
                stage = f"building the {label} model"
                template = make()
                if template is None:
                    template = _blocks_only_template(target)
                    label = "blocks only"
                    parts.append(f"blocks trained, the rest frozen (no LoRA layers) policies={','.join(policies)}")
                elif label == "LoRA" and not target.lora_layers(template):  # its own adapters, not loralib's shape
                    n_trainable = sum(p.numel() for p in template.parameters() if p.requires_grad)
                    parts.append(f"LoRA as the model comes ({n_trainable} trainable parameters on a frozen base) "
                                 f"policies={','.join(policies)}")
                elif label == "LoRA":
                    d = describe_layers(target.lora_layers(template))
                    parts.append(f"LoRA r={d['r']} alpha={d['alpha']}{d['rslora']} on {d['targets']} "
                                 f"dropout={d['dropout']} policies={','.join(policies)}")
                else:
                    parts.append(f"full fine-tune policy={full_policy} (train, eval)")
                n_layers = len(target.blocks(template))
                modes = [("", True)] + ([(" eval", False)] if label == "full" else [])
                for precision, mode in zip(precisions, modes_of_dtype):
                    for suffix, training in modes:
                        template.train(training)
                        where = f"{mode} {label}{suffix}"
                        stage = f"{where} plain run"
                        plain = _run(target, template, None, tokens, weights, precision, seed)  # if it raises: none
                        if plain.forwards != [1] * n_layers:
                            found.fail(f"{where} plain run: forwards per block {plain.forwards}, expected 1 each")
                        missing = [canonical_name(n) for n, q in template.named_parameters()
                                   if q.requires_grad and plain.grads.get(canonical_name(n)) is None]
                        if missing:
                            found.fail(f"{where} plain run: no gradient on trainable {_names(missing)}")
                        for policy in case_policies:
                            for gc_mode in gc_modes:
                                _compare_policy(f"{where} policy={policy}{' ' + gc_mode if gc_mode else ''}",
                                                target, template, policy, plain, tokens, weights, precision, seed,
                                                tol, found, gc_mode)
                        del plain
                del template
            case = (f"{'; '.join(parts)}; {' + '.join(modes_of_dtype)}; B={tokens.shape[0]} L={tokens.shape[1]} "
                    f"layers={n_layers}" + (f"; each {', '.join(gc_modes)}" if gc_modes != (None,) else ""))
    except Exception as e:  # the plain run (or the copy) failed: nothing could be compared
        found.raised(f"{stage}: {describe_exception(e)}", aborts=True)
    return found.result(NAME, case, tol, criterion)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _compare_policy(where: str, target: CheckpointingTarget, template: nn.Module, policy: str, plain: _Run,
                    tokens: torch.Tensor, weights: torch.Tensor, precision: Optional[torch.dtype], seed: int,
                    tol: Tolerance, found: Findings, mode: Optional[str] = None) -> None:
    """One checkpointed run against the plain run: block selection, recomputation counts, loss, logits, gradients."""
    try:
        run = _run(target, template, policy, tokens, weights, precision, seed, mode)
    except Exception as e:  # the checkpointed path crashed where the plain one did not
        found.raised(f"{where}: {type(e).__name__}: {e}", aborts=True,
                     detail=f"{where}: raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    n_before = len(found.entries)
    selected = policy_layers(policy, len(run.forwards))
    in_eval = not template.training
    expected = frozenset() if in_eval and target.checkpoints_in_eval is False else selected
    if run.selected is not None and run.selected != selected:
        found.fail(f"{where}: the model checkpoints blocks {sorted(run.selected)}, the policy means "
                   f"{sorted(selected)}")
    want = [2 if i in expected else 1 for i in range(len(run.forwards))]
    if expected and all(n == 1 for n in run.forwards) and in_eval and target.checkpoints_in_eval is None:
        found.note(f"{where}: no block was recomputed in eval mode: the target checkpoints in train mode only, a "
                   "legitimate design (declare checkpoints_in_eval = False on the target to say so, True to have "
                   "eval mode checked)")
    elif expected and all(n == 1 for n in run.forwards):
        found.fail(f"{where}: checkpoint silently not applied: no block was recomputed in backward "
                   f"(blocks {sorted(expected)} should have been)")
    elif run.forwards != want:
        wrong = [f"block {i} ran {n}, expected {w}" for i, (n, w) in enumerate(zip(run.forwards, want)) if n != w]
        found.fail(f"{where}: forwards per block {run.forwards} (recomputed once = 2): {_names(wrong)}")
    found.compared(f"{where} loss", compare(run.loss, plain.loss, tol, "loss"))
    found.compared(f"{where} logits", compare(run.logits, plain.logits, tol, "logits"))
    found.compared_grads(where, compare_grads(run.grads, plain.grads, tol))
    if len(found.entries) > n_before and run.warned:  # the warning explains the failures just recorded
        found.note(f"{where}: torch warned: {_names(sorted(set(run.warned)), 2)}")


def _names(names: Sequence, limit: int = 6) -> str:
    return name_list(names, limit)
