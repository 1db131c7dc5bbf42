"""Generation: the cached engine vs full recomputation (tests/reference.py), the batch state, prompt
lookup, sampling filters, seeds, long and batched prompts, stop tokens, streaming, and the
``pocketlm generate`` command."""

from __future__ import annotations

import copy
import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from pocketlm.cli import main
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError
from pocketlm.console import OrderedPrinter, read_prompt_file
from pocketlm.generate import BatchState, Generator, StreamDecoder
from pocketlm.lookup import LOOKUP_PROBE, PromptLookup, lookup_draft, next_guess_count
from pocketlm.model import GPT
from pocketlm.sampling import apply_repetition_penalty, filter_logits, mark_seen, sample_next, sample_seed
from reference import reference_generate

REPO_ROOT = Path(__file__).resolve().parents[1]
# GPT-2's vocabulary (so real text and multi-byte characters go through the real tokenizer) on a
# model small enough that a decoding step takes about a millisecond.
CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257, dropout=0.0)
PROMPTS = ["The history of", "Hello", "In 1999 the band released an album that", "A small town in the north"]


def make_model(config: ModelConfig = CONFIG, seed: int = 0) -> GPT:
    """Random weights with well-separated logits, so greedy choices are not decided by rounding."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 1.0)
        model.transformer.wpe.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture
def gen(model: GPT, tokenizer) -> Generator:
    return Generator(model, tokenizer, "cpu")


class LogitRecorder:
    """Wraps ``Generator._last_logits`` to keep the logits of every step's last position, (B, V)."""

    def __init__(self, gen: Generator) -> None:
        self.steps: list[torch.Tensor] = []
        self._inner = gen._last_logits
        gen._last_logits = self  # type: ignore[method-assign]

    def __call__(self, hidden: torch.Tensor, n: int = 1) -> torch.Tensor:
        out = self._inner(hidden, n)  # (B, n, V)
        self.steps.append(out[:, -1].clone())
        return out


class PassCounter:
    """Counts the model's forward passes (prefills and decoding steps); ``passes`` holds each
    one's (tokens fed, tokens already in the cache)."""

    def __init__(self, model: GPT) -> None:
        self.calls = 0
        self.passes: list[tuple[int, int | None]] = []
        self._inner = model.hidden_states
        model.hidden_states = self  # type: ignore[method-assign]
        self.model = model

    def __call__(self, idx: torch.Tensor, **kwargs):
        self.calls += 1
        cache = kwargs.get("kv_cache")
        self.passes.append((idx.size(1), None if cache is None else cache.length))
        return self._inner(idx, **kwargs)

    def restore(self) -> None:
        del self.model.hidden_states


# ---------------------------------------------------------------------------------------------
# KV cache vs full recomputation


def test_greedy_with_cache_matches_full_recompute_tokens_and_logits(model: GPT, tokenizer) -> None:
    prompt = "The history of the city"
    n_new = CONFIG.block_size - len(tokenizer.encode(prompt))  # fills the context exactly: no sliding
    cached_gen, recompute_gen = Generator(model, tokenizer, "cpu"), Generator(model, tokenizer, "cpu", recompute=True)
    cached_rec, recompute_rec = LogitRecorder(cached_gen), LogitRecorder(recompute_gen)
    plain_steps: list[torch.Tensor] = []
    cached = cached_gen.generate(prompt, max_new_tokens=n_new, temperature=0, prompt_lookup=0)[0]
    plain = reference_generate(model, tokenizer, prompt, max_new_tokens=n_new, step_logits=plain_steps)[0]
    recomputed = recompute_gen.generate(prompt, max_new_tokens=n_new, temperature=0)[0]
    assert cached.completion_tokens == n_new and cached.finish_reason == "length"
    assert cached.token_ids == plain.token_ids == recomputed.token_ids
    assert len(cached_rec.steps) == len(plain_steps) == len(recompute_rec.steps) == n_new
    for a, b, c in zip(cached_rec.steps, plain_steps, recompute_rec.steps):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        torch.testing.assert_close(c, b, atol=1e-4, rtol=0)
    # And both agree with one forward pass over the finished sequence.
    full = tokenizer.encode(prompt) + cached.token_ids
    with torch.no_grad():
        reference = model(torch.tensor([full]))[0, len(full) - n_new - 1:-1]
    torch.testing.assert_close(torch.cat(cached_rec.steps), reference, atol=1e-4, rtol=0)
    assert cached.completion == tokenizer.decode(cached.token_ids)


def test_cached_sampling_matches_uncached_sampling(gen: Generator, model: GPT, tokenizer) -> None:
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3,
                  num_samples=2, seed=5)
    cached = gen.generate(PROMPTS, **kwargs)
    plain = reference_generate(model, tokenizer, PROMPTS, **kwargs)
    assert [s.token_ids for s in cached] == [s.token_ids for s in plain]
    recomputed = Generator(model, tokenizer, "cpu", recompute=True).generate(PROMPTS, **kwargs)
    assert [s.token_ids for s in recomputed] == [s.token_ids for s in plain]


def test_recompute_starts_a_fresh_cache_at_every_step(model: GPT, tokenizer) -> None:
    """``--no-cache``: every pass feeds the whole window (at most a context) into an empty cache."""
    prompt_len, n_new = len(tokenizer.encode(PROMPTS[0])), CONFIG.block_size + 4  # slides past the context
    counter = PassCounter(model)
    try:
        out = Generator(model, tokenizer, "cpu", recompute=True).generate(PROMPTS[0], max_new_tokens=n_new,
                                                                          temperature=0)[0]
    finally:
        counter.restore()
    assert out.token_ids == reference_generate(model, tokenizer, PROMPTS[0], max_new_tokens=n_new)[0].token_ids
    assert counter.passes == [(min(prompt_len + step, CONFIG.block_size), 0) for step in range(n_new)]


def test_generation_past_the_context_slides_the_window(model: GPT, tokenizer) -> None:
    n_new = 3 * CONFIG.block_size
    # Re-prefilling a full window at every step is exactly what full recomputation does.
    full_window = Generator(model, tokenizer, "cpu", slide_keep=CONFIG.block_size)
    a = full_window.generate(PROMPTS[:2], max_new_tokens=n_new, temperature=0)
    b = reference_generate(model, tokenizer, PROMPTS[:2], max_new_tokens=n_new)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    # The default keeps half a context and refills the cache from there.
    half = Generator(model, tokenizer, "cpu")
    assert half.slide_keep == CONFIG.block_size // 2
    c = half.generate(PROMPTS[:2], max_new_tokens=n_new, temperature=0)
    assert all(s.completion_tokens == n_new for s in c)
    # Identical up to the first slide (a prompt of P tokens fills the context after block - P new ones).
    for s_full, s_half, prompt in zip(a, c, PROMPTS[:2]):
        first_slide = CONFIG.block_size - len(tokenizer.encode(prompt)) + 1
        assert s_half.token_ids[:first_slide] == s_full.token_ids[:first_slide]


# ---------------------------------------------------------------------------------------------
# Prompt lookup


def test_lookup_draft_continues_the_latest_longest_match() -> None:
    assert lookup_draft([1, 2, 3, 9, 8, 1, 2, 3], 2) == [9, 8]  # the 3-gram 1 2 3 seen before
    assert lookup_draft([1, 2, 3, 9, 8, 1, 2, 3], 7) == [9, 8, 1, 2, 3, 9, 8]  # and repeating after it
    assert lookup_draft([5, 3, 7, 2, 3, 6, 2, 3], 3) == [6, 2, 3]  # latest occurrence of "2 3" wins
    assert lookup_draft([4, 3, 9, 5, 2, 3], 5) == [9, 5, 2, 3, 9]  # falls back to the 1-gram "3"
    assert lookup_draft([7, 7, 7, 7], 10) == [7] * 10  # a loop goes on being predicted
    assert lookup_draft([1, 2, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert lookup_draft([1, 2, 3, 4], 5) == []  # nothing repeats
    assert lookup_draft([1, 2, 1], 0) == [] and lookup_draft([1], 4) == []


def test_guess_long_only_after_all_guesses_came_true() -> None:
    assert next_guess_count(0, 0, 15) == 2  # nothing guessed yet: probe
    assert next_guess_count(2, 2, 15) == 15  # every guess right: go long
    assert next_guess_count(15, 14, 15) == 2  # one wrong: back to probing
    assert next_guess_count(0, 0, 1) == 1  # never more than asked for


def test_prompt_lookup_proposer_probes_then_goes_long() -> None:
    context = [1, 2, 3, 4] * 4
    lookup = PromptLookup(max_guesses=6)
    assert lookup.propose(context, room=10) == [1, 2] and LOOKUP_PROBE == 2  # probe first
    lookup.accept(2)  # every guess right: go long
    assert lookup.propose(context, room=10) == [1, 2, 3, 4, 1, 2]
    assert lookup.propose(context, room=3) == [1, 2, 3]  # never more than the room left
    lookup.accept(1)  # one wrong: back to probing
    assert lookup.propose(context, room=10) == [1, 2]
    lookup.accept(2)
    assert lookup.propose([1, 2, 3], room=10) == []  # nothing repeats: nothing to guess
    lookup.accept(0)
    assert lookup.propose(context, room=10) == [1, 2]  # an empty proposal does not count as confirmed
    assert lookup.propose(context, room=0) == []
    assert PromptLookup(max_guesses=1).propose(context, room=10) == [1]
    with pytest.raises(ValueError):
        PromptLookup(max_guesses=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_lookup_gives_the_plain_greedy_tokens_in_fewer_passes(model: GPT, tokenizer, prompt: str) -> None:
    """Past the context too (the window slides three times), and whatever the number of guesses."""
    n_new = 3 * CONFIG.block_size
    gen = Generator(model, tokenizer, "cpu")
    counter = PassCounter(model)
    try:
        plain = gen.generate(prompt, max_new_tokens=n_new, temperature=0, prompt_lookup=0)[0]
        plain_passes, counter.calls = counter.calls, 0
        for guesses in (1, 4, 10):
            fast = gen.generate(prompt, max_new_tokens=n_new, temperature=0, prompt_lookup=guesses)[0]
            assert fast.token_ids == plain.token_ids and fast.completion == plain.completion
            assert fast.finish_reason == plain.finish_reason == "length"
        lookup_passes = counter.calls / 3
    finally:
        counter.restore()
    # this random model repeats itself, so most guesses are right and most passes are saved
    assert lookup_passes < 0.5 * plain_passes


def test_prompt_lookup_stops_at_end_of_text_and_streams_the_same_text(model: GPT, tokenizer) -> None:
    plain = Generator(model, tokenizer, "cpu").generate(PROMPTS[2], max_new_tokens=40, temperature=0,
                                                        prompt_lookup=0)[0]
    # Pretend the plain output's 20th token is <|endoftext|>: both decoders must stop before its first use.
    eot = plain.token_ids[19]
    eot_tok = copy.copy(tokenizer)
    eot_tok.eot_id = eot
    gen = Generator(model, eot_tok, "cpu")
    a = gen.generate(PROMPTS[2], max_new_tokens=40, temperature=0, prompt_lookup=0)[0]
    pieces: list[str] = []
    b = gen.generate(PROMPTS[2], max_new_tokens=40, temperature=0, prompt_lookup=8,
                     stream=lambda row, text, finished: pieces.append(text))[0]
    first = plain.token_ids.index(eot)
    assert a.token_ids == b.token_ids == plain.token_ids[:first]
    assert a.finish_reason == b.finish_reason == "eot"
    assert "".join(pieces) == b.completion


# ---------------------------------------------------------------------------------------------
# Long and batched prompts


def test_long_prompt_keeps_the_last_context_tokens_and_warns_once(model: GPT, tokenizer) -> None:
    long_text = " ".join(f"word{i}" for i in range(200))
    ids = tokenizer.encode(long_text)
    assert len(ids) > 3 * CONFIG.block_size
    warnings_seen: list[str] = []
    gen = Generator(model, tokenizer, "cpu", warn=warnings_seen.append)
    out = gen.generate([long_text, long_text + " more", "short"], max_new_tokens=10, temperature=0)
    assert len(warnings_seen) == 1 and "2 prompts are longer than the context of 32 tokens" in warnings_seen[0]
    assert out[0].prompt_truncated and out[1].prompt_truncated and not out[2].prompt_truncated
    assert out[0].prompt_tokens == len(ids) and out[0].completion_tokens == 10
    # The same as giving only the last block_size tokens (decoded back to text).
    tail = tokenizer.decode(ids[-CONFIG.block_size:])
    assert tokenizer.encode(tail) == ids[-CONFIG.block_size:]
    alone = gen.generate(tail, max_new_tokens=10, temperature=0)[0]
    assert alone.token_ids == out[0].token_ids
    assert len(warnings_seen) == 1
    with pytest.warns(UserWarning, match="longer than the context"):  # default: Python's warnings
        Generator(model, tokenizer, "cpu").generate(long_text, max_new_tokens=2, temperature=0)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=40, seed=11)])
def test_batched_prompts_match_each_prompt_alone(gen: Generator, sampling: dict) -> None:
    lengths = [len(gen.tokenizer.encode(p)) for p in PROMPTS]
    assert len(set(lengths)) == len(lengths)  # different lengths: rows are left-padded
    batched = gen.generate(PROMPTS, max_new_tokens=15, **sampling)
    for prompt, sample in zip(PROMPTS, batched):
        alone = gen.generate(prompt, max_new_tokens=15, **sampling)[0]
        assert sample.prompt == prompt
        assert sample.token_ids == alone.token_ids
    # Splitting the rows into smaller batches changes nothing either.
    assert [s.token_ids for s in gen.generate(PROMPTS, max_new_tokens=15, batch_size=3, **sampling)] == \
        [s.token_ids for s in batched]


def test_rows_stop_at_end_of_text_independently(model: GPT, tokenizer) -> None:
    base = Generator(model, tokenizer, "cpu").generate(PROMPTS, max_new_tokens=12, temperature=0)
    # Pretend a token that row 1 first writes at step k >= 2 is <|endoftext|>.
    ids = base[1].token_ids
    k = next(k for k in range(2, len(ids)) if ids.index(ids[k]) == k)
    stop = ids[k]
    eot_tok = copy.copy(tokenizer)
    eot_tok.eot_id = stop
    gen = Generator(model, eot_tok, "cpu")
    out = gen.generate(PROMPTS, max_new_tokens=12, temperature=0)
    plain = reference_generate(model, eot_tok, PROMPTS, max_new_tokens=12)
    for before, after, ref in zip(base, out, plain):
        assert after.token_ids == ref.token_ids
        if stop in before.token_ids:
            cut = before.token_ids.index(stop)
            assert after.finish_reason == "eot" and after.token_ids == before.token_ids[:cut]
        else:
            assert after.finish_reason == "length" and after.token_ids == before.token_ids
    assert out[1].completion_tokens == k
    assert len({s.finish_reason for s in out}) == 2  # some rows stopped early, others ran on


def test_stop_tokens(model: GPT, tokenizer) -> None:
    base = Generator(model, tokenizer, "cpu").generate(PROMPTS[2], max_new_tokens=20, temperature=0)[0]
    stop = base.token_ids[5]
    first = base.token_ids.index(stop)
    eot_tok = copy.copy(tokenizer)
    eot_tok.eot_id = stop  # pretend the model writes <|endoftext|> there
    gen = Generator(model, eot_tok, "cpu")
    cut = gen.generate(PROMPTS[2], max_new_tokens=20, temperature=0)[0]
    assert cut.token_ids == base.token_ids[:first] and cut.finish_reason == "eot"
    # stop_tokens=() runs every sample to max_new_tokens, through <|endoftext|>, with or without lookup.
    for lookup in (0, 8):
        full = gen.generate(PROMPTS[2], max_new_tokens=20, temperature=0, stop_tokens=(), prompt_lookup=lookup)[0]
        assert full.token_ids == base.token_ids and full.finish_reason == "length"
    sampled = gen.generate(PROMPTS, max_new_tokens=20, temperature=1.0, seed=2, num_samples=2, stop_tokens=())
    assert all(s.completion_tokens == 20 and s.finish_reason == "length" for s in sampled)
    # Any token can be a stop token; one that is not <|endoftext|> finishes with "stop".
    other = Generator(model, tokenizer, "cpu").generate(PROMPTS[2], max_new_tokens=20, temperature=0,
                                                        stop_tokens=[stop])[0]
    assert other.token_ids == base.token_ids[:first] and other.finish_reason == "stop"


def test_batch_state_drops_finished_rows_from_the_cache(model: GPT, tokenizer) -> None:
    gen = Generator(model, tokenizer, "cpu")

    def state(prompts: list[str], spare: int = 4) -> BatchState:
        return BatchState(model, gen._make_rows(prompts, 1, None), pad_id=tokenizer.eot_id,
                          cache_dtype=torch.float32, spare=spare, track_seen=True)

    lengths = [len(tokenizer.encode(p)) for p in PROMPTS[:3]]
    batch = state(PROMPTS[:3])
    width = max(lengths)
    assert batch.cache.batch_size == 3 and batch.pending.shape == (3, width)
    assert batch.pads.tolist() == [width - n for n in lengths] and batch.room == 4
    with torch.inference_mode():
        first = model.lm_head(batch.forward()[:, -1]).argmax(dim=-1)[:, None]  # (3, 1)
        batch.advance(first)
        for row, tok in zip(batch.rows, first[:, 0].tolist()):
            row.context.append(tok)
        batch.drop_finished([False, True, False])
        assert [row.prompt for row in batch.rows] == [PROMPTS[0], PROMPTS[2]]
        assert batch.cache.batch_size == 2 and batch.cache.length == width and batch.room == 3
        assert batch.pending.tolist() == first[[0, 2]].tolist()
        assert batch.pads.tolist() == [width - lengths[0], width - lengths[2]]
        for r, row in enumerate(batch.rows):
            assert set(torch.nonzero(batch.seen[r]).flatten().tolist()) == set(row.context)
        # The rows left decode on exactly as they would have alone.
        after = model.lm_head(batch.forward()[:, -1])
        for r, row in enumerate(batch.rows):
            alone = state([row.prompt])
            alone.rows[0].context.append(row.context[-1])
            alone.refill(CONFIG.block_size, spare=0)
            torch.testing.assert_close(after[r], model.lm_head(alone.forward()[0, -1]), atol=1e-4, rtol=0)
        batch.drop_finished([True, True])
    assert batch.rows == []


def test_empty_prompt_starts_a_document(gen: Generator) -> None:
    out = gen.generate("", max_new_tokens=5, temperature=0)[0]
    assert out.prompt_tokens == 0 and out.completion_tokens == 5


# ---------------------------------------------------------------------------------------------
# Seeds


def test_same_seed_same_text_and_the_global_rng_is_untouched(gen: Generator) -> None:
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=0, num_samples=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = gen.generate(PROMPTS[:2], seed=42, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    b = gen.generate(PROMPTS[:2], seed=42, **kwargs)
    c = gen.generate(PROMPTS[:2], seed=43, **kwargs)
    assert [s.completion for s in a] == [s.completion for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    assert len({tuple(s.token_ids) for s in a}) == len(a)  # samples differ from each other
    assert all(s.seed == 42 for s in a)
    # A sample does not depend on which other prompts or how many samples share its batch.
    assert gen.generate(PROMPTS[1], seed=42, **{**kwargs, "num_samples": 2})[1].token_ids == a[4].token_ids


def test_sample_seed_is_a_fixed_function() -> None:
    assert sample_seed(1, "x", 0) == sample_seed(1, "x", 0)
    assert len({sample_seed(1, "x", 0), sample_seed(2, "x", 0), sample_seed(1, "y", 0), sample_seed(1, "x", 1)}) == 4
    assert 0 <= sample_seed(2**62, "x" * 1000, 10**6) < 2**63


# ---------------------------------------------------------------------------------------------
# Sampling functions on hand-made distributions


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert kept(filter_logits(logits, top_k=2)) == [[1, 2], [0, 1]]
    assert kept(filter_logits(logits, top_k=1)) == [[1], [0]]
    assert kept(filter_logits(logits, top_k=0)) == [[0, 1, 2, 3, 4]] * 2  # 0 disables
    assert kept(filter_logits(logits, top_k=99)) == [[0, 1, 2, 3, 4]] * 2
    torch.testing.assert_close(filter_logits(logits, top_k=2)[0, [1, 2]], logits[0, [1, 2]])  # values kept as they are
    assert kept(filter_logits(torch.tensor([[2.0, 1.0, 2.0, 0.0]]), top_k=1)) == [[0, 2]]  # ties with the k-th stay


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # unsorted on purpose
    logits = probs.log()[None]
    assert kept(filter_logits(logits, top_p=0.4)) == [[1]]
    assert kept(filter_logits(logits, top_p=0.79)) == [[1, 3]]
    assert kept(filter_logits(logits, top_p=0.81)) == [[0, 1, 3]]
    assert kept(filter_logits(logits, top_p=0.96)) == [[0, 1, 2, 3]]
    assert kept(filter_logits(logits, top_p=1.0)) == [[0, 1, 2, 3]]
    assert kept(filter_logits(logits, top_p=1e-9)) == [[1]]  # the most likely token always stays
    # Both filters: top-k first, then the nucleus of the renormalised rest.
    assert kept(filter_logits(logits, top_k=3, top_p=0.79)) == [[1, 3]]
    assert kept(filter_logits(logits, top_k=2, top_p=0.99)) == [[1, 3]]


@given(st.lists(st.floats(-20, 20), min_size=1, max_size=30), st.floats(0.01, 1.0))
@example(values=[0.0, 16.0, 16.0], top_p=0.5)
def test_top_p_property(values: list[float], top_p: float) -> None:
    logits = torch.tensor([values], dtype=torch.float64)
    probs = torch.softmax(logits, -1)[0]
    keep = torch.isfinite(filter_logits(logits, top_p=top_p))[0]
    assert probs[keep].max() == probs.max()  # a most likely token stays (any one of a tie)
    # filter_logits works in fp32 (as sampling does), so allow fp32 rounding: with values
    # [0, 16, 16] and top_p 0.5 one of the tied tokens holds 0.49999994 and is enough there.
    assert probs[keep].sum() >= top_p - 1e-6 or keep.all()
    # Minimal: without its least likely member the kept set would hold less than top_p.
    assert probs[keep].sum() - probs[keep].min() < top_p + 1e-6
    assert (probs[~keep] <= probs[keep].min() + 1e-12).all()  # never drops a likelier token


def test_sampling_never_leaves_the_filtered_set() -> None:
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.79, generator=g)
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.04  # renormalised within the nucleus
    assert set(sample_next(logits, temperature=1.0, top_k=1, generator=g).tolist()) == {1}
    assert sample_next(logits[:3], temperature=0).tolist() == [1, 1, 1]  # greedy
    # Per-row generators: row i depends only on generator i.
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    again = [torch.Generator().manual_seed(s) for s in (1, 2)]
    flat = torch.zeros(2, 50)
    assert sample_next(flat, generator=gens).tolist() == sample_next(flat, generator=again).tolist()


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    cold = (sample_next(logits, temperature=0.25, generator=g) == 0).float().mean().item()
    warm = (sample_next(logits, temperature=4.0, generator=g) == 0).float().mean().item()
    assert cold > 0.95 and 0.35 < warm < 0.5


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = mark_seen(torch.zeros(1, 4, dtype=torch.bool), torch.tensor([[0, 1]]))
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert apply_repetition_penalty(logits, seen, 1.0) is logits
    # A strong enough penalty changes the greedy choice away from a repeated token.
    seen2 = mark_seen(torch.zeros(1, 4, dtype=torch.bool), torch.tensor([3]))
    assert sample_next(apply_repetition_penalty(logits, seen2, 2.0), temperature=0).item() == 0


def test_repetition_penalty_reduces_repeats(gen: Generator) -> None:
    plain = gen.generate(PROMPTS[0], max_new_tokens=30, temperature=0)[0].token_ids
    penalised = gen.generate(PROMPTS[0], max_new_tokens=30, temperature=0, repetition_penalty=100.0)[0].token_ids
    prompt_ids = set(gen.tokenizer.encode(PROMPTS[0]))
    assert len(set(penalised)) == len(penalised) and not prompt_ids & set(penalised)
    assert len(set(plain)) < len(plain)  # this random model repeats itself without the penalty


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(repetition_penalty=0.0), dict(max_new_tokens=0), dict(num_samples=0)])
def test_bad_settings_raise_config_error(gen: Generator, bad: dict) -> None:
    with pytest.raises(ConfigError):
        gen.generate("x", **bad)


# ---------------------------------------------------------------------------------------------
# Streaming


def test_stream_decoder_holds_back_split_characters(tokenizer) -> None:
    text = "naïve café 🙂 日本語 ok"
    ids = tokenizer.encode(text)
    dec = StreamDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some character really was split over tokens
    # A stray byte that never completes is printed (as U+FFFD) by flush.
    lone = tokenizer.encode("🙂")[:1]
    dec = StreamDecoder(tokenizer)
    assert dec.push(lone[0]) == "" and dec.flush() == tokenizer.decode(lone)


def test_streamed_text_equals_the_completions(gen: Generator) -> None:
    events: list[tuple[int, str, bool]] = []
    out = gen.generate(PROMPTS, max_new_tokens=20, temperature=1.0, seed=3, num_samples=2,
                       stream=lambda r, t, f: events.append((r, t, f)))
    for r, sample in enumerate(out):
        assert "".join(t for row, t, _ in events if row == r) == sample.completion
        assert [f for row, _, f in events if row == r].count(True) == 1
        assert [e for e in events if e[0] == r][-1][2]  # finished comes last


def test_ordered_printer_prints_rows_in_order() -> None:
    class Out:
        def __init__(self) -> None:
            self.parts: list[str] = []

        def write(self, s: str) -> None:
            self.parts.append(s)

        def flush(self) -> None:
            pass

    out = Out()
    p = OrderedPrinter(3, out, header=lambda r: f"<{r}>", footer=lambda r: f"</{r}>")
    for row, text, done in [(0, "a", False), (1, "x", False), (2, "m", False), (1, "y", True), (0, "b", False),
                            (2, "n", False), (0, "c", True), (2, "o", True)]:
        p(row, text, done)
    assert "".join(out.parts) == "<0>abc</0><1>xy</1><2>mno</2>"
    assert out.parts[:3] == ["<0>", "a", "b"]  # row 0 streamed live


# ---------------------------------------------------------------------------------------------
# The one-call API and precision


def test_one_call_api_matches_generator(model: GPT, tokenizer) -> None:
    import pocketlm
    from pocketlm.generate import generate

    a = generate(model, "Hello", tokenizer=tokenizer, max_new_tokens=5, temperature=0)
    b = Generator(model, tokenizer, "cpu").generate("Hello", max_new_tokens=5, temperature=0)
    assert a[0].token_ids == b[0].token_ids
    assert pocketlm.Generator is Generator
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, "Hello")


def test_bf16_autocast_generates(model: GPT, tokenizer) -> None:
    gen = Generator(model, tokenizer, "cpu", precision="bf16")
    out = gen.generate(PROMPTS[:2], max_new_tokens=6, temperature=0)
    assert [s.completion_tokens for s in out] == [6, 6]
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model: GPT, tokenizer) -> Path:
    from pocketlm.checkpoint import save_checkpoint, weights_state_dict

    out = tmp_path_factory.mktemp("gen-run")
    save_checkpoint(out, 1, weights_state_dict(model), tokenizer, {"model": dataclasses.asdict(CONFIG), "train": {}}, {})
    return out


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_output(checkpoint: Path, capsys: pytest.CaptureFixture, model: GPT, tokenizer) -> None:
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt", "The history of", "--json",
                             "--max-new-tokens", "7", "--num-samples", "2", "--seed", "9", "--device", "cpu")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    for i, obj in enumerate(lines):
        assert obj["prompt"] == "The history of" and obj["sample_index"] == i and obj["seed"] == 9
        assert obj["completion_tokens"] == 7 and obj["prompt_tokens"] == 3
        assert obj["tokens_per_second"] > 0 and obj["finish_reason"] == "length"
    # Same seed and flags: same text, the same as the Python API gives.
    again = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt", "The history of", "--json",
                    "--max-new-tokens", "7", "--num-samples", "2", "--seed", "9")[1]
    assert [json.loads(line)["completion"] for line in again.splitlines()] == [o["completion"] for o in lines]
    api = Generator(model, tokenizer, "cpu").generate("The history of", max_new_tokens=7, num_samples=2, seed=9,
                                                      temperature=0.8, top_k=50)
    assert [o["completion"] for o in lines] == [s.completion for s in api]


def test_cli_prompt_file_is_batched(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[:3]) + "\n\n", encoding="utf-8")  # a blank line is skipped
    assert read_prompt_file(prompt_file) == PROMPTS[:3]
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt-file", str(prompt_file), "--json",
                             "--temperature", "0", "--max-new-tokens", "8")
    assert code == 0, err
    batched = [json.loads(line) for line in out.splitlines()]
    assert [o["prompt"] for o in batched] == PROMPTS[:3]
    for obj in batched:
        code, single, _ = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt", obj["prompt"], "--json",
                                  "--temperature", "0", "--max-new-tokens", "8")
        assert json.loads(single)["completion"] == obj["completion"]


def test_cli_streams_text(checkpoint: Path, capsys: pytest.CaptureFixture, model: GPT, tokenizer) -> None:
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt", "Hello", "--temperature", "0",
                             "--max-new-tokens", "6")
    assert code == 0, err
    expected = Generator(model, tokenizer, "cpu").generate("Hello", max_new_tokens=6, temperature=0)[0]
    assert out == "Hello" + expected.completion + "\n"
    assert "6 tokens" in err and "tokens/s" in err
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt", "Hello", "--num-samples", "2",
                             "--max-new-tokens", "4", "--seed", "1")
    assert code == 0 and out.count("--- prompt 1, sample") == 2


def test_cli_default_prompt_without_a_terminal(checkpoint: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", open(__file__))  # not a terminal
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--max-new-tokens", "3", "--temperature", "0")
    assert code == 0, err
    assert out.startswith("The history of")


def test_cli_no_cache_gives_the_cached_output(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[:3]), encoding="utf-8")
    for sampling in (["--temperature", "0"], ["--seed", "4", "--num-samples", "2", "--repetition-penalty", "1.2"]):
        # 20 new tokens stay within the 32-token context, where no window has slid yet.
        args = ["--checkpoint", str(checkpoint), "--prompt-file", str(prompt_file), "--json", "--max-new-tokens",
                "20", "--batch-size", "2", *sampling]
        code, cached, err = run_cli(capsys, *args)
        assert code == 0, err
        code, plain, err = run_cli(capsys, *args, "--no-cache")
        assert code == 0, err
        completions = [[json.loads(line)["completion"] for line in out.splitlines()] for out in (cached, plain)]
        assert completions[0] == completions[1] and len(completions[0]) == 3 * (1 + (sampling[0] == "--seed"))


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--top-k", "-1"], ["--top-p", "0"], ["--top-p", "1.5"],
                                   ["--repetition-penalty", "0"], ["--max-new-tokens", "0"], ["--num-samples", "0"],
                                   ["--batch-size", "0"], ["--top-k", "many"], ["--prompt-lookup", "-1"]])
def test_cli_bad_flags_exit_2_with_one_line(checkpoint: Path, capsys: pytest.CaptureFixture, flags: list[str]) -> None:
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt", "x", *flags)
    assert code == 2
    assert err.startswith("pocketlm: error:") and len(err.strip().splitlines()) == 1


def test_cli_missing_prompt_file_and_checkpoint(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--prompt-file", str(tmp_path / "nope.txt"))
    assert code == 2 and "prompt file not found" in err
    code, _, err = run_cli(capsys, "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x")
    assert code == 2 and "checkpoint not found" in err and len(err.strip().splitlines()) == 1
    monkeypatch.chdir(tmp_path)  # no runs/gpt2-125m here
    code, _, err = run_cli(capsys, "--prompt", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no checkpoint in runs/gpt2-125m" in err and "python train.py" in err


def test_inference_py_without_a_checkpoint_says_how_to_train(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["inference.py"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "inference.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "python train.py" in err


def test_inference_py_uses_the_default_run_and_prompt(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "gpt2-125m"
    run_dir.parent.mkdir()
    run_dir.symlink_to(checkpoint, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["inference.py", "--max-new-tokens", "4", "--seed", "0"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "inference.py"), run_name="__main__")
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert captured.out.startswith("The history of")


def test_cli_interactive_loop(checkpoint: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                              model: GPT, tokenizer) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    typed = iter(["Hello", "   ", "The history of", "exit", "never read"])
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    code, out, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "5")
    assert code == 0, err
    gen = Generator(model, tokenizer, "cpu")
    expected = [p + gen.generate(p, max_new_tokens=5, temperature=0)[0].completion for p in ("Hello", "The history of")]
    assert out.splitlines() == expected
    assert next(typed) == "never read"  # `exit` ended the loop
