"""Text generation with Meta's algorithm (right-padded ragged prompts, prefill to the shortest prompt, stop tokens,
log-probabilities), with the KV cache switchable per call."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, TypedDict

import torch
import torch.nn.functional as F

from .model import Transformer
from .tokenizer import Tokenizer


# The four prompts of Meta's example_text_completion.py, used by the seed report before and after fine-tuning.
SEED_PROMPTS: tuple[str, ...] = (
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    "A brief message congratulating the team on the launch:\n\n        Hi everyone,\n\n        I just ",
    "Translate English to French:\n\n        sea otter => loutre de mer\n        peppermint => menthe poivrée\n"
    "        plush girafe => girafe peluche\n        cheese =>",
)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]
    logprobs: list[float]


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability mass reaches ``p``.

    ``probs`` (B, V) → token ids (B, 1).
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill(probs_sum - probs_sort > p, 0.0)  # keep the token that crosses p
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


@contextmanager
def kv_caching_set(model: Transformer, on: bool) -> Iterator[Transformer]:
    """Switch the model's KV cache for the duration of a block, then restore the previous setting."""
    before = model.kv_caching
    model.kv_caching = on
    try:
        yield model
    finally:
        model.kv_caching = before


class Llama:
    """A model and its tokenizer, as in Meta's reference ``generation.py``."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        if tokenizer.n_words != model.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} tokens but the model's vocab_size is "
                             f"{model.vocab_size}")
        self.model = model
        self.tokenizer = tokenizer

    @staticmethod
    def build(ckpt_dir: str | Path, tokenizer_path: str | Path, max_seq_len: int, max_batch_size: int,
              device: Optional[str | torch.device] = None, dtype: Optional[torch.dtype] = None) -> "Llama":
        """Load a Meta checkpoint directory (``params.json`` + ``consolidated.*.pth``) and its ``tokenizer.model``."""
        from .formats.meta import load_model

        tokenizer = Tokenizer(tokenizer_path)
        model = load_model(ckpt_dir, device=device, dtype=dtype, tokenizer=tokenizer, max_seq_len=max_seq_len,
                           max_batch_size=max_batch_size)
        return Llama(model.eval(), tokenizer)

    @staticmethod
    def build_default(seed: Optional[int] = None, device: Optional[str | torch.device] = None,
                      dtype: Optional[torch.dtype] = None, **overrides) -> "Llama":
        """The embedded default: the ``tiny`` preset with seeded weights and the bundled SentencePiece model."""
        from .default import DEFAULT_SEED, default_model, default_tokenizer

        model = default_model(DEFAULT_SEED if seed is None else seed, **overrides)
        return Llama(model.to(device=device, dtype=dtype).eval(), default_tokenizer())

    def _validate(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float,
                  top_p: float) -> None:
        params = self.model.params
        if len(prompt_tokens) == 0:
            raise ValueError("no prompts given")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}")
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} is empty (encode with bos=True to start from the BOS token)")
            if len(t) > params.max_seq_len:
                raise ValueError(f"prompt {i} has {len(t)} tokens, more than max_seq_len={params.max_seq_len}")
            bad = [tok for tok in t if not 0 <= int(tok) < self.model.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} holds token id(s) {bad[:5]} outside [0, {self.model.vocab_size})")
        if not max_gen_len >= 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")

    def step_logits(self, tokens: torch.Tensor, prev_pos: int, cur_pos: int, kv_caching: bool) -> torch.Tensor:
        """Logits (B, cur_pos - prev_pos, V) predicting positions ``prev_pos+1 … cur_pos``.

        Cached: only the new tokens go in, at ``start_pos=prev_pos``. Uncached: ``tokens[:, :cur_pos]`` from 0.
        """
        if kv_caching:
            return self.model(tokens[:, prev_pos:cur_pos], prev_pos)
        return self.model(tokens[:, :cur_pos], 0)[:, prev_pos:]

    @torch.no_grad()
    def generate(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, kv_caching: bool = True,
                 generator: Optional[torch.Generator] = None,
                 ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Extend each prompt by up to ``max_gen_len`` tokens, stopping a row at its first stop token.

        Cached: prefill up to the shortest prompt, then one new token per step at ``start_pos=cur_pos-1``.
        Uncached: every step recomputes ``tokens[:, :cur_pos]`` from position 0. Rows whose prompt is longer
        than ``cur_pos`` are teacher-forced with their own prompt. ``temperature=0`` is greedy.
        Returns (tokens, logprobs) per row, without the prompt unless ``echo``; logprobs is None unless asked.
        """
        self._validate(prompt_tokens, max_gen_len, temperature, top_p)
        params = self.model.params
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)
        device = self.model.output.weight.device

        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, :len(t)] = torch.tensor(list(t), dtype=torch.long, device=device)
        # From the prompt lengths, not from `tokens != pad_id`: a real token may share the pad id.
        input_text_mask = torch.arange(total_len, device=device)[None, :] < torch.tensor(prompt_lens, device=device)[:, None]
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=device)
        stop_tokens = torch.tensor(sorted(self.tokenizer.stop_tokens), device=device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)

        with kv_caching_set(self.model, kv_caching):
            if min_prompt_len == total_len:  # nothing to generate: score the prompts
                logits = self.model(tokens, 0)
                token_logprobs[:, 1:] = -F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:],
                                                         reduction="none")
            prev_pos = 0
            for cur_pos in range(min_prompt_len, total_len):
                logits = self.step_logits(tokens, prev_pos, cur_pos, kv_caching)
                if temperature > 0:
                    probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                    next_token = sample_top_p(probs, top_p, generator)
                else:
                    next_token = torch.argmax(logits[:, -1], dim=-1)
                next_token = next_token.reshape(-1)
                next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                if logprobs:
                    token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                        logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none")
                eos_reached |= ~input_text_mask[:, cur_pos] & torch.isin(next_token, stop_tokens)
                prev_pos = cur_pos
                if bool(eos_reached.all()):
                    break

        out_tokens, out_logprobs = [], []
        all_logprobs = token_logprobs.tolist()
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else prompt_lens[i]
            end = prompt_lens[i] + max_gen_len  # after an early stop, every row holds a stop token before cur_pos
            toks = toks[start:end]
            probs = all_logprobs[i][start:end]
            # Cut at the first stop token the model produced (a stop token inside an echoed prompt is kept).
            for j in range(max(0, prompt_lens[i] - start), len(toks)):
                if toks[j] in self.tokenizer.stop_tokens:
                    toks, probs = toks[:j], probs[:j]
                    break
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(self, prompts: Sequence[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                        kv_caching: bool = True, generator: Optional[torch.Generator] = None,
                        ) -> list[CompletionPrediction]:
        """Complete each prompt (encoded with BOS); ``max_gen_len`` defaults to ``max_seq_len - 1``."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        gen_tokens, gen_logprobs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo,
                                                 kv_caching, generator)
        out: list[CompletionPrediction] = []
        for i, toks in enumerate(gen_tokens):
            pred: CompletionPrediction = {"generation": self.tokenizer.decode(toks)}
            if logprobs:
                pred["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                pred["logprobs"] = gen_logprobs[i]
            out.append(pred)
        return out
