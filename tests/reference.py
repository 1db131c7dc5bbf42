"""The reference decoder the tests hold ``pocketlm.generate`` to: no KV cache, no engine.

Every step recomputes the last ``block_size`` tokens of every row from scratch. Rows are
left-padded together; padding gets its own segment (``segment_ids``), so the model's
block-diagonal mask keeps real tokens from attending to it, and positions count real tokens
only. Sampling uses the same pure functions and per-sample seeds as ``Generator``, so with the
same settings the tokens must be the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pocketlm.model import GPT
from pocketlm.sampling import apply_repetition_penalty, mark_seen, sample_next, sample_seed


@dataclass
class ReferenceSample:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


@torch.inference_mode()
def reference_generate(model: GPT, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       repetition_penalty: float = 1.0, num_samples: int = 1, seed: int | None = None,
                       stop_tokens: Sequence[int] | None = None,
                       step_logits: list[torch.Tensor] | None = None) -> list[ReferenceSample]:
    """Samples prompt by prompt, as ``Generator.generate`` returns them; ``step_logits`` (if
    given) receives the (B, V) last-position logits of every step."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    block, eot = model.config.block_size, tokenizer.eot_id
    stop = {eot} if stop_tokens is None else set(stop_tokens)
    device = model.lm_head.weight.device
    contexts, gens = [], []
    for text in prompts:
        ids = tokenizer.encode(text)
        for s in range(num_samples):
            contexts.append(ids[-block:] if ids else [eot])
            gens.append(torch.Generator(device=device).manual_seed(sample_seed(seed, text, s))
                        if temperature > 0 else None)
    samples = [ReferenceSample() for _ in contexts]
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(contexts), model.config.vocab_size, dtype=torch.bool, device=device)
        for r, ctx in enumerate(contexts):
            seen[r, ctx] = True
    active = list(range(len(contexts)))
    while active:
        windows = [contexts[i][-block:] for i in active]
        width = max(map(len, windows))
        ids = torch.tensor([[eot] * (width - len(w)) + w for w in windows], device=device)  # (B, T)
        valid = torch.tensor([[False] * (width - len(w)) + [True] * len(w) for w in windows], device=device)
        if bool(valid.all()):
            hidden = model.hidden_states(ids)
        else:
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
            hidden = model.hidden_states(ids, position_ids=position_ids, segment_ids=valid.long())
        logits = model.lm_head(hidden[:, -1]).float()  # (B, V)
        if step_logits is not None:
            step_logits.append(logits.clone())
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=[gens[i] for i in active] if temperature > 0 else None)
        if seen is not None:
            mark_seen(seen, next_ids)
        still = []
        for r, (i, tok) in enumerate(zip(active, next_ids.tolist())):
            if tok in stop:
                samples[i].finish_reason = "eot" if tok == eot else "stop"
                continue
            samples[i].token_ids.append(tok)
            contexts[i].append(tok)
            if len(samples[i].token_ids) < max_new_tokens:
                still.append(r)
        active = [active[r] for r in still]
        if seen is not None and still:
            seen = seen[torch.tensor(still, device=device)]
    return samples
