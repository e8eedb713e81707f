"""The worked example of docs/verify-your-model.md ("Write your own target"), kept equal to it by a test: a target
for a model of neither Meta's shape nor the input_pos family's (tests/verify/targets/past_style.py)."""
# --- the example: from here to the end, as the doc shows it ---
import contextlib
import copy

import torch

from verify.oracles import policy_layers
from verify.targets.base import Target
from verify.targets.decode import greedy_generate
from verify.targets.lora import LoralibTarget
from verify.targets.protocols import Limits


class PastTarget(Target):
    description = "PastModel: forward(tokens, past) -> (logits, past)"

    def __init__(self, model):
        self.model, self.past = model, None

    limits = Limits(vocab_size=256, max_batch_size=4, max_seq_len=64, dtype=torch.float32, device=torch.device("cpu"))

    @contextlib.contextmanager
    def kv_session(self):  # property 1: eval mode, an empty cache; the model as it was afterwards
        was_training, self.past = self.model.training, None
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def logits(self, tokens, start_pos, *, kv_caching):
        with torch.no_grad():
            if not kv_caching:
                return self.model(tokens)[0]
            out, self.past = self.model(tokens, self.past if start_pos else None)
            return out

    def generate(self, prompts, max_gen_len, *, kv_caching):
        return greedy_generate(self.logits, prompts, max_gen_len, 64, torch.device("cpu"), kv_caching=kv_caching)

    def lora_target(self, **_):  # property 3: a copy with its (loralib-shaped) adapters
        return LoralibTarget(copy.deepcopy(self.model), self.train_logits, description=self.description)

    def fresh_model(self):  # properties 2, 4, 5: fresh copies and their plain forward
        return copy.deepcopy(self.model)

    def fresh_lora_model(self, *_):
        return copy.deepcopy(self.model)  # it comes with its adapters, its base frozen

    def train_logits(self, model, tokens):
        return model(tokens)[0]

    def blocks(self, model):  # property 4: the blocks, and the switch that checkpoints them
        return list(model.blocks)

    def set_checkpointing(self, model, policy, mode=None):
        model.checkpointed = policy_layers(policy, len(model.blocks)) if policy else frozenset()

    def checkpointed_blocks(self, model):
        return model.checkpointed
