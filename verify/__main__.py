"""``llama-verify``: every check on the embedded default model, a Meta checkpoint or the user's own model
(``--target``), a table, an exit code: 0 when nothing failed, 1 on a FAIL, 2 on bad input."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from llama_ref.generation import SEED_PROMPTS

from .mutants import mutants_for
from .properties import Inputs, default_names, get, worst_of
from .runner import DTYPES, environment, kill_matrix, require, run_checks, run_target_checks, uncaught
from .table import format_kill_matrix, format_results, format_table, write_json
from .targets.spec import as_target, load_factory, load_loss_fn, load_packed_forward
from .targets.train_step import load_train_step


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-verify", description=__doc__)
    p.add_argument("--ckpt-dir", help="a Meta checkpoint directory (params.json + consolidated.*.pth); "
                                      "default: the embedded tiny model")
    p.add_argument("--target", metavar="SPEC", default="llama_ref",
                   help="the model to check: llama_ref (the embedded default), hf (the embedded default's weights "
                        "in transformers' LlamaForCausalLM), PATH.py:FACTORY or package.module:FACTORY, a function "
                        "returning a fresh model (llama_ref's Transformer, a transformers PreTrainedModel or PEFT "
                        "PeftModel, or Meta-style: forward(tokens, start_pos), cache_k/cache_v) "
                        "(default: %(default)s)")
    p.add_argument("--train-step", metavar="SPEC",
                   help="PATH.py:FN or package.module:FN: your training step, fn(model, optimizer, window, max_norm) "
                        "-> logged loss, for the grad_accum check (default: the target's own loop, llama_ref's "
                        "Trainer; a Meta-style model has none)")
    p.add_argument("--mp-train-step", metavar="SPEC",
                   help="PATH.py:FN or package.module:FN: your mixed-precision training step (its own autocast and, "
                        "for fp16, GradScaler), same signature, for the mixed_precision check (default: llama_ref's "
                        "Trainer; a Meta-style model has none)")
    p.add_argument("--loss-fn", metavar="SPEC",
                   help="PATH.py:FN or package.module:FN: your loss kernel, fn(hidden, weight, labels, *, "
                        "reduction='mean', [bias], [chunk_size], [num_items_in_batch], [softcap]) -> loss, checked by "
                        "loss_kernel beside the target's own kernels (docs/verify-your-model.md)")
    p.add_argument("--packed-forward", metavar="SPEC",
                   help="PATH.py:FN or package.module:FN: your packed forward, fn(model, input_ids, *, "
                        "[positions], [document_ids], [cu_seqlens]) -> logits, checked by packing on the target's "
                        "model beside its own packed path (docs/verify-your-model.md)")
    p.add_argument("--preset", help="a model preset with random weights (e.g. llama-3.2-1b: the real shape, seeded "
                                    "weights; nothing downloaded) instead of the embedded default")
    p.add_argument("--tied", action="store_true",
                   help="the embedded default (or --preset) built with a tied output head (tie_embeddings): what "
                        "property 9, tied_embeddings, asks; untied it is not applicable")
    p.add_argument("--tokenizer", help="its tokenizer.model (SentencePiece or tiktoken); needed with --ckpt-dir")
    p.add_argument("--device", help="torch device (default: cpu; a --target model stays where its factory put it "
                   "unless this is given)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="dtype(s) to check in, repeatable (default: float32 and bfloat16)")
    p.add_argument("--attn-impl", action="append", choices=["math", "sdpa"],
                   help="attention path(s), repeatable (default: both)")
    p.add_argument("--check", action="append", choices=default_names(), help="run only these checks (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=256,
                   help="with --ckpt-dir or --preset: KV-cache length (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=4,
                   help="with --ckpt-dir or --preset: KV-cache rows (default: %(default)s)")
    p.add_argument("--mutants", action="store_true", help="also run every bug-zoo mutant and print the kill matrix")
    p.add_argument("--distributed", action="store_true",
                   help="also property 6: DDP and FSDP2 on 2 and 3 spawned CPU ranks against one process (with "
                        "--mutants, its zoo too)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except (FileNotFoundError, ValueError, TypeError) as e:  # bad paths, checkpoints, tokenizers, targets: a message
        print(f"llama-verify: error: {e}", file=sys.stderr)
        return 2


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.ckpt_dir and not args.tokenizer:
        _parser().error("--ckpt-dir needs --tokenizer")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        _parser().error(f"--device {args.device}: CUDA is not available")

    train_step = load_train_step(args.train_step) if args.train_step else None  # a bad SPEC: exit 2 before any work
    mp_train_step = load_train_step(args.mp_train_step) if args.mp_train_step else None
    loss_fn = load_loss_fn(args.loss_fn) if args.loss_fn else None
    packed_forward = load_packed_forward(args.packed_forward) if args.packed_forward else None
    if args.ckpt_dir and args.preset:
        _parser().error("--ckpt-dir and --preset are two models: give one")
    if args.tied and (args.ckpt_dir or args.target not in ("llama_ref", HF_SPEC)):
        _parser().error("--tied builds the embedded default (--target hf: its transformers model) or --preset tied; "
                        "a checkpoint or --target model is tied or not as it comes")
    if args.target != "llama_ref":
        if args.ckpt_dir or args.preset or args.attn_impl or (args.mutants and args.target != HF_SPEC):
            _parser().error("--target SPEC takes none of --ckpt-dir, --preset, --attn-impl (they are llama_ref's), "
                            "nor --mutants except with --target hf")
        return _main_target(args, train_step, mp_train_step, loss_fn, packed_forward)
    if args.ckpt_dir:
        from llama_ref.formats.meta import load_model
        from llama_ref.tokenizer import Tokenizer

        tokenizer = Tokenizer(args.tokenizer)
        factory = functools.partial(load_model, args.ckpt_dir, dtype=torch.float32, tokenizer=tokenizer,
                                    max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size)
        target = f"checkpoint {args.ckpt_dir}"
    elif args.preset:
        from llama_ref.args import ModelArgs
        from llama_ref.default import default_tokenizer
        from llama_ref.model import Transformer, init_weights

        ModelArgs.preset(args.preset)  # an unknown name: the error lists the presets
        tokenizer = default_tokenizer()  # its ids are valid in every preset's vocabulary

        def factory(**overrides):
            sizes = dict(max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size)
            return init_weights(Transformer(ModelArgs.preset(args.preset, **sizes, **overrides)), args.seed)
        target = f"preset {args.preset!r} (random weights, seed {args.seed})"
    else:
        from llama_ref.default import DEFAULT_PRESET, DEFAULT_SEED, default_model, default_tokenizer

        tokenizer = default_tokenizer()
        factory = functools.partial(default_model, DEFAULT_SEED)
        target = f"embedded default (preset {DEFAULT_PRESET!r}, seed {DEFAULT_SEED})"

    if args.tied:
        untied_factory = factory

        def factory(**overrides):
            return untied_factory(**{"tie_embeddings": True, **overrides})
        target += ", tied"

    # The seed's prompts, cut to 16 tokens: still ragged, and short enough that uncached decoding stays cheap.
    rows = args.max_batch_size if args.preset else factory().params.max_batch_size  # no 1B model just to read it
    prompts = [tokenizer.encode(p, bos=True, eos=False)[:16] for p in SEED_PROMPTS][:rows]
    inputs = Inputs(seed=args.seed, prompts=prompts, train_step=train_step, mp_train_step=mp_train_step,
                    loss_fn=loss_fn, packed_forward=packed_forward)
    checks = args.check or default_names()
    args.device = args.device or "cpu"
    env = environment(args.device)
    print(f"llama-verify on the {target}")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print()
    results = run_checks(factory, inputs, checks=checks, dtypes=args.dtype or ["float32", "bfloat16"],
                         attn_impls=args.attn_impl or ["math", "sdpa"], device=args.device)
    dist_zoo: dict = {}
    if args.distributed:
        from llama_ref.train.distributed import DistributedTrainer

        from .checks.distributed import check_distributed_many
        from .mutants.distributed import DIST_ZOO
        trainers = {"": DistributedTrainer, **({m.name: m.components["trainer_cls"] for m in DIST_ZOO}
                                               if args.mutants else {})}
        dist_zoo = check_distributed_many(factory(), trainers, seed=args.seed)
        results.append(dist_zoo.pop(""))
    print(format_results(results))
    failed = [r for r in results if not r.ok]
    payload = {"target": target, "environment": env, "results": [r.to_json() for r in results]}

    missed: list[str] = []
    na: set[str] = set()  # mutants this torch cannot show (FSDP2's, where FSDP2 does not run)
    if args.mutants:
        mutants = [m for m in mutants_for() if m.prop in checks]
        matrix = kill_matrix(factory, inputs, mutants, checks=checks, device=args.device)
        print()
        print("bug zoo (each mutant must make its own property's check fail):")
        print(format_kill_matrix(matrix, mutants))
        missed = uncaught(matrix, mutants)
        if dist_zoo:
            from .checks.distributed import fsdp2_unavailable
            from .mutants.distributed import FSDP2_ONLY
            no_fsdp2 = fsdp2_unavailable()
            na = {n for n in dist_zoo if n in FSDP2_ONLY and no_fsdp2}
            print()
            print("property 6's zoo (each must make the distributed check fail):")
            print(format_table([("mutant", "verdict")] + [
                (n, f"not applicable: only FSDP2 shows it, and {no_fsdp2}" if n in na else
                 "caught" if not r.ok else "MISSED") for n, r in dist_zoo.items()]))
            missed += [n for n, r in dist_zoo.items() if r.ok and n not in na]
            matrix.update({n: {"distributed": r} for n, r in dist_zoo.items()})
        payload["mutants"] = {name: {c: r.to_json() for c, r in row.items()} for name, row in matrix.items()}
        payload["mutants_missed"] = missed
        payload["mutants_not_applicable"] = sorted(na)

    if args.json:
        write_json(args.json, payload)
    print()
    print(f"{len(results) - len(failed)}/{len(results)} checks passed"
          + (f"; {len(missed)} mutant(s) NOT caught: {', '.join(missed)}" if args.mutants and missed else
             (f"; all {len(matrix) - len(na)} mutants caught" + (f", {len(na)} not applicable here" if na else "")
              if args.mutants else "")))
    return 1 if failed or missed else 0


HF_SPEC = "hf"  # --target hf: the embedded default in transformers' LlamaForCausalLM


def _main_target(args: argparse.Namespace, train_step: Optional[Callable[..., float]],
                 mp_train_step: Optional[Callable[..., float]], loss_fn: Any = None,
                 packed_forward: Optional[Callable[..., Any]] = None) -> int:
    hf_factory = "verify.oracle_hf:default_tied_hf_model" if args.tied else "verify.oracle_hf:default_hf_model"
    factory = load_factory(hf_factory if args.target == HF_SPEC else args.target)
    try:
        probe = factory()
    except Exception as e:
        raise ValueError(f"target {args.target!r}: calling its factory raised {type(e).__name__}: {e}") from e
    target = as_target(probe)  # TypeError, naming what is missing, for an object no adapter takes
    description = str(target)
    if args.check:  # asked by name: a target short of the property's members is a usage error, before any work
        require(target, args.check)
    del probe, target
    checks = args.check or default_names()
    env = environment(args.device or "cpu")
    print(f"llama-verify on {args.target}: {description}")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print()
    results = run_target_checks(factory, Inputs(seed=args.seed, train_step=train_step, mp_train_step=mp_train_step,
                                                loss_fn=loss_fn, packed_forward=packed_forward),
                                checks=checks, dtypes=args.dtype or [None],
                                device=args.device, asked=bool(args.check))
    print(format_results(results))
    failed = [r for r in results if not r.ok]
    na = [r for r in results if r.not_applicable]
    if args.json:
        write_json(args.json, {"target": args.target, "description": description, "environment": env,
                               "results": [r.to_json() for r in results]})
    print()
    print(f"{len(results) - len(failed) - len(na)}/{len(results)} checks passed, {len(failed)} failed, "
          f"{len(na)} not applicable")
    missed = _hf_zoo(factory) if args.mutants else []
    return 1 if failed or missed else 0


def _hf_zoo(factory: Callable[[], Any]) -> list[str]:
    """Every mutant of the transformers + PEFT zoo against its own property's check; the names of those missed."""
    from .mutants.hf import HF_ZOO, hf_target
    rows, missed = [("mutant", "property", "verdict", "origin")], []
    for m in HF_ZOO:
        with m.applied():
            r = worst_of(get(m.prop)(hf_target(factory(), m), Inputs(fail_fast=True)))
        rows.append((m.name, m.prop, "caught" if not r.ok else "MISSED", m.origin))
        if r.ok:
            missed.append(m.name)
    print()
    print(format_table(rows))
    print(f"\n{len(HF_ZOO) - len(missed)}/{len(HF_ZOO)} transformers + PEFT mutants caught")
    return missed


if __name__ == "__main__":
    sys.exit(main())
