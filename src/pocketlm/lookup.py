"""Prompt lookup decoding (Saxena 2023): guessed tokens for the decode loop in generate.py to check.

At batch 1 a pass reads all the weights to produce one token, so a pass over a few tokens costs
little more than a pass over one. ``PromptLookup`` guesses how the text goes on (what followed the
most recent earlier occurrence of its last 1 to 3 tokens); the decode loop checks the guesses in
the pass of the last token and keeps those the model itself would have chosen.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

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


class PromptLookup:
    """Guesses for one row's next tokens, and how many to guess (probe short, then go long).

    The decode loop calls ``propose`` before each pass and ``accept`` after it; one instance
    serves one row from its prefill to its end.
    """

    def __init__(self, max_guesses: int = DEFAULT_PROMPT_LOOKUP, max_ngram: int = 3) -> None:
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be at least 1, got {max_guesses}")
        self.max_guesses = max_guesses
        self.max_ngram = max_ngram
        self.guesses = next_guess_count(0, 0, max_guesses)  # nothing guessed yet: probe
        self.proposed = 0

    def propose(self, context: Sequence[int], room: int) -> list[int]:
        """Guessed continuation of ``context`` (the row's tokens so far), at most ``room`` tokens:
        what the cache can hold and the row still needs."""
        draft = lookup_draft(context, min(self.guesses, room), self.max_ngram)
        self.proposed = len(draft)
        return draft

    def accept(self, accepted: int) -> None:
        """The model agreed with the first ``accepted`` tokens of the last proposal."""
        self.guesses = next_guess_count(self.proposed, accepted, self.max_guesses)
