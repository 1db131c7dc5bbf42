"""Choosing the next token: pure functions of logits. Order (as in Hugging Face): repetition
penalty, then temperature, then top-k, then top-p. ``temperature=0`` is greedy decoding (the penalty
still applies; top-k/top-p do not matter). Draws use the generators given, never the global RNG.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from pocketlm.errors import ConfigError


def validate_sampling(*, max_new_tokens: int = 1, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, repetition_penalty: float = 1.0, num_samples: int = 1,
                      batch_size: int = 1, prompt_lookup: int = 0) -> None:
    """One-line ``ConfigError`` for any out-of-range generation setting."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be >= 0 (0 means greedy), got {temperature}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ConfigError(f"--top-k must be >= 0 (0 disables it), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ConfigError(f"--top-p must be in (0, 1] (1 disables it), got {top_p}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ConfigError(f"--repetition-penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ConfigError(f"--num-samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if prompt_lookup < 0:
        raise ConfigError(f"--prompt-lookup must not be negative, got {prompt_lookup}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (last dim).

    ``top_k=0`` and ``top_p=1`` disable each filter. Top-k keeps tokens tied with the k-th
    largest logit. Top-p keeps the smallest set of most likely tokens whose probability adds up
    to at least ``top_p`` (always at least the most likely token).
    """
    vocab = logits.size(-1)
    if top_k and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of all more likely tokens
        remove = mass_before >= top_p
        remove[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as in Hugging Face): logits of tokens already seen are divided
    by ``penalty`` when positive and multiplied by it when negative. ``seen``: bool, same shape."""
    if penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def mark_seen(seen: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Record ``token_ids`` (B,) or (B, T) in the (B, V) ``seen`` mask, in place."""
    ids = token_ids if token_ids.dim() == 2 else token_ids[:, None]
    return seen.scatter_(1, ids, True)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Next token ids, (B,), from last-position logits (B, V).

    ``temperature=0`` is greedy (argmax). ``generator`` is one ``torch.Generator`` for the whole
    batch or one per row (then each row's draw depends only on its own generator).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.size(0):
        raise ValueError(f"{len(generator)} generators for {probs.size(0)} rows")
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generator)])


def sample_seed(seed: int, prompt: str, sample_index: int) -> int:
    """The seed of one sample's generator: a hash of the call's seed, the prompt and the sample number.

    So a sample does not depend on the other prompts of its batch, and different prompts (and
    different samples of one prompt) draw different random numbers.
    """
    digest = hashlib.sha256(f"{seed}\0{sample_index}\0{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**64; stay positive
