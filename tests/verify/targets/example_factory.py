"""llama-verify --target example_factory.py:make — a Meta-style model wrapped for the checks, with no change to
its code (the worked example of docs/verify-your-model.md, which shows this file)."""
import types

import seed_style as model_py  # your fork of Meta's model.py, beside this file
from verify.targets.meta_style import MetaStyleTarget


def kv_switch(model, on):  # how your code turns its KV cache on and off
    for layer in model.layers:
        layer.attention.kv_caching = on


def gc_switch(model, blocks):  # how your code checkpoints exactly these blocks (a set of indices)
    model.checkpoint_blocks = blocks


def make():
    model = model_py.make_lora()  # your weights and your LoRA adapters, the same every call
    # Meta's forward runs under @torch.inference_mode(); to train, your fork calls the function it decorates.
    model.forward = types.MethodType(model_py.Transformer.forward.__wrapped__, model)
    return MetaStyleTarget(model, kv_switch=kv_switch, gc_switch=gc_switch)
