"""Property 6: data-parallel training (DDP, FSDP2) equals the single-process large batch.

The same windows of ragged, prompt-masked micro-batches (two per rank, then a short window whose shares differ in
length: the second step also carries the optimizer's state) are trained by ``llama_ref.train.distributed.DistributedTrainer`` on W CPU ranks (``torch.multiprocessing``
spawn, a ``FileStore`` in a temporary directory, gloo; W = 2 and 3, so that an even split is not assumed) and by
llama_ref's single-process ``Trainer`` with the whole window as its accumulation (``--ga W×ga``). For every case —
DDP and FSDP2; a full fine-tune with SGD + momentum, LoRA on a frozen base with AdamW and gradient checkpointing,
bf16 (DDP: autocast; FSDP2: ``MixedPrecisionPolicy``); clipping that binds — and every step, **on every rank**:

* the gradients the optimizer steps with (captured by a step pre-hook; sharded ones gathered with ``full_tensor()``),
* the parameters after the step (gathered), the loss it reports and its pre-clip gradient norm,

are compared with the single process's. Judged as the GA check judges (rounding differs with the order of the same
sums): calibrated against a float64 single-process run — the distributed result may be at most
``CALIBRATION_FACTORS["grad_accum"]`` times further from it than the single-process run in the same precision
(``["distributed_bf16"]`` in bf16, where FSDP2's policy computes with bf16 parameters rather than autocast), over
all tensors; the loss with assert_close's defaults for the precision; the norm within the same factor.

A worker that raises reports its rank's error (the check fails with it; no hang: the process group has a timeout).
FSDP2 on CPU/gloo crashes below torch 2.7 (measured on 2.4 and 2.6): there its cases are not applicable.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llama_ref.args import ModelArgs
from llama_ref.lora import ALL_TARGETS, apply_lora_to_llama
from llama_ref.model import Transformer
from llama_ref.train.distributed import DistributedTrainer, full, wrap
from llama_ref.train.trainer import Trainer

from ..compare import compare, compare_calibrated
from ..findings import Findings
from ..result import CheckResult
from ..tolerances import CALIBRATION_FACTORS, tolerance
from ..targets.lora import draw_nonzero_b, layer_views
from ..targets.protocols import DistributedTarget
from .grad_accum import padded, random_sequences

NAME = "distributed"
PROTOCOLS = (DistributedTarget,)  # llama_ref's model, which DistributedTrainer trains
FSDP2_MIN_TORCH = (2, 7)
TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    kind: str  # "ddp" | "fsdp2"
    variant: str  # "full" (SGD + momentum) | "lora" (AdamW, gradient checkpointing)
    precision: str = "off"  # "off" | "bf16"

    @property
    def label(self) -> str:
        return f"{self.kind} {self.variant}{' bf16' if self.precision == 'bf16' else ''}"


def default_cases(kinds: Sequence[str] = ("ddp", "fsdp2")) -> list[Case]:
    return [Case(k, v, p) for k in kinds for v, p in (("full", "off"), ("lora", "off"), ("full", "bf16"))]


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def fsdp2_unavailable() -> Optional[str]:
    if _torch_version() < FSDP2_MIN_TORCH:
        return (f"FSDP2 on CPU/gloo crashes on torch {torch.__version__.split('+')[0]} (measured on 2.4 and 2.6; it "
                f"runs from {'.'.join(map(str, FSDP2_MIN_TORCH))})")
    return None


# ---- one run of a case: the same code in a rank and in the single process -----------------------------------------

def _start_model(job: dict, case: Case) -> Transformer:
    model = Transformer(ModelArgs(**job["args"]))
    model.kv_caching = False
    if case.variant == "lora":
        apply_lora_to_llama(model, 4, 8, 0.0, ALL_TARGETS)
        model.set_gradient_checkpointing("all")
    model.load_state_dict(job["states"][case.variant])
    return model


def _optimizer(case: Case, params: list) -> torch.optim.Optimizer:
    if case.variant == "full":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, eps=1e-6)  # eps: see the GA check's OPTIMIZERS


def _sync_on(net: torch.nn.Module) -> Optional[bool]:
    """Whether the backward of the forward about to run synchronises gradients: DDP's flag (``no_sync`` clears it),
    FSDP2's parameter groups' ``reduce_grads`` (``set_requires_gradient_sync``); None where neither can be read."""
    if hasattr(net, "require_backward_grad_sync"):
        return bool(net.require_backward_grad_sync)
    state = net._get_fsdp_state() if hasattr(net, "_get_fsdp_state") else None
    groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
    flags = [g.reduce_grads for g in groups if g is not None and hasattr(g, "reduce_grads")]
    return all(flags) if flags else None


def _train(trainer: Trainer, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           windows: Sequence[Sequence[dict]], syncs: Optional[list] = None) -> list[dict]:
    """Every window through ``trainer``; per step what the optimizer stepped with and what came of it, and (with
    ``syncs``, the flags a forward pre-hook on the data-parallel module appends) how many of the window's
    micro-batches synchronised their gradients."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    seen: list[dict] = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append({names[id(p)]: full(p.grad).detach().clone() for p in params if p.grad is not None}))
    steps = []
    for window in windows:
        seen.clear()
        if syncs is not None:
            syncs.clear()
        r = trainer.step(window)
        n_syncs = None if syncs is None or None in syncs else sum(syncs)
        steps.append({"grads": seen[-1] if len(seen) == 1 else None, "n_stepped": len(seen), "loss": r.loss,
                      "norm": r.grad_norm, "syncs": n_syncs,
                      "params": {names[id(p)]: full(p.detach()).clone() for p in params}})
    return steps


def _worker(rank: int, world: int, store: str, job_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        job = torch.load(job_path, weights_only=False)
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        for label, trainer_cls in job["trainers"].items():
            for i, case in enumerate(job["cases"]):
                if i not in job["runs"][label]:
                    continue
                model = _start_model(job, case)
                half = torch.bfloat16 if case.precision == "bf16" else None
                net = wrap(model, case.kind, device_type="cpu", mp=half if case.kind == "fsdp2" else None)
                syncs: list = []
                net.register_forward_pre_hook(lambda m, args: syncs.append(_sync_on(m)))
                opt = _optimizer(case, [p for p in net.parameters() if p.requires_grad])
                autocast = "bf16" if half is not None and case.kind == "ddp" else "off"
                try:
                    trainer = trainer_cls(net, opt, precision=autocast, clip=job["clip"][case.variant])
                    result: Any = _train(trainer, model, opt, job["windows"], syncs)
                except Exception as e:  # this case failed on this rank: said, and the next case runs
                    result = f"{type(e).__name__}: {e}"
                    dist.barrier()
                torch.save(result, os.path.join(out_dir, f"{label}-{i}-{rank}.pt"))
    except BaseException:  # SystemExit and the like too: a rank that stops says why, whatever stopped it
        with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Every result is on disk (errors included): leave without the interpreter's teardown, where a gloo/FSDP2 thread
    # still joinable can abort the process (SIGABRT, seen in about 1 of 10 FSDP2 runs on a loaded CPU).
    os._exit(0)


def _reference(job: dict, case: Case, windows: Sequence[Sequence[dict]], dtype: torch.dtype,
               precision: str) -> list[dict]:
    model = _start_model(job, case).to(dtype)
    opt = _optimizer(case, [p for p in model.parameters() if p.requires_grad])
    return _train(Trainer(model, opt, precision=precision, clip=job["clip"][case.variant]), model, opt, windows)


# ---- the check ------------------------------------------------------------------------------------------------------

def _job(model: Transformer, world: int, cases: Sequence[Case], trainers: dict[str, type], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    args = model.params
    sizes = [2 * world, world + 1]  # micro-batches per window: two per rank, then a short one (shares of 2 and 1)
    seqs = random_sequences(2 * sum(sizes), args.vocab_size, min(12, args.max_seq_len), g)
    micro = [dict(zip(("input_ids", "labels"), padded(seqs[i:i + 2], torch.device("cpu"))))
             for i in range(0, len(seqs), 2)]
    windows, start = [], 0
    for n in sizes:
        windows.append(micro[start:start + n])
        start += n
    base = copy.deepcopy(model).float().cpu()
    base.kv_caching = False
    lora = copy.deepcopy(base)
    apply_lora_to_llama(lora, 4, 8, 0.0, ALL_TARGETS, generator=g)
    draw_nonzero_b(layer_views(lora), g)
    states = {"full": base.state_dict(), "lora": lora.state_dict()}
    job = {"args": {f: getattr(args, f) for f in args.__dataclass_fields__}, "states": states, "windows": windows,
           "cases": list(cases), "trainers": dict(trainers), "clip": {}}
    job["args"]["kv_caching"] = False
    for variant in ("full", "lora"):  # half the first window's norm: clipping binds
        ref = _reference({**job, "clip": {variant: None}}, Case("ddp", variant), windows[:1], torch.float32, "off")
        grads = ref[0]["grads"] or {}
        job["clip"][variant] = 0.5 * math.sqrt(sum(float(t.double().square().sum()) for t in grads.values()))
    return job


def _judge(where: str, got: dict, plain: dict, exact: dict, factor: float, dtype: torch.dtype,
           found: Findings) -> None:
    if got["n_stepped"] != 1:
        found.fail(f"{where}: optimizer.step ran {got['n_stepped']} times in one window")
        return
    if got.get("syncs") not in (None, 1):  # accumulation's point: one synchronisation per window, on its last
        found.fail(f"{where}: gradients synchronised on {got['syncs']} of the window's micro-batches, not once")
    loss_ok = compare(torch.tensor(got["loss"], dtype=torch.float64), torch.tensor(exact["loss"], dtype=torch.float64),
                      tolerance(dtype), "loss").ok
    if not loss_ok:
        found.fail(f"{where}: loss {got['loss']:.7g} != the single process's {plain['loss']:.7g} (float64: "
                       f"{exact['loss']:.7g}; {got['loss'] / exact['loss']:.4g}x it)")
    for what in ("grads", "params"):
        names = sorted(exact[what])
        if sorted(got[what]) != names:
            found.fail(f"{where} {what}: tensors {sorted(set(names) ^ set(got[what]))[:3]} differ in presence")
            continue
        flat = [torch.cat([d[what][n].flatten().double() for n in names]) for d in (got, plain, exact)]
        cal = compare_calibrated(flat[0], flat[1], flat[2], factor,
                                 floor=torch.finfo(dtype).eps * float(flat[2].norm()), name=what)
        found.measure(float((flat[0] - flat[1]).abs().max()), margin=cal.margin)
        if not cal.ok:
            found.fail(f"{where} {what}: {cal}")
    if (got["norm"] is None) != (exact["norm"] is None):
        found.fail(f"{where}: grad norm {got['norm']} vs {exact['norm']}")
    elif exact["norm"] is not None:
        cal = compare_calibrated(*(torch.tensor(d["norm"], dtype=torch.float64) for d in (got, plain, exact)), factor,
                                 floor=torch.finfo(dtype).eps * exact["norm"], name="grad_norm")
        if not cal.ok:
            allowed = factor * max(abs(plain["norm"] - exact["norm"]), torch.finfo(dtype).eps * exact["norm"])
            found.fail(f"{where}: pre-clip norm {got['norm']:.7g} vs the single process's {exact['norm']:.7g} "
                           f"(off by {cal.error:.2e} > {allowed:.2e})")


def check_distributed_many(model: Optional[Transformer], trainers: dict[str, type], *,
                           world_sizes: Sequence[int] = (2, 3), cases: Optional[Sequence[Case]] = None,
                           seed: int = 0, cases_of: Optional[dict[str, Sequence[Case]]] = None
                           ) -> dict[str, CheckResult]:
    """Property 6 for each trainer of ``trainers``, all in one spawn per world size (spawning dominates the cost).

    Args:
        model: llama_ref's ``Transformer`` (copied, left untouched; None: the embedded default model). Not a target:
            through :mod:`verify.properties` any other model is not applicable.
        trainers: label → a ``DistributedTrainer`` (sub)class, each an implementation under test.
        world_sizes: numbers of CPU ranks (gloo) to run every case on; by default 2 and 3 (no even split assumed).
        cases: the :class:`Case` list (DDP or FSDP2 × full / LoRA × fp32 / bf16). Default: :func:`default_cases`,
            every kind × (full, LoRA, full bf16). Below torch 2.7 FSDP2 cases are not run, a not-applicable note
            saying so.
        seed: seed of the sequences and the adapters' weights.
        cases_of: label → the cases that trainer runs, where it runs fewer than ``cases`` (a zoo's mutants on the
            cases that show them beside the correct trainer on every case, in the same spawn).

    Returns:
        Label → its result: ``max_abs`` the largest |distributed − single process in the same precision| over the
        stepped gradients and the parameters after each step, on every rank; ``margin`` the worst calibrated ratio ÷
        its factor (``CALIBRATION_FACTORS["grad_accum"]``, ``["distributed_bf16"]`` in bf16). A rank that raises or
        dies fails its trainer's result with its error.
    """
    if model is None:
        from llama_ref.default import default_model
        model = default_model()
    cases = list(cases) if cases is not None else default_cases()
    na = fsdp2_unavailable()
    found = {label: Findings() for label in trainers}
    if na and any(c.kind == "fsdp2" for c in cases):
        for f in found.values():
            f.not_applicable(f"FSDP2 cases not run: {na}")
    cases = [c for c in cases if not (na and c.kind == "fsdp2")]
    uncounted: dict[str, set[str]] = {}  # label → cases whose synchronisations could not be read
    runs = {label: [i for i, c in enumerate(cases) if cases_of is None or label not in cases_of
                    or c in cases_of[label]] for label in trainers}  # label → the indices of its cases
    for world in world_sizes:
        job = _job(model, world, cases, trainers, seed)
        job["runs"] = runs
        with tempfile.TemporaryDirectory() as tmp:
            job_path = os.path.join(tmp, "job.pt")
            torch.save(job, job_path)
            mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), job_path, tmp), nprocs=world, join=True)
            crashed = [open(os.path.join(tmp, f)).read().strip().splitlines()[-1] for f in sorted(os.listdir(tmp))
                       if f.startswith("error-")]
            for i, case in enumerate(cases):
                dtype = torch.bfloat16 if case.precision == "bf16" else torch.float32
                factor = CALIBRATION_FACTORS["distributed_bf16" if case.precision == "bf16" else "grad_accum"]
                plain = _reference(job, case, job["windows"], torch.float32, case.precision)
                exact = _reference(job, case, job["windows"], torch.float64, "off")
                for label in (label for label in trainers if i in runs[label]):
                    for rank in range(world):
                        path = os.path.join(tmp, f"{label}-{i}-{rank}.pt")
                        where = f"W={world} {case.label} rank {rank}"
                        if not os.path.exists(path):
                            found[label].raised(f"{where}: no result ({'; '.join(crashed) or 'the rank died'})")
                            continue
                        got = torch.load(path, weights_only=False)
                        if isinstance(got, str):
                            found[label].raised(got, detail=f"{where}: raised {got}")
                            continue
                        if len(got) != len(exact):  # a window not run (the short last one, say) is never a pass
                            found[label].fail(f"{where}: {len(got)} optimizer steps for the {len(exact)} windows")
                        for step, (g_, p_, e_) in enumerate(zip(got, plain, exact)):
                            _judge(f"{where} step {step + 1}", g_, p_, e_, factor, dtype, found[label])
                        if any(g_.get("syncs") is None for g_ in got):
                            uncounted.setdefault(label, set()).add(case.label)

    for label, which in uncounted.items():
        found[label].not_applicable(f"gradient synchronisations per window not counted in {', '.join(sorted(which))}: "
                                    "this torch's data-parallel module does not say whether a backward syncs")

    def case_text(label: str) -> str:
        return (f"W={'/'.join(map(str, world_sizes))}, {', '.join(cases[i].label for i in runs[label])}; windows of 2 "
                "micro-batches per rank and a short last one; clipping binds")
    criterion = (f"calibrated <= {CALIBRATION_FACTORS['grad_accum']:g}x fp32, "
                 f"{CALIBRATION_FACTORS['distributed_bf16']:g}x bf16; every rank")
    return {label: found[label].result(NAME, case_text(label), criterion=criterion) for label in trainers}


def check_distributed(model: Optional[Transformer] = None, *, trainer_cls: type = DistributedTrainer,
                      world_sizes: Sequence[int] = (2, 3), cases: Optional[Sequence[Case]] = None,
                      seed: int = 0) -> CheckResult:
    """Property 6 on llama_ref's ``model`` with ``trainer_cls``: :func:`check_distributed_many` for one trainer.

    Args:
        model: llama_ref's ``Transformer`` (copied, left untouched; None: the embedded default model). Not a target:
            through :mod:`verify.properties` any other model is not applicable.
        trainer_cls: a ``DistributedTrainer`` (sub)class: the implementation under test.
        world_sizes: numbers of CPU ranks (gloo) to run every case on.
        cases: the :class:`Case` list; default :func:`default_cases` (FSDP2's are not run below torch 2.7, saying so).
        seed: seed of the sequences and the adapters' weights.
        cases_of: label → the cases that trainer runs, where it runs fewer than ``cases`` (a zoo's mutants on the
            cases that show them beside the correct trainer on every case, in the same spawn).

    Returns:
        The result, as :func:`check_distributed_many` gives it: ``max_abs`` the largest |distributed − single
        process| over gradients and parameters on every rank, ``margin`` the worst calibrated ratio ÷ its factor.
    """
    return check_distributed_many(model, {"trainer": trainer_cls}, world_sizes=world_sizes, cases=cases,
                                  seed=seed)["trainer"]
