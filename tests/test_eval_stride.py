"""Sliding-window evaluation (``pocketlm eval --stride N``): every token scored once, each with at
least context - stride tokens of history, the same numbers as a token-by-token reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_EOT, SMALL_VOCAB, synthetic_stream
from pocketlm.cli import main
from pocketlm.config import ModelConfig, build_train_config
from pocketlm.errors import ConfigError
from pocketlm.evaluate import (check_stride, evaluate_documents, evaluate_sliding, sliding_nll, sliding_windows)
from pocketlm.model import GPT
from pocketlm.train import train

CONTEXT = 16


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT, vocab_size=SMALL_VOCAB,
                           dropout=0.0)).eval()


@pytest.fixture(scope="module")
def stream():
    return synthetic_stream([30, 0, 7, 41, 12, 19], seed=3)  # 115 tokens: several windows, an empty document


@pytest.mark.parametrize("n_tokens, stride", [(2, 1), (10, 4), (16, 16), (17, 16), (18, 16), (100, 1), (100, 5),
                                              (100, 15), (100, 16), (97, 7)])
def test_windows_score_every_token_once_with_enough_history(n_tokens, stride):
    scored = []
    for w in sliding_windows(n_tokens, CONTEXT, stride):
        assert w.begin % stride == 0 and 1 <= w.length <= CONTEXT and 0 <= w.skip < w.length
        assert w.begin + w.length <= n_tokens - 1  # never reads past the last target
        for position in range(w.skip, w.length):
            target = w.begin + position + 1
            history = position + 1  # tokens w.begin .. target - 1
            if target > CONTEXT:  # beyond the first window's reach
                assert history >= CONTEXT - stride
            scored.append(target)
    assert scored == list(range(1, n_tokens))  # each token but the first, once, in order


def _history_start(target: int, stride: int) -> int:
    """Where the HF guide's window scoring ``target`` begins, in closed form: the first window
    scores targets 1..CONTEXT, window k (starting at k * stride) the next ``stride``."""
    return 0 if target <= CONTEXT else math.ceil((target - CONTEXT) / stride) * stride


def _reference(model: GPT, stream, stride: int) -> tuple[float, float, int]:
    """Token by token: each target's whole window recomputed, only its last prediction kept."""
    tokens = torch.as_tensor(stream.tokens.astype("int64"))
    closing = set(int(i) for i in stream.doc_starts[1:])
    nll = text_nll = 0.0
    with torch.no_grad():
        for target in range(1, len(tokens)):
            begin = _history_start(target, stride)
            logits = model(tokens[begin:target][None])[0, -1].double()
            loss = -F.log_softmax(logits, dim=-1)[tokens[target]].item()
            nll += loss
            text_nll += 0.0 if target in closing else loss
    return nll, text_nll, len(tokens) - 1


@pytest.mark.parametrize("stride", [1, 5, CONTEXT])
def test_sliding_window_equals_a_token_by_token_reference(model, stream, stride):
    got = sliding_nll(model, stream, stride=stride, batch_size=3, device="cpu", pad_id=SMALL_EOT)
    nll, text_nll, count = _reference(model, stream, stride)
    assert got.tokens == count
    assert got.mean == pytest.approx(nll / count, abs=1e-5)
    assert got.text_nll / count == pytest.approx(text_nll / count, abs=1e-5)  # closing EOTs left out
    assert text_nll < nll


def test_stride_equal_to_context_scores_non_overlapping_chunks(model, stream):
    tokens = torch.as_tensor(stream.tokens.astype("int64"))
    total = 0.0
    with torch.no_grad():
        for begin in range(0, len(tokens) - 1, CONTEXT):
            chunk = tokens[begin:begin + CONTEXT + 1]
            logits = model(chunk[None, :-1])[0].double()
            total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
    got = sliding_nll(model, stream, stride=CONTEXT, batch_size=4, device="cpu", pad_id=SMALL_EOT)
    assert got.mean == pytest.approx(total / (len(tokens) - 1), abs=1e-5)


def test_smaller_stride_gives_more_history_so_a_different_loss(model, stream):
    a = sliding_nll(model, stream, stride=CONTEXT, batch_size=4, device="cpu", pad_id=SMALL_EOT)
    b = sliding_nll(model, stream, stride=4, batch_size=4, device="cpu", pad_id=SMALL_EOT)
    assert a.tokens == b.tokens and abs(a.mean - b.mean) > 1e-4  # same tokens, other contexts


@pytest.mark.parametrize("stride", [0, -1, CONTEXT + 1, 2.5, True])
def test_bad_stride_is_refused_in_one_line(stride):
    with pytest.raises(ConfigError, match="--stride must be a whole number from 1 to the model's context of 16"):
        check_stride(stride, CONTEXT)


def test_report_counts_the_same_tokens_as_per_document(tokenizer, wiki_articles):
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.vocab_size,
                          dropout=0.0)).eval()
    docs = [wiki_articles[0][:1500], wiki_articles[1][:900]]
    per_doc = evaluate_documents(gpt, tokenizer, docs, wikitext=True)
    sliding = evaluate_sliding(gpt, tokenizer, docs, stride=32, wikitext=True, batch_size=8)
    assert sliding.protocol == "sliding-window stride 32" and per_doc.protocol == "per-document"
    assert (sliding.tokens, sliding.bytes, sliding.words) == (per_doc.tokens, per_doc.bytes, per_doc.words)
    # bits per byte and word perplexity come from the same text NLL
    text_nll = sliding.bpb * math.log(2) * sliding.bytes
    assert math.log(sliding.word_ppl) == pytest.approx(text_nll / sliding.words, rel=1e-9)
    # one document inside one window: both protocols give it the same context
    short = [wiki_articles[2][:120]]
    assert evaluate_sliding(gpt, tokenizer, short, stride=7, wikitext=True).loss == \
        pytest.approx(evaluate_documents(gpt, tokenizer, short, wikitext=True).loss, abs=1e-5)


def test_eval_cli_says_which_protocol_it_used(capsys, tmp_path, corpus_file):
    cfg = build_train_config(None, preset="tiny", model={"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
                             data=str(corpus_file), out_dir=str(tmp_path / "run"), max_steps=1, batch_size=1,
                             grad_accum=1, eval_batches=1, precision="fp32", device="cpu", compile=False)
    train(cfg, show_progress=False)
    capsys.readouterr()
    common = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus_file), "--device", "cpu"]

    assert main([*common, "--stride", "8"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["protocol"] == "sliding-window stride 8"
    assert "protocol: sliding window of 32 tokens, stride 8" in captured.err

    assert main(common) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"] == "per-document"

    assert main([*common, "--stride", "33"]) == 2
    err = capsys.readouterr().err
    assert err.count("pocketlm: error: ") == 1 and "--stride must be" in err and "Traceback" not in err
