# Over 350 lines: one benchmark, its three comparisons (memory, speed, MP + GC) printing one report.
"""LoRA training on CPU (fp32): step time and peak memory, each compared within one run.

a. LoRA vs full fine-tuning on the "bench" preset: r=16, alpha=32, dropout 0.05 on wq+wv (the seed report's setting;
   all seven targets for information) against the same model with every parameter trainable. Step time and peak
   memory; ratios LoRA / full.
b. Ours vs PEFT: our LoRA model against ``peft.get_peft_model`` (same r/alpha/dropout on q_proj+v_proj) around
   transformers' ``LlamaForCausalLM`` holding the same base weights (``verify.oracle_hf.build_hf_model``, train mode);
   attention "math"/"sdpa" for ours, "eager"/"sdpa" for transformers. Target: ours / PEFT step time ≤ 1.0, for
   the same kind of attention (ours "math" vs PEFT "eager", ours "sdpa" vs PEFT "sdpa").
c. The seed report's fine-tuning configuration, LoRA + gradient checkpointing + bf16 mixed precision, ours vs PEFT on the
   same weights: ours = ``apply_lora_to_llama`` (wq,wv, fp32 adapters) + ``half_frozen_base(bf16)`` +
   ``set_gradient_checkpointing("all")``; PEFT = ``build_hf_model(base, dtype=bf16)`` (RoPE tables stay fp32) +
   ``gradient_checkpointing_enable(use_reentrant=False)`` + ``get_peft_model`` (adapters upcast to fp32, peft's
   default ``autocast_adapter_dtype=True``). Both step through ``llama_ref.train.trainer.Trainer(precision="bf16")``
   (autocast around forward + ``token_loss_sum``, AdamW on the adapters); transformers sits behind a wrapper that
   maps ``(tokens, start_pos)`` to its logits. Tokens/s and MemTracker peak; targets ours/PEFT tokens/s ≥ 1 and
   peak ≤ 1. Checkpointing is checked by counting block forwards per step (2 = recomputed) and by the activation
   peak of the same models without it.

A step = logits of a batch of random tokens → cross-entropy of logits[:, :-1] against tokens[:, 1:] (computed here
for every contender: transformers gets no labels) → ``loss.backward()`` → ``SGD.step()`` →
``zero_grad(set_to_none=True)``. Two times per step: forward+backward alone, and the whole step (optimizer
included). Each figure is the median of ``--repeats`` steps after two warm-up steps; contenders run interleaved
(A B C A B C …), so that the load of a shared machine hits them alike. The loss of the first warm-up step (before
any update, B = 0: the base model) must agree between contenders. Our models train with ``kv_caching=False``
(transformers: ``use_cache=False``).

Peak memory: ``torch.distributed._tools.mem_tracker.MemTracker`` over one step after the warm-up, by category
(parameters, buffers, gradients, activations, temporaries, optimizer state). Cross-check (Linux): peak RSS
(``VmHWM``, reset after building model and optimizer) of a fresh subprocess over 3 steps, minus its RSS then.

    python scripts/bench_lora.py [--quick] [--threads N] [--repeats N] [--out docs/bench_lora.md] [--profile]
                                 [--no-rss] [--preset NAME --batch B --seq T] [--sections abc]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch
from bench_common import cpu_model, markdown
import torch.nn.functional as F
from torch import nn

from llama_ref.args import ModelArgs
from llama_ref.lora import ALL_TARGETS, apply_lora_to_llama
from llama_ref.model import Transformer, init_weights
from llama_ref.perf.peak import MiB, PeakTracker

SEED = 0
RANK, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-3
SEED_TARGETS = ("wq", "wv")
# Table column → PeakTracker's category (the table keeps MemTracker's own names).
CATEGORIES = {"Parameter": "parameter", "Buffer": "buffer", "Gradient": "gradient", "Activation": "activation",
              "Temp": "temporary", "Optstate": "optimizer state"}

PAIRS = {"ours math": "PEFT eager", "ours sdpa": "PEFT sdpa"}  # explicit matmul+softmax vs the fused kernel


def shifted_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at positions 0…T-2 against tokens (B, T) at 1…T-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


class Trainer:
    """One SGD training step of ``model`` on ``tokens``; ``forward`` maps tokens to logits."""

    def __init__(self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor):
        self.model, self.forward, self.tokens = model.train(), forward, tokens
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    def __call__(self) -> tuple[float, float, float]:
        """(forward+backward seconds, whole-step seconds, loss)."""
        t0 = time.perf_counter()
        loss = shifted_ce(self.forward(self.tokens), self.tokens)
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t0, loss.item()


def base_model(args: ModelArgs) -> Transformer:
    return init_weights(Transformer(args.replace(kv_caching=False)), SEED)


def ours(args: ModelArgs, tokens: torch.Tensor, targets: tuple[str, ...] = SEED_TARGETS) -> Trainer:
    model = base_model(args)
    if targets:
        apply_lora_to_llama(model, RANK, ALPHA, DROPOUT, targets)
    return Trainer(model, model, tokens)


def peft_trainer(base: Transformer, attn: str, tokens: torch.Tensor) -> Trainer:
    from peft import LoraConfig, get_peft_model
    from verify.oracle_hf import build_hf_model

    hf = build_hf_model(base)
    hf.set_attn_implementation(attn)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["q_proj", "v_proj"],
                     bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 method that is deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(hf, cfg)
    return Trainer(model, lambda t: model(input_ids=t, use_cache=False).logits, tokens)


def timed(trainers: dict[str, Trainer], repeats: int) -> dict[str, tuple[float, float, float]]:
    """name → (median forward+backward s, median step s, loss of the first warm-up step), interleaved."""
    first = {name: tr()[2] for name, tr in trainers.items()}
    for tr in trainers.values():
        tr()
    fb: dict[str, list[float]] = {name: [] for name in trainers}
    step: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, tr in trainers.items():
            a, b, _ = tr()
            fb[name].append(a)
            step[name].append(b)
    return {name: (statistics.median(fb[name]), statistics.median(step[name]), first[name]) for name in trainers}


def tracked_peak(tr: Trainer) -> dict[str, float]:
    """MemTracker's peak over one step of a warmed-up trainer (``llama_ref.perf.peak.PeakTracker``, the project's
    one reader): bytes by the columns of :data:`CATEGORIES`, and "Total"."""
    with PeakTracker(tr.model, tr.opt, tr.tokens) as tracker:
        tr()
    out = {col: tracker.breakdown_mb.get(ours, 0.0) * MiB for col, ours in CATEGORIES.items()}
    out["Total"] = tracker.peak_mb * MiB
    return out


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))  # kB


def rss_child(args: ModelArgs, batch: int, seq: int, targets: str) -> None:
    torch.set_num_threads(1)
    tokens = torch.randint(args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(SEED))
    tr = ours(args, tokens, tuple(targets.split(",")) if targets != "full" else ())
    # Not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss across exec, which hides
    # the child's own peak. VmHWM is this process's own peak, and clear_refs resets it to the current RSS.
    base = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        tr()
    print(proc_status("VmHWM") - base)


def rss_delta(preset: str, batch: int, seq: int, targets: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--rss-child", targets, "--preset", preset, "--batch", str(batch),
                          "--seq", str(seq)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def profile_steps(trainers: dict[str, Trainer], names: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                trainers[name]()
        print(f"--- profile: {name}, 3 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))






def bench_lora_vs_full(preset: str, tokens: torch.Tensor, repeats: int, rss: bool
                       ) -> tuple[list[list[str]], list[list[str]]]:
    args = ModelArgs.preset(preset)
    configs = {"full": (), "LoRA wq,wv": SEED_TARGETS, "LoRA all 7": ALL_TARGETS}
    trainers = {name: ours(args, tokens, targets) for name, targets in configs.items()}
    res = timed(trainers, repeats)
    peaks = {name: tracked_peak(tr) for name, tr in trainers.items()}
    (fb_full, step_full, _), mem_full = res["full"], peaks["full"]
    times, mems = [], []
    for name, tr in trainers.items():
        (fb, step, _), peak = res[name], peaks[name]
        n_train = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
        times.append([name, f"{n_train:,}", f"{fb * 1e3:.1f}", f"{fb / fb_full:.2f}", f"{step * 1e3:.1f}",
                      f"{step / step_full:.2f}"])
        mrow = [name] + [f"{peak.get(c, 0) / MiB:.1f}" for c in CATEGORIES] + [
            f"**{peak['Total'] / MiB:.1f}**", f"{peak['Total'] / mem_full['Total']:.2f}"]
        if rss:
            mrow.append(f"{rss_delta(preset, *tokens.shape, ','.join(configs[name]) or 'full') / MiB:.1f}")
        mems.append(mrow)
        print(f"  {name:11s} trainable {n_train:>9,}  fwd+bwd {fb * 1e3:7.1f} ms ({fb / fb_full:.2f} of full)  "
              f"step {step * 1e3:7.1f} ms ({step / step_full:.2f})  peak {peak['Total'] / MiB:6.1f} MiB "
              f"({peak['Total'] / mem_full['Total']:.2f})" + (f"  RSS Δ {mrow[-1]} MiB" if rss else ""))
    return times, mems


def bench_vs_peft(args: ModelArgs, tokens: torch.Tensor, repeats: int, profile: bool) -> list[list[str]]:
    base = base_model(args)
    trainers = {impl: ours(args.replace(attn_impl=impl), tokens) for impl in ("math", "sdpa")}
    trainers = {f"ours {k}": v for k, v in trainers.items()}
    for attn in ("eager", "sdpa"):
        trainers[f"PEFT {attn}"] = peft_trainer(base, attn, tokens)  # copies the weights
    res = timed(trainers, repeats)
    peaks = {name: tracked_peak(tr) for name, tr in trainers.items()}
    ref_fb, ref_step, ref_loss = res["PEFT eager"]
    sdpa_step = res["PEFT sdpa"][1]
    rows = []
    for name, (fb, step, loss) in res.items():
        same = abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        target = ""
        if name in PAIRS:  # against PEFT with the same kind of attention kernel
            ratio = step / res[PAIRS[name]][1]
            target = f"{ratio:.2f} of {PAIRS[name]} ≤ 1.0: " + ("met" if ratio <= 1.0 else "NOT met")
        total = peaks[name]["Total"]
        rows.append([name, f"{fb * 1e3:.1f}", f"{step * 1e3:.1f}", f"{fb / ref_fb:.2f}", f"{step / ref_step:.2f}",
                     f"{step / sdpa_step:.2f}", f"{total / MiB:.1f}",
                     f"{loss:.6f}" + ("" if same else " **differs**"), target])
        print(f"  {name:10s} fwd+bwd {fb * 1e3:7.1f} ms  step {step * 1e3:7.1f} ms  / PEFT eager {step / ref_step:.2f}"
              f"  / PEFT sdpa {step / sdpa_step:.2f}  peak {total / MiB:.1f} MiB  first loss {loss:.6f}")
    if profile:
        profile_steps(trainers, ["ours math", "PEFT eager"])
    return rows


class HFLogits(nn.Module):
    """transformers (+ PEFT) behind our calling convention: ``(tokens, start_pos)`` → logits, no cache, no labels."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits


class MixedStep:
    """One ``llama_ref.train.trainer.Trainer`` step (bf16 autocast, AdamW on the trainable parameters) on ``tokens``;
    ``attns`` are the blocks' attention modules, whose forward calls are counted: 1 per step without checkpointing,
    2 with (transformers checkpoints a block's ``forward`` inside its ``__call__``, so hooks on the block itself
    would not see the recomputation; hooks on a module inside it do)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, attns: list[nn.Module]):
        from llama_ref.train.trainer import Trainer as OurTrainer

        self.model, self.tokens, self.calls = model.train(), tokens, [0]
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        self.trainer = OurTrainer(model, self.opt, precision="bf16", device_type="cpu")
        self.window = [{"input_ids": tokens, "labels": tokens}]
        for attn in attns:
            attn.register_forward_pre_hook(lambda *_: self.calls.__setitem__(0, self.calls[0] + 1))

    def __call__(self) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = self.trainer.step(self.window).loss
        dt = time.perf_counter() - t0
        return dt, dt, loss


def ours_mixed(args: ModelArgs, tokens: torch.Tensor, gc: bool) -> MixedStep:
    from llama_ref.train.config import half_frozen_base

    model = base_model(args)
    apply_lora_to_llama(model, RANK, ALPHA, DROPOUT, SEED_TARGETS, merge_weights=False, lora_dtype=torch.float32)
    half_frozen_base(model, torch.bfloat16)
    model.set_gradient_checkpointing("all" if gc else None)
    return MixedStep(model, tokens, [b.attention for b in model.layers])


def peft_mixed(base: Transformer, attn: str, tokens: torch.Tensor, gc: bool) -> MixedStep:
    from peft import LoraConfig, get_peft_model
    from verify.oracle_hf import build_hf_model

    hf = build_hf_model(base, dtype=torch.bfloat16)  # base stored in bf16; RoPE tables kept fp32
    hf.set_attn_implementation(attn)
    if gc:
        # = gradient_checkpointing_enable(gradient_checkpointing_kwargs=…), deprecated in transformers 5; it also
        # calls enable_input_require_grads() (the embedding output requires grad)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["q_proj", "v_proj"],
                     bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(hf, cfg)  # autocast_adapter_dtype=True (default): adapters fp32
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    return MixedStep(HFLogits(model), tokens, [b.self_attn for b in hf.model.layers])


def bench_mixed(args: ModelArgs, tokens: torch.Tensor, repeats: int, profile: bool
                ) -> tuple[list[list[str]], list[list[str]]]:
    base = base_model(args)
    trainers = {"ours math": ours_mixed(args.replace(attn_impl="math"), tokens, True),
                "ours sdpa": ours_mixed(args.replace(attn_impl="sdpa"), tokens, True),
                "PEFT eager": peft_mixed(base, "eager", tokens, True),
                "PEFT sdpa": peft_mixed(base, "sdpa", tokens, True)}
    res = timed(trainers, repeats)
    n_tok = tokens.numel()
    nogc = {"ours math": ours_mixed(args.replace(attn_impl="math"), tokens, False),
            "PEFT eager": peft_mixed(base, "eager", tokens, False)}
    for tr in nogc.values():
        tr(), tr()
    peaks = {name: tracked_peak(tr) for name, tr in trainers.items()}
    peaks_nogc = {name: tracked_peak(tr) for name, tr in nogc.items()}
    calls = {}
    for name, tr in list(trainers.items()) + [(n + " no GC", t) for n, t in nogc.items()]:
        tr.calls[0] = 0
        tr()
        calls[name] = tr.calls[0] / args.n_layers
    ref_loss = res["PEFT eager"][2]
    rows, mems = [], []
    for name, (_, step, loss) in res.items():
        pair = PAIRS.get(name)
        tps = n_tok / step
        peak = peaks[name]["Total"]
        target = ""
        if pair:
            r_t, r_m = res[pair][1] / step, peak / peaks[pair]["Total"]
            target = (f"tokens/s {r_t:.3f} ≥ 1: {'met' if r_t >= 1 else 'NOT met'}; "
                      f"peak {r_m:.3f} ≤ 1: {'met' if r_m <= 1 else 'NOT met'}")
        close = abs(loss - ref_loss) <= 2e-2 * abs(ref_loss)
        rows.append([name, f"{step * 1e3:.1f}", f"{tps:,.0f}", f"{tps * res['PEFT eager'][1] / n_tok:.3f}",
                     f"{tps * res['PEFT sdpa'][1] / n_tok:.3f}", f"{peak / MiB:.2f}",
                     f"{loss:.6f}" + ("" if close else " **differs**"), f"{calls[name]:.0f}", target])
        print(f"  {name:10s} step {step * 1e3:7.1f} ms  {tps:8,.0f} tok/s  peak {peak / MiB:6.1f} MiB  "
              f"first loss {loss:.6f}  attn forwards/block/step {calls[name]:.0f}  {target}")
    for name, peak in list(peaks.items()) + [(n + " no GC", p) for n, p in peaks_nogc.items()]:
        mems.append([name] + [f"{peak.get(c, 0) / MiB:.1f}" for c in CATEGORIES] + [f"**{peak['Total'] / MiB:.2f}**"]
                    + [f"{calls[name]:.0f}"])
        print(f"  {name:17s} " + "  ".join(f"{c} {peak.get(c, 0) / MiB:.1f}" for c in CATEGORIES)
              + f"  peak {peak['Total'] / MiB:.1f} MiB")
    if profile:
        profile_steps(trainers, ["ours math", "PEFT eager"])
    return rows, mems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="preset 'tiny', batch 2 x 32: a smoke run in seconds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared machine)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per contender (the median is reported)")
    p.add_argument("--out", help="write the markdown tables here (default: print only)")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of ours (math) and PEFT (eager)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS cross-check subprocesses")
    p.add_argument("--preset", help="model preset (default 'bench'; 'tiny' with --quick)")
    p.add_argument("--batch", type=int, help="sequences per step (default 4; 2 with --quick)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 128; 32 with --quick)")
    p.add_argument("--sections", default="abc", help="which sections to run (default abc)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: one peak-RSS measurement
    opts = p.parse_args()
    preset, batch, seq = ("tiny", 2, 32) if opts.quick else ("bench", 4, 128)
    preset, batch, seq = opts.preset or preset, opts.batch or batch, opts.seq or seq
    args = ModelArgs.preset(preset)
    if opts.rss_child:
        return rss_child(args, batch, seq, opts.rss_child)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(SEED)
    import peft
    import transformers

    tokens = torch.randint(args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(SEED))
    env = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
           f"{torch.get_num_threads()} thread(s), CPU: {cpu_model()} ({os.cpu_count()} cores visible), "
           f"Python {platform.python_version()}, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
           f"load average {os.getloadavg()[0]:.2f} at start")
    print(env)
    t_start, secs = time.perf_counter(), opts.sections
    if "a" in secs:
        print(f"a. LoRA vs full, preset {preset!r}, batch {batch} x {seq}")
        times, mems = bench_lora_vs_full(preset, tokens, opts.repeats, not opts.no_rss)
    if "b" in secs:
        print("b. ours vs PEFT, LoRA wq,wv / q_proj,v_proj")
        peft_rows = bench_vs_peft(args, tokens, opts.repeats, opts.profile)
    if "c" in secs:
        print("c. ours vs PEFT, LoRA + gradient checkpointing + bf16 autocast, AdamW")
        mixed_rows, mixed_mems = bench_mixed(args, tokens, opts.repeats, opts.profile)
    print(f"run time {time.perf_counter() - t_start:.0f} s")
    print(f"load average {os.getloadavg()[0]:.2f} at end")

    mem_header = (["model"] + [f"{c} MiB" for c in CATEGORIES] + ["peak MiB", "/ full"]
                  + ([] if opts.no_rss else ["peak RSS Δ MiB"]))
    parts = [
        f"{env}, {os.getloadavg()[0]:.2f} at end\n\nAll figures: fp32, preset {preset!r}, batch {batch} x {seq} "
        f"random tokens, LoRA r={RANK} alpha={ALPHA} dropout={DROPOUT}, SGD lr={LR}; times are the median of "
        f"{opts.repeats} steps after 2 warm-up steps, contenders interleaved. Section c: bf16 autocast, frozen base "
        f"stored in bf16, fp32 adapters, AdamW lr={LR}, gradient checkpointing on every block.",
        "### a. LoRA vs full fine-tuning: step time\n\n" + markdown(
            ["model", "trainable params", "fwd+bwd ms", "/ full", "step ms (incl. SGD + zero_grad)", "/ full"],
            times) if "a" in secs else "",
        "### a. LoRA vs full fine-tuning: peak memory (MemTracker, one step)\n\n" + markdown(mem_header, mems)
        if "a" in secs else "",
        "### b. Ours vs PEFT (LoRA on wq,wv = q_proj,v_proj)\n\n" + markdown(
            ["implementation", "fwd+bwd ms", "step ms", "fwd+bwd / PEFT eager", "step / PEFT eager",
             "step / PEFT sdpa", "peak MiB", "loss of step 1", "target"], peft_rows)
        if "b" in secs else "",
        "### c. Ours vs PEFT: LoRA wq,wv + gradient checkpointing (all blocks) + bf16 autocast, AdamW\n\n" + markdown(
            ["implementation", "step ms", "tokens/s", "tokens/s / PEFT eager", "tokens/s / PEFT sdpa", "peak MiB",
             "loss of step 1", "attention forwards / block / step", "target (vs PEFT, same attention kind)"], mixed_rows)
        + "\n\n#### c. peak memory by category (MemTracker, one step)\n\n" + markdown(
            ["model"] + [f"{c} MiB" for c in CATEGORIES] + ["peak MiB", "attention forwards / block / step"], mixed_mems)
        if "c" in secs else "",
    ]
    text = "\n\n".join(x for x in parts if x) + "\n"
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text)
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
