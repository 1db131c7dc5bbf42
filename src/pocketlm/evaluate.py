"""Held-out evaluation: loss, token perplexity, bits per byte and WikiText word-level perplexity.

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
import torch.nn.functional as F

from pocketlm.batching import collate, epoch_batches
from pocketlm.data import cached_token_stream, load_corpus, make_examples
from pocketlm.device import autocast
from pocketlm.errors import DataError
from pocketlm.model import GPT, IGNORE_INDEX
from pocketlm.tokenizer import Tokenizer


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


@torch.no_grad()
def evaluate_documents(model: GPT, tokenizer: Tokenizer, docs: list[str], *, wikitext: bool,
                       batch_size: int = 4, device: torch.device | str = "cpu", precision: str = "fp32",
                       cache_dir: Path | None = None) -> EvalReport:
    if not any(d.strip() for d in docs):
        raise DataError("nothing to evaluate: the selected split is empty")
    device = torch.device(device)
    stream = cached_token_stream(docs, tokenizer, cache_dir)
    examples = make_examples(stream, model.config.block_size)
    closing_eot = np.zeros(len(stream.tokens) + 1, dtype=bool)
    closing_eot[stream.doc_starts[1:]] = True
    model.eval()
    nll_all = torch.zeros((), dtype=torch.float64, device=device)
    nll_text = torch.zeros((), dtype=torch.float64, device=device)
    n_all = 0
    for batch in epoch_batches("bucket", examples.lengths, batch_size, model.config.block_size, seed=0, epoch=0):
        mb = collate(examples, batch, tokenizer.eot_id)
        # Which targets are a document's closing EOT: target j of example e sits at stream index starts[e]+1+j.
        is_closing = torch.zeros_like(mb.targets, dtype=torch.bool)
        for r, row in enumerate(batch.rows):
            col = 0
            for ex, begin, end in row:
                idx = int(examples.starts[ex]) + 1 + np.arange(begin, end)
                is_closing[r, col:col + end - begin] = torch.from_numpy(closing_eot[idx])
                col += end - begin
        mb = mb.to(device)
        with autocast(device, precision):
            logits = model(mb.input_ids, position_ids=mb.position_ids, segment_ids=mb.segment_ids)
        nll = F.cross_entropy(logits.float().transpose(1, 2), mb.targets, ignore_index=IGNORE_INDEX,
                              reduction="none").double()  # (B, T), zero on padding
        nll_all += nll.sum()
        nll_text += nll.masked_fill(is_closing.to(device), 0.0).sum()
        n_all += mb.real_tokens
    loss = nll_all.item() / n_all
    text_nll = nll_text.item()
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    return EvalReport(loss=loss, ppl=math.exp(min(loss, 50)), bpb=text_nll / (math.log(2) * n_bytes),
                      word_ppl=math.exp(min(text_nll / n_words, 50)) if wikitext and n_words else None,
                      tokens=n_all, bytes=n_bytes, words=n_words)


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
