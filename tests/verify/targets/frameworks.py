"""The frameworks' own models as the tests build them (tiny Llama-3 shapes, seeded), and the table
docs/frameworks.md records: ``python -m tests.verify.targets.frameworks torchtune`` (or ``litgpt``) runs the five
checks on that framework's model and prints one Markdown row per property. The tox env of each framework runs it
after its tests (``tox -e torchtune``, ``tox -e litgpt``)."""
from __future__ import annotations

import sys
import time

import torch

TORCHTUNE_SIZES = dict(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128)
LITGPT_LLAMA = dict(name="tiny-llama", block_size=128, vocab_size=256, padded_vocab_size=256, n_layer=2, n_head=4,
                    n_embd=64, n_query_groups=2, rotary_percentage=1.0, parallel_residual=False, bias=False,
                    norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128)


def torchtune_model(lora: bool = False) -> torch.nn.Module:
    """torchtune's llama3 / lora_llama3 builders (LoRA on q_proj and v_proj, only the adapters trainable)."""
    from torchtune.models.llama3._component_builders import llama3, lora_llama3
    from torchtune.modules.peft import get_adapter_params, set_trainable_params
    torch.manual_seed(0)
    if not lora:
        return llama3(intermediate_dim=128, **TORCHTUNE_SIZES)
    model = lora_llama3(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, intermediate_dim=128, **TORCHTUNE_SIZES)
    set_trainable_params(model, get_adapter_params(model))
    return model


def litgpt_model(lora: bool = False) -> torch.nn.Module:
    """litgpt's GPT with a Llama configuration; with LoRA, litgpt.lora's GPT (its fused QKV adapter on the query
    and value parts, its plain one on the attention's output projection), only the adapters trainable."""
    import litgpt
    import litgpt.lora
    torch.manual_seed(0)
    if not lora:
        return litgpt.GPT(litgpt.Config(**LITGPT_LLAMA))
    model = litgpt.lora.GPT(litgpt.lora.Config(**LITGPT_LLAMA, lora_r=4, lora_alpha=8, lora_query=True,
                                               lora_value=True, lora_projection=True))
    litgpt.lora.mark_only_lora_as_trainable(model)
    return model


BUILDERS = {"torchtune": torchtune_model, "litgpt": litgpt_model}
# Each framework's own accumulation loop as a training step (tests/verify/targets/train_steps.py, written anew).
OWN_LOOPS = {"torchtune": None, "litgpt": None}  # filled below: train_steps imports nothing of the frameworks


def first_labels_ignored(target):
    """The target's own packer, then each document's first label set to -100 (what a user fixing torchtune's packed
    labels would do: its PackedDataset keeps them, and its recipes' shift trains them from the document before)."""
    from verify.checks.packing import spans

    def pack(docs, row_len, n_micro):
        window = target.pack(docs, row_len, n_micro)
        for batch in window:
            for r, s, _ in spans(batch):
                batch["labels"][r, s] = -100
        return window
    return pack


def _packed_with_first_labels_ignored(target):
    from verify.checks.packing import check_packing
    fixed = first_labels_ignored(target) if target.not_applicable("packing") is None else None
    return check_packing(target, packer=fixed)  # without a packed path: N/A, saying why


def rows(framework: str) -> list[str]:
    """One Markdown row per property: verdict, worst error, margin, what ran, seconds."""
    from verify.checks.grad_accum import check_grad_accumulation
    from verify.checks.gradient_checkpointing import check_gradient_checkpointing
    from verify.checks.kv_cache import check_kv_cache
    from verify.checks.lora_merge import check_lora_merge
    from verify.checks.mixed_precision import check_mixed_precision
    from verify.checks.packing import check_packing
    from verify.targets.spec import as_target

    from . import train_steps as TS
    OWN_LOOPS.update(torchtune=TS.torchtune_recipe_step, litgpt=TS.litgpt_fit_step)
    make = BUILDERS[framework]
    runs = [("kv_cache", lambda: check_kv_cache(as_target(make()))),
            ("grad_accum", lambda: check_grad_accumulation(as_target(make()), train_step=TS.through(TS.token_mean_step),
                                                           lora=(False,))),
            (f"grad_accum, {framework}'s own loop", lambda: check_grad_accumulation(  # litgpt's loop clips nothing
                as_target(make()), train_step=OWN_LOOPS[framework], lora=(False,),
                clip=None if framework == "litgpt" else "auto")),
            ("lora_merge", lambda: check_lora_merge(as_target(make(lora=True)))),
            ("mixed_precision", lambda: check_mixed_precision(as_target(make(lora=True)),
                                                              train_step=TS.through(TS.bf16_step), full=False)),
            ("gradient_checkpointing", lambda: check_gradient_checkpointing(as_target(make(lora=True)))),
            ("packing", lambda: check_packing(as_target(make()))),
            ("packing, first labels ignored", lambda: _packed_with_first_labels_ignored(as_target(make())))]
    out = []
    for name, run in runs:
        t0 = time.perf_counter()
        r = run()
        what = r.not_applicable if r.verdict == "N/A" else r.case
        margin = "—" if r.margin is None or r.verdict == "N/A" else f"{r.margin:.2f}"
        max_abs = "—" if r.verdict == "N/A" else f"{r.max_abs:.2e}"
        notes = [d[len("note: "):] for d in r.details if d.startswith("note: ")]
        if r.verdict == "PASS" and notes:  # what the check could not ask, said beside the verdict
            what += " (" + "; ".join(notes) + ")"
        if r.verdict == "FAIL":  # the gradients' line, and its hint
            line = next((d for d in r.details if " grads: " in d), r.details[0])
            what += " — " + (line.split(":", 1)[0] + ": they" + line.split("; they", 1)[1] if "; they" in line
                             else line)
        label = f"`{name}`" if "," not in name else f"`{name.split(',')[0]}`,{name.split(',', 1)[1]}"
        out.append(f"| {framework} | {label} | {r.verdict} | {max_abs} | {margin} | {what} | "
                   f"{time.perf_counter() - t0:.1f} |")
    return out


if __name__ == "__main__":
    import torch as _torch
    print(f"{sys.argv[1]} on torch {_torch.__version__}")
    print("\n".join(rows(sys.argv[1])))
