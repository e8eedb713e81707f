"""Generation speed on CPU (fp32, greedy, batch 1): three figures, each a ratio taken within one run.

a. KV cache: ``Llama.generate(kv_caching=True)`` vs ``(False)`` tokens/s on the "bench" preset (target: ≥ 5× at 256).
b. Against transformers: our cached ``generate`` vs ``LlamaForCausalLM.generate`` (DynamicCache) on identical weights
   (``verify.oracle_hf.build_hf_model``), "tiny" (target: ≥ 1.5×) and "bench"; attention "math"/"sdpa" for ours,
   "eager"/"sdpa" for transformers; the generated tokens must be identical.
c. Roofline: cached decode tokens/s on a model far bigger than the CPU caches, as a fraction of the most a
   bandwidth-bound decoder can do here (target: ≥ 0.8). Bytes per token = every Linear weight (7 per layer + the
   output matrix) + the RMSNorm weights + one embedding row; bandwidth = those Linear weights × n / the median
   time of n passes of ``x @ W.T`` (x of batch 1) over the very same matrices in decode order.

tokens/s = new tokens / wall time of the whole call (prompt of 8 random tokens; prefill included: n new tokens
take n forward calls either way). Each figure is the median of ``--repeats`` timed runs after one warm-up;
the runs of the contenders in a comparison are interleaved, so that the load of a shared machine hits them alike.
The tokenizer is a stub without stop tokens, so every generation runs to its full length. One torch thread by
default (``--threads``); the roofline bandwidth is measured with the same setting.

    python scripts/bench_generate.py [--quick] [--threads N] [--out docs/bench_generate.md] [--profile]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from bench_common import cpu_model, markdown

from llama_ref.args import ModelArgs
from llama_ref.generation import Llama
from llama_ref.model import Transformer, init_weights

PROMPT_LEN = 8
SEED = 0
ROOFLINE_ARGS = dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                     max_batch_size=1)  # ~159M parameters, ~500 MB of weights read per token in fp32
QUICK_ROOFLINE_ARGS = dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8000, multiple_of=256,
                           max_batch_size=1)


class NoStopTokenizer:
    """All that ``Llama.generate`` needs from a tokenizer; no stop tokens, so generations run their full length."""

    def __init__(self, n_words: int):
        self.n_words = n_words
        self.stop_tokens: frozenset[int] = frozenset()


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """name → (median seconds, last result) of ``repeats`` calls of each function after one warm-up each.

    The calls are interleaved (A B A B …), so that a change of load on a shared machine hits every contender.
    """
    out = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), out[name]) for name in fns}


def make_llama(args: ModelArgs) -> Llama:
    return Llama(init_weights(Transformer(args), SEED).eval(), NoStopTokenizer(args.vocab_size))


def random_prompt(vocab_size: int) -> list[int]:
    return torch.randint(vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(SEED)).tolist()


def ours(llm: Llama, prompt: list[int], n: int, kv_caching: bool = True) -> Callable[[], list[int]]:
    """A call of greedy ``Llama.generate`` that returns the ``n`` generated tokens."""
    def run() -> list[int]:
        toks = llm.generate([prompt], n, temperature=0.0, kv_caching=kv_caching)[0][0]
        assert len(toks) == n, f"generated {len(toks)} tokens, expected {n}"
        return toks
    return run


def theirs(hf, prompt: list[int], n: int) -> Callable[[], list[int]]:
    """A call of greedy transformers ``generate`` (default DynamicCache) that returns the ``n`` generated tokens."""
    ids = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
              eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)

    def run() -> list[int]:
        toks = hf.generate(ids, **kw)[0, len(prompt):].tolist()
        assert len(toks) == n, f"transformers generated {len(toks)} tokens, expected {n}"
        return toks
    return run


def rates(fns: dict[str, Callable[[], list[int]]], n: int, repeats: int) -> dict[str, tuple[float, list[int]]]:
    """name → (tokens/s, generated tokens)."""
    return {name: (n / t, toks) for name, (t, toks) in timed(fns, repeats).items()}


def bench_cache(lengths: list[int], repeats: int) -> list[list[str]]:
    llm = make_llama(ModelArgs.preset("bench"))
    prompt = random_prompt(llm.model.vocab_size)
    rows = []
    for n in lengths:
        res = rates({"cached": ours(llm, prompt, n, True), "uncached": ours(llm, prompt, n, False)}, n, repeats)
        (cached, a), (uncached, b) = res["cached"], res["uncached"]
        target = "≥ 5×: " + ("met" if cached / uncached >= 5 else "NOT met") if n == 256 else ""
        rows.append([str(n), f"{cached:.0f}", f"{uncached:.0f}", f"{cached / uncached:.1f}×",
                     "yes" if a == b else "**no**", target])
        print(f"  {n:4d} new tokens: cached {cached:8.1f} tok/s, uncached {uncached:8.1f} tok/s, "
              f"ratio {cached / uncached:5.1f}x, same tokens: {a == b}")
    return rows


def bench_transformers(presets: list[str], n: int, repeats: int) -> list[list[str]]:
    from verify.oracle_hf import build_hf_model

    rows = []
    for preset in presets:
        args = ModelArgs.preset(preset)
        prompt = random_prompt(args.vocab_size)
        fns = {f"ours {impl}": ours(make_llama(args.replace(attn_impl=impl)), prompt, n) for impl in ("math", "sdpa")}
        for impl in ("eager", "sdpa"):
            hf = build_hf_model(make_llama(args).model)  # same seed: the same weights as ours
            hf.set_attn_implementation(impl)
            fns[f"transformers {impl}"] = theirs(hf, prompt, n)
        res = rates(fns, n, repeats)
        ref_tps, sdpa_tps = res["transformers eager"][0], res["transformers sdpa"][0]
        for name, (tps, toks) in res.items():
            same = toks == res["ours math"][1]
            if not same:
                print(f"  WARNING: {preset}: {name} generated different tokens from ours (math)")
            target = ""
            if preset == "tiny" and name.startswith("ours"):
                target = "≥ 1.5×: " + ("met" if tps / ref_tps >= 1.5 else "NOT met")
            rows.append([preset, name, f"{tps:.0f}", f"{tps / ref_tps:.2f}×", f"{tps / sdpa_tps:.2f}×",
                         "yes" if same else "**no**", target])
            print(f"  {preset:5s} {name:19s} {tps:8.1f} tok/s, {tps / ref_tps:5.2f}x transformers eager, "
                  f"same tokens: {same}")
    return rows


def bench_roofline(kw: dict, n: int, repeats: int, profile: bool) -> list[list[str]]:
    args = ModelArgs(**kw, max_seq_len=PROMPT_LEN + n)
    llm = make_llama(args)
    model = llm.model
    mats = [w.detach() for layer in model.layers for w in (
        layer.attention.wq.weight, layer.attention.wk.weight, layer.attention.wv.weight, layer.attention.wo.weight,
        layer.feed_forward.w1.weight, layer.feed_forward.w3.weight, layer.feed_forward.w2.weight)]
    mats.append(model.output.weight.detach())
    linear_bytes = sum(w.numel() * w.element_size() for w in mats)
    norm_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "norm" in name)
    emb_row_bytes = args.dim * model.tok_embeddings.weight.element_size()
    bytes_per_token = linear_bytes + norm_bytes + emb_row_bytes
    cache_elem = model.layers[0].attention.kv_cache.cache_k.element_size()
    # the mean over the run
    kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * cache_elem * (PROMPT_LEN + n / 2)
    xs = [torch.randn(1, w.shape[1]) for w in mats]

    def mv_chains() -> None:  # the weight reads of n decode steps, nothing else
        for _ in range(n):
            for x, w in zip(xs, mats):
                x @ w.T

    res = timed({"x @ W.T": mv_chains, "generate": ours(llm, random_prompt(args.vocab_size), n)}, repeats)
    bandwidth = linear_bytes * n / res["x @ W.T"][0]
    max_tps = bandwidth / bytes_per_token
    tps = n / res["generate"][0]
    frac = tps / max_tps
    overhead_ms = 1e3 / tps - 1e3 / max_tps
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  model: {n_params / 1e6:.0f}M parameters; read per token: {bytes_per_token / 1e6:.1f} MB "
          f"(Linear {linear_bytes / 1e6:.1f} + norms {norm_bytes / 1e3:.0f} kB + 1 embedding row "
          f"{emb_row_bytes} B); KV cache ≈ {kv_bytes / 1e6:.1f} MB/token on average (not counted)")
    print(f"  x @ W.T: {bandwidth / 1e9:.1f} GB/s → roofline {max_tps:.1f} tok/s")
    print(f"  cached decode: {tps:.1f} tok/s = {frac:.2f} of the roofline; non-matmul time {overhead_ms:.2f} ms/token")
    if profile:
        profile_decode(llm, args, n)
    return [[f"{n_params / 1e6:.0f}M (dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size})",
             f"{bytes_per_token / 1e6:.1f} MB", f"{bandwidth / 1e9:.1f} GB/s", f"{max_tps:.1f}", f"{tps:.1f}",
             f"{frac:.2f}", f"{overhead_ms:.2f} ms", "≥ 0.8: " + ("met" if frac >= 0.8 else "NOT met")]]


def profile_decode(llm: Llama, args: ModelArgs, n: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([random_prompt(args.vocab_size)], n, temperature=0.0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))






def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared machine, a thread that other work preempts "
                        "stalls every parallel op, and small decode ops take 10x longer)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.add_argument("--out", help="write the markdown tables here (default: print only)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the roofline model's decode")
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(SEED)
    import transformers

    env = (f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} "
           f"thread(s), CPU: {cpu_model()} ({os.cpu_count()} cores visible), "
           f"Python {platform.python_version()}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(env)
    lengths, n_hf, n_roof = ([16, 32], 16, 16) if opts.quick else ([64, 256, 512], 128, 128)

    print("a. KV cache, preset 'bench'")
    a = bench_cache(lengths, opts.repeats)
    print(f"b. ours vs transformers, {n_hf} new tokens")
    b = bench_transformers(["tiny"] if opts.quick else ["tiny", "bench"], n_hf, opts.repeats)
    print(f"c. roofline, {n_roof} new tokens")
    c = bench_roofline(QUICK_ROOFLINE_ARGS if opts.quick else ROOFLINE_ARGS, n_roof, opts.repeats, opts.profile)

    text = "\n\n".join([
        f"{env}\n\nAll figures: fp32, greedy, batch 1, prompt of {PROMPT_LEN} random tokens, "
        f"median of {opts.repeats} runs after a warm-up; tokens/s = new tokens / wall time of the generate call.",
        "### a. KV cache (preset \"bench\")\n\n" + markdown(
            ["new tokens", "cached tok/s", "uncached tok/s", "cached / uncached", "same tokens", "target"], a),
        f"### b. Ours vs transformers ({n_hf} new tokens)\n\n" + markdown(
            ["preset", "implementation", "tok/s", "/ transformers eager", "/ transformers sdpa",
             "same tokens as ours (math)", "target"], b),
        f"### c. Cached decode vs roofline ({n_roof} new tokens)\n\n" + markdown(
            ["model", "bytes / token", "x @ W.T bandwidth (median)", "roofline tok/s", "measured tok/s",
             "fraction", "non-matmul time / token", "target"], c),
    ]) + "\n"
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text)
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
