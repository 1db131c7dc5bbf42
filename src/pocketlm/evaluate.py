"""Held-out evaluation: one path for training-time validation and ``pocketlm eval``.

Both walk length-bucketed micro-batches in a fixed order through the model's hidden states and
the chunked output layer (``losses.chunked_token_nll``), so evaluating never holds more than
one chunk of logits: it costs no more memory than training.

``loss``/``ppl`` average over every predicted token, the closing ``<|endoftext|>`` of each
document included (as in training). ``bpb`` and ``word_ppl`` measure the text itself, so they
count only predictions of the text's own tokens: total NLL over the text's UTF-8 bytes, and
over its whitespace-separated words.

Two protocols score the same tokens (every token of the ``EOT d1 EOT d2 ... EOT`` stream but
the first) and differ in the context each prediction sees:

- per-document (``evaluate_documents``, the default): each document on its own, cut into pieces
  of the context length, as training sees it; a piece's first tokens see little context.
- sliding window (``evaluate_sliding``, ``pocketlm eval --stride N``): the protocol of Hugging
  Face's perplexity guide. The stream is read whole, documents joined by ``<|endoftext|>``;
  windows of the context length move by ``stride`` tokens, and each window scores only the
  tokens no earlier window scored, so each token is scored once and, after the first window,
  sees at least context - stride tokens of history. Smaller strides cost more passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pocketlm.batching import Batch, collate, epoch_batches
from pocketlm.data import ExampleSet, TokenStream, cached_token_stream, load_corpus, make_examples
from pocketlm.device import autocast
from pocketlm.errors import ConfigError, DataError
from pocketlm.losses import IGNORE_INDEX, chunked_token_nll
from pocketlm.model import GPT
from pocketlm.tokenizer import Tokenizer


@dataclass
class NLLTotals:
    """Summed NLL (nats) over all real targets, and over the text's own targets (closing EOTs left out)."""

    nll: float
    tokens: int
    text_nll: float

    @property
    def mean(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")


def _closing_targets(batch: Batch, examples: ExampleSet, closing_eot: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Which targets of a collated batch are a document's closing EOT (target j of example e sits at
    stream index starts[e] + 1 + j)."""
    is_closing = torch.zeros(shape, dtype=torch.bool)
    for r, row in enumerate(batch.rows):
        col = 0
        for ex, begin, end in row:
            idx = int(examples.starts[ex]) + 1 + np.arange(begin, end)
            is_closing[r, col:col + end - begin] = torch.from_numpy(closing_eot[idx])
            col += end - begin
    return is_closing


@torch.no_grad()
def evaluate_nll(model: GPT, examples: ExampleSet, *, batch_size: int, device: torch.device | str,
                 precision: str = "fp32", pad_id: int = 0, max_batches: int | None = None,
                 stream: TokenStream | None = None) -> NLLTotals:
    """Summed NLL of ``examples`` in length-bucketed micro-batches of ``batch_size`` x context tokens
    (at most ``max_batches``). With the ``stream`` they were cut from, also the NLL without the
    closing EOTs."""
    device = torch.device(device)
    closing_eot = None
    if stream is not None:
        closing_eot = np.zeros(len(stream.tokens) + 1, dtype=bool)
        closing_eot[stream.doc_starts[1:]] = True
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    text_nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = epoch_batches("bucket", examples.lengths, batch_size, model.config.block_size, seed=0, epoch=0)
    try:
        for batch in batches[:max_batches]:
            mb = collate(examples, batch, pad_id).to(device)
            with autocast(device, precision):
                hidden = model.hidden_states(mb.input_ids, position_ids=mb.position_ids, segment_ids=mb.segment_ids)
                per_token = chunked_token_nll(hidden, model.lm_head.weight, mb.targets).double()  # (B, T)
            nll += per_token.sum()
            if closing_eot is not None:
                closing = _closing_targets(batch, examples, closing_eot, tuple(mb.targets.shape)).to(device)
                text_nll += per_token.masked_fill(closing, 0.0).sum()
            count += mb.real_tokens
    finally:
        model.train(was_training)
    return NLLTotals(nll.item(), count, text_nll.item() if closing_eot is not None else float("nan"))


@dataclass(frozen=True)
class Window:
    """One pass of the sliding evaluation: inputs ``tokens[begin:begin + length]`` predict
    ``tokens[begin + 1:begin + length + 1]``; the predictions at positions ``skip`` and later are
    scored (earlier ones were scored by an earlier window). The prediction at position ``i`` sees
    ``i + 1`` tokens of context."""

    begin: int
    length: int
    skip: int


def check_stride(stride: int, context: int) -> None:
    """One line unless 1 <= stride <= context."""
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context:
        raise ConfigError(f"--stride must be a whole number from 1 to the model's context of {context} tokens; "
                          f"got {stride!r}")


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..n_tokens-1 of a stream once each: they start every
    ``stride`` tokens and are ``context`` long (the last may be shorter, as in Hugging Face's
    guide, rather than reaching back for more context)."""
    check_stride(stride, context)
    n_targets = n_tokens - 1  # token 0 is never predicted
    windows, begin, scored_until = [], 0, 0  # targets 1..scored_until are done
    while scored_until < n_targets:
        length = min(context, n_targets - begin)
        windows.append(Window(begin, length, scored_until - begin))
        scored_until = begin + length
        begin += stride
    return windows


@torch.no_grad()
def sliding_nll(model: GPT, stream: TokenStream, *, stride: int, batch_size: int, device: torch.device | str,
                precision: str = "fp32", pad_id: int = 0) -> NLLTotals:
    """Summed NLL of every token of ``stream`` but the first, each scored once in the window of
    ``sliding_windows``, ``batch_size`` windows per pass; also the sum without the closing EOTs."""
    device = torch.device(device)
    tokens = torch.from_numpy(np.asarray(stream.tokens, dtype=np.int64))
    closing_eot = torch.zeros(len(tokens), dtype=torch.bool)
    closing_eot[torch.from_numpy(np.asarray(stream.doc_starts[1:], dtype=np.int64))] = True
    windows = sliding_windows(len(tokens), model.config.block_size, stride)
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    text_nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for first in range(0, len(windows), batch_size):
            group = windows[first:first + batch_size]
            width = max(w.length for w in group)
            inputs = torch.full((len(group), width), pad_id, dtype=torch.int64)
            targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.int64)
            closing = torch.zeros((len(group), width), dtype=torch.bool)
            for r, w in enumerate(group):  # right padding: causal attention keeps it out of every real row
                inputs[r, :w.length] = tokens[w.begin:w.begin + w.length]
                scored = slice(w.begin + w.skip + 1, w.begin + w.length + 1)
                targets[r, w.skip:w.length] = tokens[scored]
                closing[r, w.skip:w.length] = closing_eot[scored]
            inputs, targets, closing = inputs.to(device), targets.to(device), closing.to(device)
            keep = targets != IGNORE_INDEX
            with autocast(device, precision):
                hidden = model.hidden_states(inputs)
                # only the scored positions go through the output layer: with a small stride most are not
                per_token = chunked_token_nll(hidden[keep], model.lm_head.weight, targets[keep]).double()
            nll += per_token.sum()
            text_nll += per_token.masked_fill(closing[keep], 0.0).sum()
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return NLLTotals(nll.item(), count, text_nll.item())


PER_DOCUMENT = "per-document"


def sliding_protocol(stride: int) -> str:
    return f"sliding-window stride {stride}"


@dataclass
class EvalReport:
    loss: float
    ppl: float
    bpb: float
    word_ppl: float | None
    tokens: int
    bytes: int
    words: int
    protocol: str = PER_DOCUMENT
    """How the tokens were given their context: per-document, or sliding-window stride N."""

    def as_dict(self) -> dict:
        return asdict(self)


def _report(totals: NLLTotals, docs: list[str], wikitext: bool, protocol: str) -> EvalReport:
    loss = totals.mean
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    return EvalReport(loss=loss, ppl=math.exp(min(loss, 50)), bpb=totals.text_nll / (math.log(2) * n_bytes),
                      word_ppl=math.exp(min(totals.text_nll / n_words, 50)) if wikitext and n_words else None,
                      tokens=totals.tokens, bytes=n_bytes, words=n_words, protocol=protocol)


def evaluate_documents(model: GPT, tokenizer: Tokenizer, docs: list[str], *, wikitext: bool,
                       batch_size: int = 4, device: torch.device | str = "cpu", precision: str = "fp32",
                       cache_dir: Path | None = None) -> EvalReport:
    """Loss, perplexity, bits per byte and (for WikiText) word-level perplexity of ``docs``, each
    document scored on its own (no context from the one before)."""
    if not any(d.strip() for d in docs):
        raise DataError("nothing to evaluate: the selected split is empty")
    stream = cached_token_stream(docs, tokenizer, cache_dir)
    examples = make_examples(stream, model.config.block_size)
    totals = evaluate_nll(model, examples, batch_size=batch_size, device=device, precision=precision,
                          pad_id=tokenizer.eot_id, stream=stream)
    return _report(totals, docs, wikitext, PER_DOCUMENT)


def evaluate_sliding(model: GPT, tokenizer: Tokenizer, docs: list[str], *, stride: int, wikitext: bool,
                     batch_size: int = 4, device: torch.device | str = "cpu", precision: str = "fp32",
                     cache_dir: Path | None = None) -> EvalReport:
    """The figures of ``evaluate_documents`` under the sliding-window protocol: ``docs`` read as
    one stream, windows of the context length every ``stride`` tokens (1 <= stride <= context)."""
    check_stride(stride, model.config.block_size)  # before any tokenizing
    if not any(d.strip() for d in docs):
        raise DataError("nothing to evaluate: the selected split is empty")
    stream = cached_token_stream(docs, tokenizer, cache_dir)
    totals = sliding_nll(model, stream, stride=stride, batch_size=batch_size, device=device, precision=precision,
                         pad_id=tokenizer.eot_id)
    return _report(totals, docs, wikitext, sliding_protocol(stride))


def choose_split(spec: str, split: str, val_fraction: float = 0.1) -> tuple[list[str], bool, str]:
    """Documents to evaluate: ``auto`` is the test split when the source has one, else validation."""
    corpus = load_corpus(spec, val_fraction)
    if split == "auto":
        split = "test" if "test" in corpus.splits else "validation"
    if split == "all":
        docs = [d for name in ("train", "validation", "test") for d in corpus.splits.get(name, [])]
    elif split in corpus.splits:
        docs = corpus.splits[split]
    else:
        raise DataError(f"{corpus.description} has no {split!r} split (it has: {', '.join(corpus.splits)})")
    return docs, corpus.wikitext, split
