"""A GPT-2-style decoder: learned positions, pre-norm blocks, causal SDPA attention, tied embeddings.

Parameter names match Hugging Face ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight``...),
so converting is a rename-free copy plus a transpose of the Linear weights (HF uses Conv1D).

Attention masks: with right padding the plain causal mask already keeps every real token away
from padding, so the common path is ``is_causal=True``. Packed rows pass ``segment_ids`` and get
a block-diagonal causal mask; cached decoding passes a ``KVCache`` that knows which keys are valid.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pocketlm.config import CHECKPOINTING_CHOICES, ModelConfig
from pocketlm.cpu_kernels import CpuAttention, Dropout, gelu_tanh, in_compiled_cpu_training
from pocketlm.losses import IGNORE_INDEX, fused_linear_cross_entropy


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


class _EmbeddingIntoGrad(torch.autograd.Function):
    """Token-embedding lookup whose backward adds the rows' gradients straight into
    ``weight.grad`` (index_add), where autograd would first build a zero-filled dense
    (vocab x n_embd) gradient and then add all of it: 154 MB written and read twice per
    micro-batch on gpt2-125m, for 2,048 rows that changed."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.weight = weight
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad_out.reshape(-1, grad_out.size(-1)).to(weight.dtype)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, idx.reshape(-1), rows)
        return None, None


def embed_tokens(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding``, with the gradient fused into ``weight.grad`` when training a leaf weight."""
    if torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf:
        return _EmbeddingIntoGrad.apply(idx, weight)
    return F.embedding(idx, weight)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = Dropout(config.dropout)
        self.attn_dropout = config.attn_dropout

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
        if in_compiled_cpu_training(x, self.training) and cache is None and not self.attn_dropout:
            y = CpuAttention.apply(q, k, v, mask)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh GELU is GPT-2's "gelu_new"; exact parity with HF weights depends on it.
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


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


_aten = torch.ops.aten
# Selective activation checkpointing keeps the outputs of the expensive ops (matmuls, attention)
# and recomputes the cheap ones in backward: bf16 copies of the weights, LayerNorm, GELU, dropout.
_SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
              _aten._scaled_dot_product_flash_attention_for_cpu.default,
              _aten._scaled_dot_product_flash_attention.default,
              _aten._scaled_dot_product_efficient_attention.default,
              _aten._scaled_dot_product_cudnn_attention.default}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls)


# How a training block runs under each checkpointing choice. Module-level functions of the block,
# so that ``torch.compile`` traces one graph per choice and every block of the model reuses it.
def _plain_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return block(x, mask)


def _full_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return checkpoint(block, x, mask, use_reentrant=False)


def _selective_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return checkpoint(block, x, mask, use_reentrant=False, context_fn=_selective_contexts)


BLOCK_RUNNERS = {"none": _plain_block, "full": _full_block, "selective": _selective_block}


def _silence_sac_in_place_warning(record: logging.LogRecord) -> bool:
    """torch.compile warns, on every run, that a selectively checkpointed region must not hold
    in-place ops. A training ``Block`` has none (the KV cache's writes only run in inference),
    so the warning is noise in the trainer's output."""
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


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
            drop=Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        self.set_checkpointing("none")
        self.block_runners = dict(BLOCK_RUNNERS)
        self.compiled = False
        self.fused_loss = True  # see nll_sum
        self.weight_grad_sink = None  # where the output layer's weight gradient goes (lowmem.py)
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

    def set_checkpointing(self, mode: str, full_blocks: int = 0) -> None:
        """Activation checkpointing in training: ``selective`` (see _SAVED_OPS) on every block,
        ``full`` on every block, or ``selective`` plus full recomputation of the first
        ``full_blocks`` blocks. Changes memory and speed, never the results."""
        if mode not in CHECKPOINTING_CHOICES:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING_CHOICES}, got {mode!r}")
        self.checkpointing = mode
        self.full_checkpoint_blocks = self.config.n_layer if mode == "full" else min(full_blocks, self.config.n_layer)

    def compile_blocks(self) -> None:
        """Run training blocks through ``torch.compile``: LayerNorm, GELU, dropout, residual adds
        and the bf16 casts fuse into a few kernels per block. Inference and cached decoding stay
        eager (their shapes change every call). The results are those of the eager model up to
        floating-point rounding."""
        logging.getLogger("torch._higher_order_ops.wrap").addFilter(_silence_sac_in_place_warning)
        self.block_runners = {mode: torch.compile(fn) for mode, fn in BLOCK_RUNNERS.items()}
        self.compiled = True

    def _run_block(self, i: int, block: Block, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return block(x, mask)
        if self.checkpointing == "none":
            mode = "none"
        else:
            mode = "full" if i < self.full_checkpoint_blocks else "selective"
        return self.block_runners[mode](block, x, mask)

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
        wte = self.transformer.wte.weight
        # The low-memory optimizer collects gradients through autograd hooks, so it gets the plain lookup.
        tokens = F.embedding(idx, wte) if self.weight_grad_sink is not None else embed_tokens(idx, wte)
        x = self.transformer.drop(tokens + self.transformer.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if kv_cache is not None:
                x = block(x, mask, (kv_cache.k[i], kv_cache.v[i], start))
            else:
                x = self._run_block(i, block, x, mask)
        if kv_cache is not None:
            kv_cache.length = start + T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits, (B, T, vocab_size)."""
        h = self.hidden_states(idx, position_ids=position_ids, segment_ids=segment_ids, kv_cache=kv_cache)
        return self.lm_head(h)

    def nll_sum(self, idx: torch.Tensor, targets: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Summed NLL of ``targets`` (IGNORE_INDEX skipped) without materialising the logits.

        The same value as ``token_nll_sum(self(idx), targets)``; see losses.py for the memory.
        """
        h = self.hidden_states(idx, position_ids=position_ids, segment_ids=segment_ids)
        if not self.fused_loss:  # the plain path, kept as the reference for tests and benchmarks
            return token_nll_sum(self.lm_head(h), targets)
        return fused_linear_cross_entropy(h, self.lm_head.weight, targets, weight_grad_sink=self.weight_grad_sink,
                                          compiled=self.compiled)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype or p.dtype)


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood over targets that are not IGNORE_INDEX, computed in fp32.

    Summing (not averaging) lets the trainer divide by the real-token count of the whole
    optimizer step, so gradient accumulation gives exactly the loss of one big batch.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay matrices and embeddings, never biases or LayerNorm gains."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
