"""Held-out evaluation: one path for training-time validation and ``pocketlm eval``.

Both walk length-bucketed micro-batches in a fixed order through the model's hidden states and
the chunked output layer (``losses.chunked_token_nll``), so evaluating never holds more than
one chunk of logits: it costs no more memory than training.

``loss``/``ppl`` average over every predicted token, the closing ``<|endoftext|>`` of each
document included (as in training). ``bpb`` and ``word_ppl`` measure the text itself, so they
count only predictions of the text's own tokens: total NLL over the text's UTF-8 bytes, and
over its whitespace-separated words.
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
from pocketlm.errors import DataError
from pocketlm.losses import chunked_token_nll
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


@dataclass
class EvalReport:
    loss: float
    ppl: float
    bpb: float
    word_ppl: float | None
    tokens: int
    bytes: int
    words: int

    def as_dict(self) -> dict:
        return asdict(self)


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
    loss = totals.mean
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    return EvalReport(loss=loss, ppl=math.exp(min(loss, 50)), bpb=totals.text_nll / (math.log(2) * n_bytes),
                      word_ppl=math.exp(min(totals.text_nll / n_words, 50)) if wikitext and n_words else None,
                      tokens=totals.tokens, bytes=n_bytes, words=n_words)


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
