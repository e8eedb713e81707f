# Over 350 lines: Meta's model.py made trainable — its parts, the forward with its cache, packing and loss paths.
"""The Llama 2 / 3.x transformer, after Meta's reference ``model.py``, made trainable and device-agnostic.

Notation used for tensor shapes: B batch, T new tokens, S keys (cached + new), D dim, H query heads,
Hkv key/value heads, Dh head_dim, V vocab.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

from .args import ModelArgs
from .flex import attention_flex, causal_block_mask, document_block_mask
from .kv_cache import KVCache
from .loss import IGNORE_INDEX, LossKernel, chunked_cross_entropy, token_loss_sum

# Llama 3.1 frequency-scaling constants (Meta's ``apply_scaling``); the factor itself is ModelArgs.rope_scale_factor.
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: half inputs go up to fp32, fp64 (the reference precision of calibrated checks) stays."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reduction runs in fp32 whatever the input dtype, then casts back (Meta's upcast).
        return self._norm(upcast(x)).type_as(x) * self.weight


def apply_scaling(freqs: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Llama 3.1 RoPE scaling: long wavelengths divided by ``scale_factor``, short ones kept, a smooth blend between."""
    low_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR
    wavelen = 2 * math.pi / freqs
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False,
                         scale_factor: float = 8.0, device: Optional[torch.device] = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``exp(i·t·θ_k)`` for positions ``t < end`` and ``θ_k = theta^(-2k/dim)``: shape (end, dim // 2),
    complex64 computed in fp32 as Meta does (``dtype=torch.float64`` gives complex128, for fp64 references)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].to(dtype) / dim))
    if use_scaled:
        freqs = apply_scaling(freqs, scale_factor)
    t = torch.arange(end, device=device, dtype=dtype)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate interleaved pairs ``(x[2k], x[2k+1])`` by ``freqs_cis`` (T, Dh/2), or (B, T, Dh/2) with a position per
    token (packed rows); xq (B, T, H, Dh), xk (B, T, Hkv, Dh)."""
    xq_ = torch.view_as_complex(upcast(xq).reshape(*xq.shape[:-1], -1, 2))  # (B, T, H, Dh/2)
    xk_ = torch.view_as_complex(upcast(xk).reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[:, :, None, :] if freqs_cis.dim() == 3 else freqs_cis[None, :, None, :]  # (B|1, T, 1, Dh/2)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, S, Hkv, Dh) → (B, S, Hkv·n_rep, Dh); equal to ``torch.repeat_interleave(x, dim=2, repeats=n_rep)``."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep,
                                                                                       head_dim)


def causal_mask(q_len: int, kv_len: int, device: torch.device, dtype: torch.dtype = torch.float32
                ) -> Optional[torch.Tensor]:
    """Additive (q_len, kv_len) mask, aligned bottom-right: query i (at position kv_len - q_len + i) sees keys ≤ it.

    ``None`` for a single query, which sees every key. Top-left alignment (SDPA's ``is_causal=True`` when
    q_len != kv_len) is wrong here: it hides the new tokens from each other's past.
    """
    if q_len == 1:
        return None
    mask = torch.full((q_len, kv_len), float("-inf"), device=device, dtype=dtype)
    return torch.triu(mask, diagonal=kv_len - q_len + 1)


def document_mask(document_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, T, T) mask of packed rows: query i sees key j ≤ i of its own document only
    (``document_ids`` (B, T): the document of each token; a row's padding is a document of its own)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~(same & causal), float("-inf"))
    return mask[:, None]


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh + mask)·v with the softmax in fp32; q (B, H, T, Dh), k and v (B, H, S, Dh)."""
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores + mask
    scores = F.softmax(upcast(scores), dim=-1).type_as(q)
    return torch.matmul(scores, v)  # (B, H, T, Dh)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The fused kernel with the same (bottom-right) mask as :func:`attention_math`."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))


ATTENTION_IMPLS = {"math": attention_math, "sdpa": attention_sdpa, "flex": attention_flex}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.head_dim
        self.attn_impl = args.attn_impl
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # The cache is on exactly when this holds one (the model's ``kv_caching`` switch puts it in or takes it out).
        self.register_module("kv_cache", None)  # Optional[KVCache]

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)

        if self.kv_cache is not None:
            keys, values = self.kv_cache.update(xk, xv, start_pos)
        else:
            keys, values = xk, xv

        keys = repeat_kv(keys, self.n_rep)  # (B, S, H, Dh)
        values = repeat_kv(values, self.n_rep)
        out = ATTENTION_IMPLS[self.attn_impl](xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask)
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)  # (B, T, D)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def checkpoint_policy_layers(policy: Optional[str], n_layers: int) -> frozenset[int]:
    """Which blocks a gradient-checkpointing policy recomputes: ``None``/``"none"``, ``"all"``, ``"seed"`` (block i
    when ``i % 3 != 0``, as the seed report did) or ``"every:K"`` (block i when ``i % K == 0``)."""
    if policy is None or policy == "none":
        return frozenset()
    if policy == "all":
        return frozenset(range(n_layers))
    if policy == "seed":
        return frozenset(i for i in range(n_layers) if i % 3 != 0)
    if policy.startswith("every:") and policy[6:].isascii() and policy[6:].isdigit() and int(policy[6:]) > 0:
        k = int(policy[6:])
        return frozenset(i for i in range(n_layers) if i % k == 0)
    raise ValueError(f"unknown gradient-checkpointing policy {policy!r}; use none, all, seed or every:K (K >= 1)")


BlockRunner = Callable[["TransformerBlock", torch.Tensor, int, torch.Tensor, Optional[torch.Tensor], bool],
                      torch.Tensor]  # (layer, h, start_pos, freqs_cis, mask, checkpointed) -> h


def run_block(layer: TransformerBlock, h: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
              mask: Optional[torch.Tensor], checkpointed: bool) -> torch.Tensor:
    """One block, its activations recomputed in backward when ``checkpointed``.

    Non-reentrant ``torch.utils.checkpoint``: the reentrant variant gives no gradient to parameters inside the
    block when no *input* requires grad (a frozen base under LoRA); the RNG state is saved and restored so that
    dropout draws the same mask twice; autocast state is replayed in the recomputation.
    """
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, h, start_pos, freqs_cis, mask, use_reentrant=False, preserve_rng_state=True)
    return layer(h, start_pos, freqs_cis, mask)


class Transformer(nn.Module):
    """Llama: ``forward(tokens (B, T) int64, start_pos)`` → float32 logits (B, T, V) (float64 for an fp64 model).

    With ``kv_caching`` on, keys and values of positions ``< start_pos`` come from earlier calls on the same
    batch rows; with it off, every call attends only to its own tokens (placed at positions
    ``start_pos … start_pos+T-1``). Trainable: no ``inference_mode`` inside; the caller chooses ``no_grad``.
    """

    def __init__(self, params: ModelArgs, *, kv_cache_cls: type[KVCache] = KVCache,
                 block_runner: Optional[BlockRunner] = None):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError(f"ModelArgs.vocab_size is {params.vocab_size}: set it from the tokenizer "
                             f"(args.replace(vocab_size=tokenizer.n_words))")
        self.params = params = params.replace()  # our own copy: nothing done to this model reaches the caller's
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._freqs_cis: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # not a buffer: .to(bf16) must not touch it
        self.checkpointed_layers: frozenset[int] = frozenset()
        # The model's two replaceable parts: how the cache stores keys and values, and how a block is run
        # (plainly or checkpointed). Another implementation of either is injected here, never patched in.
        self.kv_cache_cls = kv_cache_cls
        self.block_runner: BlockRunner = block_runner or run_block
        self.kv_caching = params.kv_caching

    def tie_weights(self) -> None:
        """Make ``output.weight`` the ``tok_embeddings.weight`` Parameter again where ``params.tie_embeddings`` says
        tied: after what gives every module a tensor of its own (``to_empty`` from the meta device,
        ``load_state_dict(assign=True)``), as transformers' ``tie_weights``."""
        if self.params.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def set_gradient_checkpointing(self, policy: Optional[str]) -> None:
        """Recompute the blocks chosen by ``policy`` (see :func:`checkpoint_policy_layers`) in backward."""
        self.checkpointed_layers = checkpoint_policy_layers(policy, self.n_layers)

    @property
    def kv_caching(self) -> bool:
        """Whether the attention layers hold a KV cache (``ModelArgs.kv_caching`` is only the initial setting)."""
        return any(layer.attention.kv_cache is not None for layer in self.layers)

    @kv_caching.setter
    def kv_caching(self, on: bool) -> None:
        """On: every attention layer gets a ``kv_cache_cls`` (kept if it has one already); off: caches dropped."""
        p = self.params
        for layer in self.layers:
            attn = layer.attention
            if not on:
                attn.kv_cache = None
            elif attn.kv_cache is None:
                attn.kv_cache = self.kv_cache_cls(p.max_batch_size, p.max_seq_len, attn.n_kv_heads, attn.head_dim)

    def rotary_freqs(self, start_pos: int, seqlen: int, device: torch.device, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
        """RoPE factors of positions ``start_pos … start_pos+seqlen-1``: (T, Dh/2), complex64 (complex128 when
        ``dtype`` is float64)."""
        key = (device, torch.float64 if dtype == torch.float64 else torch.float32)
        if key not in self._freqs_cis:  # the whole table, computed once per device and precision
            p = self.params
            self._freqs_cis[key] = precompute_freqs_cis(p.head_dim, p.max_seq_len, p.rope_theta, p.use_scaled_rope,
                                                        p.rope_scale_factor, device=device, dtype=key[1])
        return self._freqs_cis[key][start_pos:start_pos + seqlen]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, labels: Optional[torch.Tensor] = None,
                loss_chunk: Optional[int] = None, loss_kernel: Optional[LossKernel] = None,
                positions: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Logits (B, T, V); with ``labels`` (B, T), the summed next-token loss instead (fp32 scalar, see
        ``llama_ref.loss``): from full logits; with ``loss_chunk``, never more than that many positions' logits at
        once; with ``loss_kernel`` (e.g. ``llama_ref.loss.linear_cross_entropy``), by that function of the final
        hidden states (B·T, D), the output weight (V, D) and the shifted labels (B·T,), ``reduction="sum"``.

        Packed rows (several documents per row, ``llama_ref.train.data.pack``): ``positions`` (B, T) the RoPE
        position of each token (restarting at 0 in each document) and ``document_ids`` (B, T) its document —
        attention stays inside each document. Without them, positions run ``start_pos …`` and attention is causal
        over the row, as before. A packed row's labels ignore each document's first token (the loss never
        predicts it from the document before)."""
        hidden = self.hidden_states(tokens, start_pos, positions=positions, document_ids=document_ids)
        if labels is None:
            return upcast(self.output(hidden))
        if loss_chunk is not None:
            if loss_kernel is not None:
                raise ValueError("loss_chunk and loss_kernel are two ways of computing the loss: give one")
            loss_kernel = functools.partial(chunked_cross_entropy, chunk_size=loss_chunk)
        if loss_kernel is None:
            return token_loss_sum(upcast(self.output(hidden)), labels)
        if type(self.output) is not nn.Linear:  # an adapted head: its weight alone is not what it computes
            raise ValueError(f"a loss kernel takes the output projection's weight; this model's output is a "
                             f"{type(self.output).__qualname__}")
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # position t predicts t+1
        return loss_kernel(hidden.flatten(0, 1), self.output.weight, targets, reduction="sum")

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0, *, positions: Optional[torch.Tensor] = None,
                      document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final normed hidden states (B, T, D) that ``output`` projects to logits: what a loss that projects
        a few positions at a time (``llama_ref.loss.chunked_cross_entropy``, ``linear_cross_entropy``) starts from."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        bsz, seqlen = tokens.shape
        p = self.params
        if not 0 <= start_pos or start_pos + seqlen > p.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} outside max_seq_len={p.max_seq_len}")
        if self.kv_caching and bsz > p.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size={p.max_batch_size} of the KV cache")
        h = self.tok_embeddings(tokens)  # (B, T, D)
        if positions is None and document_ids is None:
            freqs_cis = self.rotary_freqs(start_pos, seqlen, h.device, h.dtype)
            kv_len = start_pos + seqlen if self.kv_caching else seqlen
            flex = p.attn_impl == "flex"
            mask = (causal_block_mask if flex else causal_mask)(seqlen, kv_len, h.device)
        else:
            freqs_cis, mask = self._packed(tokens, start_pos, positions, document_ids, h)
        for i, layer in enumerate(self.layers):
            h = self.block_runner(layer, h, start_pos, freqs_cis, mask, i in self.checkpointed_layers)
        return self.norm(h)

    def _packed(self, tokens: torch.Tensor, start_pos: int, positions: Optional[torch.Tensor],
                document_ids: Optional[torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE factors by each token's position (B, T, Dh/2) and the document mask of packed rows."""
        if self.kv_caching or start_pos:
            raise ValueError("positions / document_ids are for packed training rows: a KV cache and start_pos > 0 "
                             "are not (switch kv_caching off)")
        for name, t in (("positions", positions), ("document_ids", document_ids)):
            if t is not None and t.shape != tokens.shape:
                raise ValueError(f"{name} must be (batch, seq_len) like tokens {tuple(tokens.shape)}, got "
                                 f"{tuple(t.shape)}")
        seqlen = tokens.shape[1]
        if positions is None:
            positions = torch.arange(seqlen, device=tokens.device).expand_as(tokens)
        elif not hasattr(positions, "fake_mode") and (bool((positions < 0).any())  # (a memory prediction's fake
                                                      or bool((positions >= self.params.max_seq_len).any())):  # ones)
            raise ValueError(f"positions must lie in 0..{self.params.max_seq_len - 1} (max_seq_len), got "
                             f"{int(positions.min())}..{int(positions.max())}")
        if document_ids is None:  # the documents from the positions: a new one wherever they do not count up by 1
            step = torch.diff(positions, dim=1, prepend=positions[:, :1] - 1)
            document_ids = (step != 1).cumsum(dim=1)
        table = self.rotary_freqs(0, self.params.max_seq_len, h.device, h.dtype)
        flex = self.params.attn_impl == "flex"
        return table[positions], (document_block_mask if flex else document_mask)(document_ids)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> Transformer:
    """Seeded random init, independent of the global RNG: linear weights N(0, 1/fan_in), embeddings N(0, 1),
    norms 1. Every matrix gets its own draw, so same-shaped projections (wq/wo, w1/w3) never coincide."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        std = 1.0 if "tok_embeddings" in name else param.shape[-1] ** -0.5
        param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float32) * std)
    return model
