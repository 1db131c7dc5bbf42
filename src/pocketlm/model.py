"""A GPT-2-style decoder: learned positions, pre-norm blocks, causal SDPA attention, tied embeddings.

This file is the architecture and its KV cache, nothing else. How a training run executes the
model (memory savers, graph capture, faster kernels, data parallelism) is applied from outside,
by swapping or wrapping submodules (see parallelize.py); the loss lives in losses.py.

Parameter names match Hugging Face ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight``...),
so converting is a rename-free copy plus a transpose of the Linear weights (HF uses Conv1D).

Attention masks: with right padding the plain causal mask already keeps every real token away
from padding, so the common path is ``is_causal=True``. Packed rows pass ``segment_ids`` and get
a block-diagonal causal mask; cached decoding passes a ``KVCache`` that knows which keys are valid.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.config import ModelConfig


class KVCache:
    """Keys and values of every layer for incremental decoding.

    ``key_valid`` marks real keys: rows of a left-padded batch mark their padding False so no
    query ever attends to it.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.key_valid.size(0)

    def mark_left_padding(self, pads: torch.Tensor, width: int) -> None:
        """Row r's first ``pads[r]`` of the next ``width`` positions are padding: never attended to."""
        positions = torch.arange(self.length, self.length + width, device=self.key_valid.device)
        self.key_valid[:, self.length:self.length + width] = positions[None] - self.length >= pads[:, None]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every batch row not listed in ``rows`` (indices into the current rows)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.key_valid = self.key_valid[rows]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (keys written there are overwritten later)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        """Mask for ``n_new`` queries that follow the ``length`` cached positions; None if not needed."""
        start, end = self.length, self.length + n_new
        valid = self.key_valid[:, :end]  # (B, end)
        if bool(valid.all()) and (n_new == 1 or start == 0):
            return None  # plain causal attention covers it (see CausalSelfAttention.forward)
        q_pos = torch.arange(start, end, device=valid.device)
        k_pos = torch.arange(end, device=valid.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # (n_new, end)
        own = k_pos[None, :] == q_pos[:, None]  # a padding query attends itself, so no row is empty
        return ((causal[None] & valid[:, None, :]) | own[None])[:, None]  # (B, 1, n_new, end)


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(hs)) v, with dropout on the probabilities in training. A module of its
    own so that another kernel can take its place without touching the block."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=self.dropout if self.training else 0.0)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attend = ScaledDotProductAttention(config.attn_dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        is_causal = mask is None
        if cache is not None:
            k_store, v_store, start = cache
            k_store[:, :, start:start + T] = k
            v_store[:, :, start:start + T] = v
            k, v = k_store[:, :, :start + T], v_store[:, :, :start + T]  # (B, nh, start+T, hs)
            is_causal = mask is None and start == 0 and T > 1
        y = self.attend(q, k, v, mask, is_causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # tanh GELU is GPT-2's "gelu_new"; exact parity with HF weights depends on it.
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask: position i sees j iff j <= i and both lie in the same segment."""
    T = segment_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by depth so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Unique parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm output, (B, T, n_embd)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"{start + T} tokens do not fit a KV cache of {kv_cache.max_len}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        if kv_cache is not None:
            mask = kv_cache.attention_mask(T)
        elif segment_ids is not None:
            mask = segment_mask(segment_ids)
        else:
            mask = None
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, (kv_cache.k[i], kv_cache.v[i], start) if kv_cache is not None else None)
        if kv_cache is not None:
            kv_cache.length = start + T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits, (B, T, vocab_size)."""
        h = self.hidden_states(idx, position_ids=position_ids, segment_ids=segment_ids, kv_cache=kv_cache)
        return self.lm_head(h)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype or p.dtype)
