"""benchmarks/tokenizers_bpb.py's report: the verdict names the tokenizer with fewer bits per byte."""

from __future__ import annotations

import _common as common  # benchmarks/ is on sys.path (conftest.py)
import tokenizers_bpb


def fake_result(gpt2_bpb: float, own_bpb: float) -> dict:
    def run(vocab: int, bpb: float) -> dict:
        return {"tokenizer_vocab": vocab, "model_vocab": vocab, "n_params": 1_000_000, "tokens_seen": 307_200,
                "train_bytes_seen": 1_300_000, "train_seconds": 60.0, "held_out_token_loss": 5.0,
                "held_out_bpb": bpb, "bytes_per_token": {"train": 4.3, "held_out": 4.5}}

    runs = {"gpt2": run(50257, gpt2_bpb), "own": run(8192, own_bpb)}
    return {"benchmark": "tokenizers_bpb", "date": "2026-01-01 00:00 UTC", "command": "python benchmarks/x.py",
            "machine": common.machine_info("cpu"), "load_average": {"before": 0.1, "after": 0.2}, "runtime_s": 400.0,
            "preset": "tiny", "steps": 150, "batch_size": 4, "grad_accum": 4, "lr": 2e-3, "seed": 1,
            "precision": "fp32",
            "vocab_size": 8192, "bpe_train_seconds": 0.8, "train_articles": 54, "held_out_articles": 6,
            "runs": runs, "winner": "own" if own_bpb < gpt2_bpb else "gpt2"}


def test_the_verdict_follows_the_bits_per_byte() -> None:
    own_wins = tokenizers_bpb.docs_section(fake_result(2.0, 1.5))
    assert own_wins.startswith(tokenizers_bpb.SECTION + "\n")
    assert "the own 8,192-token BPE wins: 1.5000 bits per byte on the held-out articles against 2.0000, 25.0% fewer" \
        in own_wins
    gpt2_wins = tokenizers_bpb.docs_section(fake_result(1.6, 2.0))
    assert "GPT-2's 50,257-token BPE wins: 1.6000 bits per byte on the held-out articles against 2.0000, 20.0% fewer" \
        in gpt2_wins
    assert "| **1.6000** |" in gpt2_wins and "6.1x smaller" in gpt2_wins


def test_defaults_keep_the_run_short() -> None:
    args = tokenizers_bpb.parse_args([])
    assert (args.steps, args.vocab_size, args.precision, args.preset) == (200, 8192, "fp32", "tiny")
