"""Text generation: KV-cached incremental decoding, sampling controls, streaming.

``Generator`` serves the ``pocketlm generate`` command and notebooks alike::

    from pocketlm.generate import Generator
    gen = Generator.from_checkpoint("runs/gpt2-125m")
    print(gen.generate("The history of", max_new_tokens=50, seed=0)[0].completion)

or in one call, ``pocketlm.generate.generate("runs/gpt2-125m", "The history of", seed=0)``.

How a batch is decoded
    Prompts are encoded and left-padded into one batch. The whole batch is processed in one
    forward pass (prefill) that fills a ``KVCache``; padding is marked invalid in
    ``cache.key_valid`` and every row gets its own ``position_ids`` (its first real token is
    position 0), so padding changes no row's output. After that each step feeds one token per
    row. A row stops at ``<|endoftext|>`` (not part of its completion) or at ``max_new_tokens``;
    finished rows are dropped from the batch, and the batch stops when every row has finished.

Context length
    A prompt longer than the context keeps its last ``block_size`` tokens (one warning per call).
    When the cache is full, the window slides: the last ``slide_keep`` tokens of each row
    (prompt and completion so far) are prefilled into a fresh cache, positions restarting at 0,
    and decoding continues one token at a time. The default ``slide_keep`` is half the context:
    the model always sees at least half a context of history, and the re-prefill (the cost of
    ``block_size // 2`` tokens in one pass) happens once every ``block_size // 2`` tokens, a
    small overhead. ``slide_keep=block_size`` re-prefills a full window at every step, which is
    exactly what decoding without the cache (``use_cache=False``) computes.

Prompt lookup (greedy decoding of a single row)
    At batch 1 every decoding step reads all the weights to produce one token, so a pass over a
    few tokens costs little more than a pass over one. Greedy decoding therefore guesses a continuation
    (the tokens that followed the most recent earlier occurrence of the last 1 to 3 tokens, in
    the prompt or the text so far: "prompt lookup decoding", Saxena 2023) and feeds it together
    with the last token in one pass. The model's own argmax at each of those positions says how
    many guessed tokens it would have produced itself; those are kept with one more token of its
    own, and the cache is rolled back past the rest. The output is the plain greedy output, token
    for token (barring float ties between the one-token and many-token products); only the
    number of passes changes. It guesses 2 tokens until a pass confirms all its guesses, then up
    to ``prompt_lookup`` (see ``next_guess_count``). Batches of several rows decode one token per
    pass as before.

Randomness
    Sampling draws from ``torch.Generator`` objects seeded from ``seed``, never the global RNG.
    Each sample has its own generator, seeded from a hash of ``seed``, its prompt and its sample
    number, so the same seed and flags give the same text, and a prompt's samples do not depend
    on which other prompts share its batch (or on ``batch_size``).

Sampling order (as in Hugging Face): repetition penalty, then temperature, then top-k, then top-p.
``temperature=0`` is greedy decoding (the penalty still applies; top-k/top-p do not matter).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TextIO

import numpy as np
import torch

from pocketlm.device import AUTOCAST_DTYPES, autocast, resolve_device, resolve_precision
from pocketlm.errors import ConfigError
from pocketlm.model import GPT, KVCache
from pocketlm.tokenizer import Tokenizer

DEFAULT_PROMPT = "The history of"
REPLACEMENT_CHAR = "\ufffd"

# stream(row, new_text, finished): row indexes the list that generate() returns.
StreamCallback = Callable[[int, str, bool], None]


@dataclass
class Sample:
    """One generated continuation."""

    prompt: str
    completion: str
    prompt_index: int
    """Position of the prompt in the list given to ``generate``."""
    sample_index: int
    """Which of the ``num_samples`` samples of that prompt."""
    prompt_tokens: int
    """Tokens of the prompt as encoded (before any truncation to the context)."""
    completion_tokens: int
    """Tokens generated, not counting a final ``<|endoftext|>``."""
    finish_reason: str
    """``eot`` (the model wrote ``<|endoftext|>``) or ``length`` (``max_new_tokens`` reached)."""
    seconds: float
    """Wall time from the start of its batch (prefill included) until this sample finished."""
    tokens_per_second: float
    seed: int | None
    """The seed of the call (None for greedy decoding)."""
    prompt_truncated: bool = False
    token_ids: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_ids")
        return d


# ---------------------------------------------------------------------------------------------
# Pure sampling functions


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


DEFAULT_PROMPT_LOOKUP = 15  # most guesses per pass (a 16-token pass)
LOOKUP_PROBE = 2  # guesses per pass until the text proves predictable


def next_guess_count(proposed: int, accepted: int, max_guesses: int) -> int:
    """How many tokens to guess in the next pass: all ``max_guesses`` after a pass whose every
    guess was right, else ``LOOKUP_PROBE``. On a CPU a pass over 16 tokens costs 2.3x a pass
    over one, but a pass over 3 only 1.2x (benchmarks/generate.py), so guessing long only while
    guesses keep coming true makes lookup break even on text that seldom repeats (WikiText)
    and pay several times over on text that loops."""
    if proposed and accepted == proposed:
        return max_guesses
    return min(LOOKUP_PROBE, max_guesses)


def agreed_prefix(draft: Sequence[int], actual: Sequence[int]) -> int:
    """How many leading guesses of ``draft`` match ``actual`` (the model's tokens, or the text)."""
    agreed = 0
    while agreed < len(draft) and draft[agreed] == actual[agreed]:
        agreed += 1
    return agreed


def lookup_draft(context: Sequence[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the most recent earlier occurrence of the
    context's last ``n`` tokens (longest ``n`` <= ``max_ngram`` first); [] when nothing matches.

    The guess is that the text repeats itself with the shift between that occurrence and the
    end, so where the recorded continuation runs out it goes on with the guess itself: a loop
    of period d keeps being predicted for as many tokens as asked."""
    if max_tokens <= 0:
        return []
    ctx = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)  # (L - n, n): all but the suffix itself
        hits = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
        if len(hits):
            follow = int(hits[-1]) + n
            recorded = ctx[follow:].tolist()  # non-empty: the match ends before the last token
            period = len(recorded)
            return [recorded[i % period] for i in range(max_tokens)]
    return []


def sample_seed(seed: int, prompt: str, sample_index: int) -> int:
    """The seed of one sample's generator: a hash of the call's seed, the prompt and the sample number.

    So a sample does not depend on the other prompts of its batch, and different prompts (and
    different samples of one prompt) draw different random numbers.
    """
    digest = hashlib.sha256(f"{seed}\0{sample_index}\0{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**64; stay positive


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back a trailing partial UTF-8 character.

    Byte-level BPE can split one character over several tokens; until the rest arrives the text
    ends in U+FFFD, which is not printed yet. ``flush`` prints whatever is left.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


# ---------------------------------------------------------------------------------------------
# The generator


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    prompt: str
    prompt_tokens: int
    context: list[int]  # the tokens the model conditions on: (truncated) prompt, then the completion
    truncated: bool
    generator: torch.Generator | None
    decoder: StreamDecoder | None
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    seconds: float = 0.0


class Generator:
    """Generates text from a ``GPT`` and its tokenizer (see the module docstring)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device | str | None = None,
                 precision: str = "fp32", *, slide_keep: int | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        if device is None:
            device = model.lm_head.weight.device
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.block_size = model.config.block_size
        self.slide_keep = self.block_size // 2 if slide_keep is None else slide_keep
        if not 1 <= self.slide_keep <= self.block_size:
            raise ConfigError(f"slide_keep must be between 1 and the context ({self.block_size}), got {self.slide_keep}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.cache_dtype = AUTOCAST_DTYPES.get(self.precision, model.lm_head.weight.dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "fp32",
                        **kwargs) -> "Generator":
        """Load a checkpoint folder (or a run folder: its latest checkpoint)."""
        from pocketlm.checkpoint import load_model

        dev = resolve_device(device)
        model, tokenizer, _ = load_model(path, dev)
        return cls(model, tokenizer, dev, precision, **kwargs)

    # -- public API ------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0, num_samples: int = 1,
                 seed: int | None = None, stream: StreamCallback | None = None, batch_size: int = 16,
                 use_cache: bool = True, stop_at_eot: bool = True,
                 prompt_lookup: int = DEFAULT_PROMPT_LOOKUP) -> list[Sample]:
        """Continue each prompt ``num_samples`` times; samples come back prompt by prompt.

        ``stream(row, text, finished)`` is called with new text of the sample that will be
        ``result[row]`` as soon as it decodes cleanly, and once with ``finished=True``.
        ``seed=None`` draws a fresh seed (reported in each ``Sample``); greedy decoding needs none.
        ``stop_at_eot=False`` keeps going through ``<|endoftext|>`` (benchmarks want fixed lengths).
        ``prompt_lookup``: tokens guessed per pass in greedy decoding of one row (0 disables; see
        the module docstring). It changes the speed, not the text.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("no prompt given")
        validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, num_samples=num_samples, batch_size=batch_size,
                          prompt_lookup=prompt_lookup)
        if temperature == 0:
            seed = None
        elif seed is None:
            seed = secrets.randbits(63)

        rows = self._make_rows(prompts, num_samples, seed, stream is not None)
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, stream=stream,
                        eot=self.tokenizer.eot_id if stop_at_eot else None)
        was_training = self.model.training
        self.model.eval()
        try:
            # Under autocast, no_grad rather than inference_mode: autocast's cache of the low-precision
            # weight copies only works outside inference mode (otherwise every step re-casts every weight).
            grad_off = torch.inference_mode() if self.precision == "fp32" else torch.no_grad()
            with grad_off, autocast(self.device, self.precision):
                for start in range(0, len(rows), batch_size):
                    chunk = list(range(start, min(start + batch_size, len(rows))))
                    lookup = (prompt_lookup > 0 and use_cache and len(chunk) == 1 and temperature == 0
                              and repetition_penalty == 1.0)
                    if lookup:
                        self._decode_lookup(rows[chunk[0]], chunk[0], num_draft=prompt_lookup,
                                            max_new_tokens=max_new_tokens, stream=stream, eot=settings["eot"])
                    elif use_cache:
                        self._decode_cached(rows, chunk, **settings)
                    else:
                        self._decode_uncached(rows, chunk, **settings)
        finally:
            self.model.train(was_training)
        return [self._to_sample(r, seed) for r in rows]

    __call__ = generate

    # -- internals ---------------------------------------------------------------------------

    def _make_rows(self, prompts: list[str], num_samples: int, seed: int | None, streaming: bool) -> list[_Row]:
        encoded = self.tokenizer.encode_batch(prompts)
        too_long = sum(len(ids) > self.block_size for ids in encoded)
        if too_long:
            which = "a prompt is" if too_long == 1 else f"{too_long} prompts are"
            self.warn(f"{which} longer than the context of {self.block_size} tokens; "
                      f"keeping the last {self.block_size} tokens")
        rows = []
        for p, (text, ids) in enumerate(zip(prompts, encoded)):
            context = ids[-self.block_size:] if ids else [self.tokenizer.eot_id]  # empty prompt: start a document
            for s in range(num_samples):
                gen = None
                if seed is not None:
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed(sample_seed(seed, text, s))
                rows.append(_Row(p, s, text, len(ids), list(context), len(ids) > self.block_size, gen,
                                 StreamDecoder(self.tokenizer) if streaming else None))
        return rows

    def _to_sample(self, row: _Row, seed: int | None) -> Sample:
        n = len(row.out)
        return Sample(prompt=row.prompt, completion=self.tokenizer.decode(row.out), prompt_index=row.prompt_index,
                      sample_index=row.sample_index, prompt_tokens=row.prompt_tokens, completion_tokens=n,
                      finish_reason=row.finish_reason or "length", seconds=row.seconds,
                      tokens_per_second=n / row.seconds if row.seconds > 0 else 0.0, seed=seed,
                      prompt_truncated=row.truncated, token_ids=list(row.out))

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids right-aligned (padding on the left) and the (B,) padding counts."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.tokenizer.eot_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, T - len(s):] = torch.tensor(s, dtype=torch.long)
        pads = torch.tensor([T - len(s) for s in seqs], dtype=torch.long)
        return ids.to(self.device), pads.to(self.device)

    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden[:, -1]).float()  # (B, V): the head only where it is needed

    def _prefill(self, seqs: list[list[int]], max_len: int) -> tuple[KVCache, torch.Tensor, torch.Tensor | None]:
        """A fresh cache holding ``seqs`` (left-padded); returns it, the last logits and the pads."""
        ids, pads = self._left_pad(seqs)
        B, T = ids.shape
        cache = self.model.new_kv_cache(B, max(max_len, T), dtype=self.cache_dtype)
        if bool(pads.any()):
            cache.key_valid[:, :T] = torch.arange(T, device=self.device)[None] >= pads[:, None]
            position_ids = (torch.arange(T, device=self.device)[None] - pads[:, None]).clamp(min=0)
        else:
            pads, position_ids = None, None  # no padding: the model's own positions 0..T-1
        hidden = self.model.hidden_states(ids, position_ids=position_ids, kv_cache=cache)
        return cache, self._last_logits(hidden), pads

    def _choose(self, rows: list[_Row], active: list[int], logits: torch.Tensor, seen: torch.Tensor | None, *,
                temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> torch.Tensor:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        gens = [rows[i].generator for i in active] if temperature > 0 else None
        return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gens)

    def _record(self, rows: Sequence[_Row] | Mapping[int, _Row], active: list[int], next_ids: list[int],
                max_new_tokens: int, t0: float, stream: StreamCallback | None, eot: int | None) -> list[bool]:
        """Append each row's new token (``rows`` indexed by the caller's row numbers); returns which
        rows finished."""
        done = []
        now = time.perf_counter()
        for i, tok in zip(active, next_ids):
            row = rows[i]
            if tok == eot:
                row.finish_reason = "eot"
            else:
                row.out.append(tok)
                row.context.append(tok)
                if stream is not None and row.decoder is not None:
                    text = row.decoder.push(tok)
                    if text:
                        stream(i, text, False)
                if len(row.out) >= max_new_tokens:
                    row.finish_reason = "length"
            finished = row.finish_reason is not None
            if finished:
                row.seconds = now - t0
                if stream is not None:
                    rest = row.decoder.flush() if row.decoder is not None else ""
                    stream(i, rest, True)
            done.append(finished)
        return done

    def _new_seen(self, rows: list[_Row], active: list[int], repetition_penalty: float) -> torch.Tensor | None:
        if repetition_penalty == 1.0:
            return None
        seen = torch.zeros(len(active), self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        for r, i in enumerate(active):
            seen[r, torch.tensor(rows[i].context, device=self.device)] = True
        return seen

    def _decode_cached(self, rows: list[_Row], chunk: list[int], *, max_new_tokens: int, temperature: float,
                       top_k: int, top_p: float, repetition_penalty: float, stream: StreamCallback | None,
                       eot: int | None) -> None:
        t0 = time.perf_counter()
        active = list(chunk)
        seqs = [rows[i].context for i in active]
        cache, logits, pads = self._prefill(seqs, min(self.block_size, max(map(len, seqs)) + max_new_tokens))
        seen = self._new_seen(rows, active, repetition_penalty)
        while True:
            next_ids = self._choose(rows, active, logits, seen, temperature=temperature, top_k=top_k,
                                    top_p=top_p, repetition_penalty=repetition_penalty)
            done = self._record(rows, active, next_ids.tolist(), max_new_tokens, t0, stream, eot)
            if all(done):
                return
            if seen is not None:
                mark_seen(seen, next_ids)
            if any(done):  # drop finished rows from the batch (and from the cache)
                keep_list = [r for r, d in enumerate(done) if not d]
                keep = torch.tensor(keep_list, device=self.device)
                active = [active[r] for r in keep_list]
                next_ids = next_ids[keep]
                cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
                cache.key_valid = cache.key_valid[keep]
                seen = seen[keep] if seen is not None else None
                if pads is not None:
                    pads = pads[keep]
            if cache.length + 1 > cache.max_len:  # the window slides: re-prefill the recent tokens
                seqs = [rows[i].context[-self.slide_keep:] for i in active]
                remaining = max_new_tokens - min(len(rows[i].out) for i in active)
                cache, logits, pads = self._prefill(seqs, min(self.block_size, max(map(len, seqs)) + remaining))
                continue
            position_ids = None if pads is None else (cache.length - pads)[:, None]
            hidden = self.model.hidden_states(next_ids[:, None], position_ids=position_ids, kv_cache=cache)
            logits = self._last_logits(hidden)

    def _decode_lookup(self, row: _Row, index: int, *, num_draft: int, max_new_tokens: int,
                       stream: StreamCallback | None, eot: int | None) -> None:
        """Greedy decoding of one row with prompt-lookup guesses (see the module docstring)."""
        t0 = time.perf_counter()
        rows = {index: row}  # _record indexes rows by the caller's row number

        def emit(tokens: list[int]) -> bool:
            for tok in tokens:
                if self._record(rows, [index], [tok], max_new_tokens, t0, stream, eot)[0]:
                    return True
            return False

        cache, logits, _ = self._prefill([row.context], min(self.block_size, len(row.context) + max_new_tokens))
        pending = int(logits.argmax(dim=-1)[0])  # chosen, not yet in the cache
        if emit([pending]):
            return
        guesses = next_guess_count(0, 0, num_draft)
        while True:
            room = cache.max_len - cache.length - 1  # cache slots left after the pending token
            if room < 0:  # the window slides: re-prefill the recent tokens (pending among them)
                recent = row.context[-self.slide_keep:]
                cache, logits, _ = self._prefill([recent], min(self.block_size, len(recent) + max_new_tokens
                                                               - len(row.out)))
                pending = int(logits.argmax(dim=-1)[0])
                if emit([pending]):
                    return
                continue
            draft = lookup_draft(row.context, min(guesses, room, max_new_tokens - len(row.out)))
            start = cache.length
            ids = torch.tensor([[pending, *draft]], device=self.device)
            hidden = self.model.hidden_states(ids, kv_cache=cache)  # (1, 1 + len(draft), C)
            predicted = self.model.lm_head(hidden[0]).argmax(dim=-1).tolist()  # the model's token after each
            accepted = agreed_prefix(draft, predicted)
            cache.length = start + 1 + accepted  # forget the keys of the rejected guesses
            guesses = next_guess_count(len(draft), accepted, num_draft)
            pending = predicted[accepted]
            if emit(draft[:accepted] + [pending]):
                return

    def _decode_uncached(self, rows: list[_Row], chunk: list[int], *, max_new_tokens: int, temperature: float,
                         top_k: int, top_p: float, repetition_penalty: float, stream: StreamCallback | None,
                       eot: int | None) -> None:
        """Full recomputation of the last ``block_size`` tokens at every step (the reference)."""
        t0 = time.perf_counter()
        active = list(chunk)
        seen = self._new_seen(rows, active, repetition_penalty)
        while True:
            ids, pads = self._left_pad([rows[i].context[-self.block_size:] for i in active])
            if bool(pads.any()):
                valid = torch.arange(ids.size(1), device=self.device)[None] >= pads[:, None]
                position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
                hidden = self.model.hidden_states(ids, position_ids=position_ids, segment_ids=valid.long())
            else:
                hidden = self.model.hidden_states(ids)
            next_ids = self._choose(rows, active, self._last_logits(hidden), seen, temperature=temperature,
                                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
            done = self._record(rows, active, next_ids.tolist(), max_new_tokens, t0, stream, eot)
            if all(done):
                return
            if seen is not None:
                mark_seen(seen, next_ids)
            if any(done):
                keep_list = [r for r, d in enumerate(done) if not d]
                active = [active[r] for r in keep_list]
                seen = seen[torch.tensor(keep_list, device=self.device)] if seen is not None else None


# ---------------------------------------------------------------------------------------------
# Printing streamed samples in order


class OrderedPrinter:
    """Prints samples one after another while they are generated side by side in a batch.

    The lowest-numbered unfinished sample streams live; text of later samples is buffered and
    printed as soon as their turn comes. ``header(row)`` (optional) is printed before each sample.
    """

    def __init__(self, n_rows: int, out: TextIO | None = None, header: Callable[[int], str] | None = None,
                 footer: Callable[[int], str] | None = None) -> None:
        self.out = out or sys.stdout
        self.n_rows = n_rows
        self.header = header
        self.footer = footer
        self.buffers = [""] * n_rows
        self.finished = [False] * n_rows
        self.current = 0
        self.started = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _start_current(self) -> None:
        if not self.started and self.current < self.n_rows:
            self.started = True
            if self.header is not None:
                self._write(self.header(self.current))

    def __call__(self, row: int, text: str, finished: bool) -> None:
        self.buffers[row] += text
        self.finished[row] |= finished
        self._start_current()
        while self.current < self.n_rows:
            self._write(self.buffers[self.current])
            self.buffers[self.current] = ""
            if not self.finished[self.current]:
                break
            if self.footer is not None:
                self._write(self.footer(self.current))
            self.current += 1
            self.started = False
            self._start_current()


# ---------------------------------------------------------------------------------------------
# One-call API: pocketlm.generate.generate(...)


def generate(model: GPT | str | Path, prompts: str | Sequence[str] = DEFAULT_PROMPT, *,
             tokenizer: Tokenizer | None = None, device: str = "auto", precision: str = "fp32",
             **kwargs) -> list[Sample]:
    """Generate from a checkpoint path (or a ``GPT`` plus its ``tokenizer``); see ``Generator.generate``."""
    if isinstance(model, (str, Path)):
        gen = Generator.from_checkpoint(model, device=device, precision=precision)
    else:
        if tokenizer is None:
            raise ConfigError("generate(model, ...) needs tokenizer=")
        gen = Generator(model, tokenizer, None if device == "auto" else device, precision)
    return gen.generate(prompts, **kwargs)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a file, one per line; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"prompt file {path} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def iter_interactive(read: Callable[[str], str] | None = None) -> Iterable[str]:
    """Prompts typed at a terminal until EOF (Ctrl-D) or ``exit``/``quit``."""
    read = read or input
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line
