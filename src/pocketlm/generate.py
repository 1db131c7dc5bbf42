"""Text generation: one KV-cached decode loop, sampling controls, streaming.

``Generator`` serves the ``pocketlm generate`` command and notebooks alike::

    from pocketlm.generate import Generator
    gen = Generator.from_checkpoint("runs/gpt2-125m")
    print(gen.generate("The history of", max_new_tokens=50, seed=0)[0].completion)

or in one call, ``pocketlm.generate.generate("runs/gpt2-125m", "The history of", seed=0)``.
This module is the engine (``BatchState`` and the decode loop, ``Generator._decode``);
``sampling.py`` chooses tokens from logits (repetition penalty, then temperature, top-k, top-p;
``temperature=0`` is greedy), ``lookup.py`` guesses tokens ahead, ``console.py`` does the terminal.

How a batch is decoded
    Prompts are encoded and left-padded into one batch. Each row has *pending* tokens, chosen
    (or given) but not yet in the cache: first its whole prompt (the prefill), then the token
    chosen last. Padding is marked invalid in the cache and every row gets its own positions
    (its first real token is position 0), so padding changes no row's output. A row stops at a
    stop token (``<|endoftext|>`` unless ``stop_tokens`` says otherwise; not part of its
    completion) or at ``max_new_tokens``; finished rows leave the batch and the cache.

Context length
    A prompt longer than the context keeps its last ``block_size`` tokens (one warning per call).
    When the cache is full the window slides: the last ``slide_keep`` tokens of each row (prompt
    and completion so far) become pending in a fresh cache, positions restarting at 0. The
    default, half the context, keeps at least half a context of history and pays one prefill of
    ``block_size // 2`` tokens every ``block_size // 2`` tokens. ``recompute=True`` (``--no-cache``)
    makes the window a full context and leaves the cache no spare room, so every step re-prefills
    the last ``block_size`` tokens into a fresh cache: decoding without a cache, in the same loop.

Prompt lookup (greedy decoding of a single row; see lookup.py)
    The guesses of a ``PromptLookup`` are fed after the pending token; the model's argmax at each
    position keeps the agreed guesses plus one token of its own, and the cache is truncated past
    the rest: the plain greedy output, token for token (barring float ties between one-token and
    many-token products), in fewer passes. Batches of several rows decode one token per pass.

Randomness
    Each sample draws from its own ``torch.Generator`` (never the global RNG), seeded from a hash
    of ``seed``, its prompt and its sample number: the same seed and flags give the same text,
    whichever prompts share its batch (and whatever ``batch_size``).
"""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from pocketlm.console import DEFAULT_PROMPT
from pocketlm.device import AUTOCAST_DTYPES, autocast, resolve_device, resolve_precision
from pocketlm.errors import ConfigError
from pocketlm.lookup import DEFAULT_PROMPT_LOOKUP, PromptLookup, agreed_prefix
from pocketlm.model import GPT, KVCache
from pocketlm.sampling import apply_repetition_penalty, mark_seen, sample_next, sample_seed, validate_sampling
from pocketlm.tokenizer import Tokenizer

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
    """Tokens generated, not counting the stop token."""
    finish_reason: str
    """``eot`` (the model wrote ``<|endoftext|>``), ``stop`` (another of ``stop_tokens``) or
    ``length`` (``max_new_tokens`` reached)."""
    seconds: float
    """Wall time from the start of its batch (prefill included) until this sample finished."""
    tokens_per_second: float
    seed: int | None
    """The seed of the call (None for greedy decoding)."""
    prompt_truncated: bool = False
    token_ids: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "token_ids"}


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


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    stop_tokens: frozenset[int]
    eot: int
    stream: StreamCallback | None


@dataclass
class _Row:
    index: int  # where its Sample goes in generate()'s result; the stream callback's row
    prompt_index: int
    sample_index: int
    prompt: str
    prompt_tokens: int
    context: list[int]  # the tokens the model conditions on: (truncated) prompt, then the completion
    truncated: bool
    generator: torch.Generator | None
    decoder: StreamDecoder
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    seconds: float = 0.0

    def take(self, tokens: list[int], settings: _Settings, elapsed: float) -> bool:
        """Append new tokens up to a stop token or ``max_new_tokens``; True once the row has finished."""
        for tok in tokens:
            if tok in settings.stop_tokens:
                self.finish_reason = "eot" if tok == settings.eot else "stop"
                break
            self.out.append(tok)
            self.context.append(tok)
            if settings.stream is not None and (text := self.decoder.push(tok)):
                settings.stream(self.index, text, False)
            if len(self.out) >= settings.max_new_tokens:
                self.finish_reason = "length"
                break
        if self.finish_reason is None:
            return False
        self.seconds = elapsed
        if settings.stream is not None:
            settings.stream(self.index, self.decoder.flush(), True)
        return True


class BatchState:
    """The rows decoded side by side and the KV cache holding their context.

    ``pending`` (B, T): tokens the rows have chosen (or were given) that the cache does not hold
    yet, fed by the next pass; at first each row's whole context, in a cache with ``spare``
    slots after it. ``pads`` (B,): left padding in the current cache (None if no row has any).
    ``seen`` (B, V): tokens each row has seen, for the repetition penalty (None without one).
    """

    def __init__(self, model: GPT, rows: list[_Row], *, pad_id: int, cache_dtype: torch.dtype, spare: int,
                 track_seen: bool = False) -> None:
        self.model, self.rows, self.pad_id, self.cache_dtype = model, rows, pad_id, cache_dtype
        self.device = model.lm_head.weight.device
        self.seen: torch.Tensor | None = None
        if track_seen:
            self.seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=self.device)
            for r, row in enumerate(rows):
                self.seen[r, torch.tensor(row.context, device=self.device)] = True
        self.refill(model.config.block_size, spare)

    @property
    def room(self) -> int:
        """Cache slots left once the pending tokens are in (negative: they do not fit)."""
        return self.cache.max_len - self.cache.length - self.pending.size(1)

    def refill(self, keep: int, spare: int) -> None:
        """A fresh cache: the last ``keep`` tokens of every row become pending (left-padded), with
        room for ``spare`` more after them, never past the context."""
        seqs = [row.context[-keep:] for row in self.rows]
        width = max(map(len, seqs))
        pads = [width - len(seq) for seq in seqs]
        self.pending = torch.tensor([[self.pad_id] * p + seq for p, seq in zip(pads, seqs)], device=self.device)
        self.cache: KVCache = self.model.new_kv_cache(len(seqs), min(self.model.config.block_size, width + spare),
                                                      dtype=self.cache_dtype)
        self.pads = torch.tensor(pads, device=self.device) if any(pads) else None
        if self.pads is not None:
            self.cache.mark_left_padding(self.pads, width)

    def forward(self, guesses: Sequence[int] = ()) -> torch.Tensor:
        """Feed the pending tokens, then ``guesses`` (one row only), into the cache: hidden states (B, T, C)."""
        ids = self.pending  # (B, T)
        if guesses:
            ids = torch.cat([ids, torch.tensor([list(guesses)], device=self.device)], dim=1)
        position_ids = None  # no padding: the model's own positions, from the cache's length on
        if self.pads is not None:
            positions = torch.arange(self.cache.length, self.cache.length + ids.size(1), device=self.device)
            position_ids = (positions[None] - self.pads[:, None]).clamp(min=0)  # (B, T); padding sits at 0
        return self.model.hidden_states(ids, position_ids=position_ids, kv_cache=self.cache)

    def advance(self, new: torch.Tensor, rejected: int = 0) -> None:
        """After a pass: ``new`` (B, n) are each row's new tokens, the last of which becomes
        pending; the keys of the ``rejected`` guesses at the end of the cache are forgotten."""
        if rejected:
            self.cache.truncate(self.cache.length - rejected)
        if self.seen is not None:
            mark_seen(self.seen, new)
        self.pending = new[:, -1:]  # (B, 1)

    def drop_finished(self, finished: Sequence[bool]) -> None:
        """Remove the finished rows from the batch and from the cache."""
        keep = [r for r, done in enumerate(finished) if not done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[r] for r in keep]
        if keep:
            index = torch.tensor(keep, device=self.device)
            self.cache.keep_rows(index)
            self.pending = self.pending[index]
            self.pads = self.pads[index] if self.pads is not None else None
            self.seen = self.seen[index] if self.seen is not None else None


class Generator:
    """Generates text from a ``GPT`` and its tokenizer (see the module docstring).

    ``slide_keep``: tokens kept when the window slides (default half the context).
    ``recompute=True``: every step re-prefills the last ``block_size`` tokens into a fresh cache
    (slow; ``--no-cache``, for checking the cached decoder).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device | str | None = None,
                 precision: str = "fp32", *, slide_keep: int | None = None, recompute: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        if device is None:
            device = model.lm_head.weight.device
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.block_size = model.config.block_size
        self.recompute = recompute
        self.slide_keep = self.block_size if recompute else self.block_size // 2 if slide_keep is None else slide_keep
        if not 1 <= self.slide_keep <= self.block_size:
            raise ConfigError(f"slide_keep must be between 1 and the context ({self.block_size}), got {self.slide_keep}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.cache_dtype = AUTOCAST_DTYPES.get(self.precision, model.lm_head.weight.dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "fp32",
                        say: Callable[[str], None] | None = None, **kwargs) -> Generator:
        """Load a checkpoint folder (or a run folder: its best checkpoint, else its latest;
        ``say`` hears which)."""
        from pocketlm.checkpoint import load_model

        dev = resolve_device(device)
        model, tokenizer, _ = load_model(path, dev, say=say)
        return cls(model, tokenizer, dev, precision, **kwargs)

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0, num_samples: int = 1,
                 seed: int | None = None, stream: StreamCallback | None = None, batch_size: int = 16,
                 stop_tokens: Sequence[int] | None = None,
                 prompt_lookup: int = DEFAULT_PROMPT_LOOKUP) -> list[Sample]:
        """Continue each prompt ``num_samples`` times; samples come back prompt by prompt.

        ``stream(row, text, finished)`` is called with new text of the sample that will be
        ``result[row]`` as soon as it decodes cleanly, and once with ``finished=True``.
        ``seed=None`` draws a fresh seed (reported in each ``Sample``); greedy decoding needs none.
        ``stop_tokens``: token ids that end a sample (None: ``<|endoftext|>``; ``()``: none, so
        every sample runs to ``max_new_tokens``, as benchmarks want).
        ``prompt_lookup``: tokens guessed per pass in greedy decoding of one row (0 disables; see
        the module docstring). It changes the speed, not the text.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ConfigError("no prompt given")
        validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, num_samples=num_samples, batch_size=batch_size,
                          prompt_lookup=prompt_lookup)
        if temperature == 0:
            seed = None
        elif seed is None:
            seed = secrets.randbits(63)
        rows = self._make_rows(prompts, num_samples, seed)
        eot = self.tokenizer.eot_id
        stop = frozenset(int(t) for t in ((eot,) if stop_tokens is None else stop_tokens))
        settings = _Settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, eot, stream)
        # Guesses are checked by argmax position by position: greedy decoding without a penalty only.
        lookup = prompt_lookup > 0 and temperature == 0 and repetition_penalty == 1.0 and not self.recompute
        was_training = self.model.training
        self.model.eval()
        try:
            # Under autocast, no_grad rather than inference_mode: autocast's cache of the low-precision
            # weight copies only works outside inference mode (otherwise every step re-casts every weight).
            grad_off = torch.inference_mode() if self.precision == "fp32" else torch.no_grad()
            with grad_off, autocast(self.device, self.precision):
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start:start + batch_size]
                    self._decode(chunk, settings, PromptLookup(prompt_lookup) if lookup and len(chunk) == 1 else None)
        finally:
            self.model.train(was_training)
        return [self._to_sample(r, seed) for r in rows]

    __call__ = generate

    def _decode(self, rows: list[_Row], settings: _Settings, proposer: PromptLookup | None = None) -> None:
        """The decode loop: passes over ``rows`` side by side until every row has finished."""
        t0 = time.perf_counter()
        batch = BatchState(self.model, rows, pad_id=settings.eot, cache_dtype=self.cache_dtype,
                           spare=self._spare(rows, settings), track_seen=settings.repetition_penalty != 1.0)
        while batch.rows:
            if batch.room < 0:  # the cache is full: the window slides
                batch.refill(self.slide_keep, self._spare(batch.rows, settings))
            guesses: list[int] = []
            if proposer is not None:  # one row; the pass adds one token of the model's own
                wanted = settings.max_new_tokens - len(batch.rows[0].out) - 1
                guesses = proposer.propose(batch.rows[0].context, min(batch.room, wanted))
            logits = self._last_logits(batch.forward(guesses), 1 + len(guesses))  # (B, 1 + guesses, V)
            chosen = self._choose(batch, logits, settings)  # (B, 1 + guesses)
            tokens = chosen.tolist()
            accepted = agreed_prefix(guesses, tokens[0]) if guesses else 0
            if proposer is not None:
                proposer.accept(accepted)
            # The agreed guesses are the model's own tokens: each row gains them and one more.
            batch.advance(chosen[:, :accepted + 1], rejected=len(guesses) - accepted)
            elapsed = time.perf_counter() - t0
            batch.drop_finished([row.take(toks[:accepted + 1], settings, elapsed)
                                 for row, toks in zip(batch.rows, tokens)])

    def _spare(self, rows: list[_Row], settings: _Settings) -> int:
        """Cache slots to leave after a prefill: enough for the row that runs longest, or none
        when recomputing (so the next step starts a fresh cache)."""
        return 0 if self.recompute else settings.max_new_tokens - min(len(row.out) for row in rows)

    def _last_logits(self, hidden: torch.Tensor, n: int = 1) -> torch.Tensor:
        """(B, n, V) logits of the last ``n`` positions: the output layer only where tokens are chosen.
        Rows past the tokenizer's vocabulary (an embedding table padded to a multiple of 64) are no
        token at all: they get -inf, so neither argmax nor sampling can pick them."""
        logits = self.model.lm_head(hidden[:, -n:]).float()
        if self.tokenizer.vocab_size < logits.size(-1):
            logits[..., self.tokenizer.vocab_size:] = float("-inf")
        return logits

    def _choose(self, batch: BatchState, logits: torch.Tensor, settings: _Settings) -> torch.Tensor:
        """Each row's token after each of the last ``n`` positions, (B, n), from logits (B, n, V)."""
        if logits.size(1) > 1:  # guesses to check: prompt lookup runs greedy and without a penalty
            return logits.argmax(dim=-1)
        last = apply_repetition_penalty(logits[:, 0], batch.seen, settings.repetition_penalty)  # (B, V)
        gens = [row.generator for row in batch.rows] if settings.temperature > 0 else None
        return sample_next(last, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                           generator=gens)[:, None]

    def _make_rows(self, prompts: list[str], num_samples: int, seed: int | None) -> list[_Row]:
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
                gen = None if seed is None else torch.Generator(self.device).manual_seed(sample_seed(seed, text, s))
                rows.append(_Row(len(rows), p, s, text, len(ids), list(context), len(ids) > self.block_size, gen,
                                 StreamDecoder(self.tokenizer)))
        return rows

    def _to_sample(self, row: _Row, seed: int | None) -> Sample:
        n = len(row.out)
        return Sample(prompt=row.prompt, completion=self.tokenizer.decode(row.out), prompt_index=row.prompt_index,
                      sample_index=row.sample_index, prompt_tokens=row.prompt_tokens, completion_tokens=n,
                      finish_reason=row.finish_reason or "length", seconds=row.seconds,
                      tokens_per_second=n / row.seconds if row.seconds > 0 else 0.0, seed=seed,
                      prompt_truncated=row.truncated, token_ids=list(row.out))


def generate(model: GPT | str | Path, prompts: str | Sequence[str] = DEFAULT_PROMPT, *,
             tokenizer: Tokenizer | None = None, device: str = "auto", precision: str = "fp32",
             **kwargs) -> list[Sample]:
    """The one-call API: generate from a checkpoint path (or a ``GPT`` plus its ``tokenizer``);
    see ``Generator.generate``."""
    if isinstance(model, (str, Path)):
        gen = Generator.from_checkpoint(model, device=device, precision=precision)
    else:
        if tokenizer is None:
            raise ConfigError("generate(model, ...) needs tokenizer=")
        gen = Generator(model, tokenizer, None if device == "auto" else device, precision)
    return gen.generate(prompts, **kwargs)
