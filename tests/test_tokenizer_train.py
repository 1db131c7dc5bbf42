"""Your own tokenizer: training a byte-level BPE, reading tokenizer folders, the model's vocabulary
following the tokenizer (rounded up to 64), and the whole path: tokenizer train -> train -> generate
-> eval -> export -> AutoTokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketlm.checkpoint import latest_checkpoint, load_checkpoint
from pocketlm.config import build_train_config
from pocketlm.data import load_corpus
from pocketlm.errors import DataError
from pocketlm.tokenizer import (EOT, MIN_BPE_VOCAB, TOKENIZER_FILE, Tokenizer, bytes_per_token, gpt2_tokenizer,
                                load_tokenizer_dir, padded_vocab_size, save_new_tokenizer, train_bpe)
from pocketlm.train import open_run
from test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_RUN = ["--preset", "tiny", "--batch-size", "2", "--grad-accum", "1", "--precision", "fp32", "--device", "cpu",
             "--eval-batches", "2", "--log-interval", "1", "--seed", "5", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def small_bpe(wiki_articles: list[str]) -> Tokenizer:
    """A 300-token BPE (fast to train, and not a multiple of 64)."""
    return train_bpe(wiki_articles[:6], 300)


@pytest.fixture
def small_bpe_dir(small_bpe: Tokenizer, tmp_path: Path) -> Path:
    save_new_tokenizer(small_bpe, tmp_path / "tok300")
    return tmp_path / "tok300"


def test_vocab_rounds_up_to_a_multiple_of_64() -> None:
    assert padded_vocab_size(8192) == 8192
    assert padded_vocab_size(8200) == 8256
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(300) == 320
    assert padded_vocab_size(1) == 64


def test_trained_bpe_is_byte_level_like_gpt2s(small_bpe: Tokenizer) -> None:
    assert small_bpe.vocab_size == 300
    assert small_bpe.eot_id == 0 and small_bpe.encode(EOT) == [0]
    assert small_bpe.encode("a" + EOT + "b") == [small_bpe.encode("a")[0], 0, small_bpe.encode("b")[0]]
    assert small_bpe.identity.startswith("bpe:")
    # learned merges: common English takes fewer tokens than bytes
    assert len(small_bpe.encode(" the game of the year")) < len(" the game of the year")


@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120).filter(lambda s: EOT not in s))
def test_trained_bpe_round_trips_any_text(small_bpe: Tokenizer, text: str) -> None:
    """Every byte is a token, so text the tokenizer never saw (any script, emoji, control
    characters) encodes and decodes back exactly."""
    assert small_bpe.decode(small_bpe.encode(text)) == text


def test_bpe_training_refusals() -> None:
    with pytest.raises(DataError, match=f"at least {MIN_BPE_VOCAB}"):
        train_bpe(["some text"], 256)
    with pytest.raises(DataError, match="no text"):
        train_bpe(["  ", "\n"], 1000)


def test_tokenizer_folder_round_trip_keeps_the_identity(small_bpe: Tokenizer, small_bpe_dir: Path) -> None:
    loaded = load_tokenizer_dir(small_bpe_dir)
    assert loaded.identity == small_bpe.identity
    assert load_tokenizer_dir(small_bpe_dir / TOKENIZER_FILE).identity == small_bpe.identity  # the file itself
    with pytest.raises(DataError, match="already exists"):
        save_new_tokenizer(small_bpe, small_bpe_dir)  # never overwritten


def test_hugging_face_vocab_and_merges_files_load_as_gpt2(gpt2_bpe_dir: Path, tmp_path: Path) -> None:
    """A Hugging Face GPT-2 folder without tokenizer.json: vocab.json + merges.txt, the same format as
    OpenAI's encoder.json + vocab.bpe."""
    shutil.copy(gpt2_bpe_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_bpe_dir / "vocab.bpe", tmp_path / "merges.txt")
    tok = load_tokenizer_dir(tmp_path)
    assert tok.encode("Hello world") == [15496, 995] and tok.eot_id == 50256 and tok.vocab_size == 50257


def test_tokenizer_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_tokenizer_dir(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer_dir(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{broken", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer_dir(tmp_path)


def test_tokenizer_train_reads_only_the_training_split(capsys, tmp_path, corpus_file, monkeypatch) -> None:
    """The tokenizer learns from exactly the documents training sees, never the held-out ones."""
    import pocketlm.tokenizer as tokenizer_module

    seen: list[list[str]] = []
    real = tokenizer_module.train_bpe
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda docs, n: seen.append(list(docs)) or real(docs, n))
    code, out, err = run_cli(capsys, "tokenizer", "train", "--data", corpus_file, "--vocab-size", "400",
                             "--out", tmp_path / "tok", "--val-fraction", "0.25")
    assert code == 0, err
    corpus = load_corpus(str(corpus_file), 0.25)
    assert seen == [corpus.splits["train"]]
    assert not set(corpus.splits["validation"]) & set(seen[0])
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["vocab_size"] == 400 and summary["train_documents"] == len(corpus.splits["train"])
    assert load_tokenizer_dir(tmp_path / "tok").vocab_size == 400


def test_tokenizer_train_errors_are_one_line(capsys, tmp_path, corpus_file, small_bpe_dir) -> None:
    code, _, err = run_cli(capsys, "tokenizer", "train", "--data", corpus_file, "--vocab-size", "100",
                           "--out", tmp_path / "tok")
    assert_one_line_error(code, err, "at least 257")
    code, _, err = run_cli(capsys, "tokenizer", "train", "--data", corpus_file, "--vocab-size", "400",
                           "--out", small_bpe_dir)
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_cli(capsys, "tokenizer", "train", "--data", tmp_path / "missing.txt", "--vocab-size", "400",
                           "--out", tmp_path / "tok")
    assert_one_line_error(code, err, "not found")
    code, _, err = run_cli(capsys, "tokenizer", "train", "--data", corpus_file, "--vocab-size", "400",
                           "--out", tmp_path / "tok", "--val-fraction", "1.5")
    assert_one_line_error(code, err, "--val-fraction")
    assert not (tmp_path / "tok").exists()


def test_model_vocabulary_follows_the_tokenizer(capsys, tmp_path, corpus_file, small_bpe_dir) -> None:
    """300 tokens -> 320 embedding rows; an explicit --vocab-size wins if it fits; a smaller one is
    refused in one line."""
    shape = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}
    settings = dict(preset="tiny", data=str(corpus_file), tokenizer=str(small_bpe_dir), device="cpu",
                    precision="fp32", compile=False, out_dir=str(tmp_path / "run"))
    rounded = open_run(build_train_config(None, **settings, **shape))
    assert rounded.cfg.model_config().vocab_size == 320 and rounded.state.model.lm_head.weight.size(0) == 320
    assert rounded.tokenizer.identity == load_tokenizer_dir(small_bpe_dir).identity
    assert rounded.record["train"]["model"]["vocab_size"] == 320  # recorded, so a resume compares it
    assert any("300 tokens; the model's vocabulary has 320 rows (rounded up" in note for note in rounded.notes)
    exact = open_run(build_train_config(None, **settings, **shape, vocab_size=300))
    assert exact.cfg.model_config().vocab_size == 300
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    code, _, err = run_cli(capsys, "train", *SMALL_RUN, *tiny, "--data", corpus_file, "--tokenizer", small_bpe_dir,
                           "--vocab-size", "299", "--out-dir", tmp_path / "small")
    assert_one_line_error(code, err, "vocab_size 299 is smaller than the tokenizer's 300")
    code, _, err = run_cli(capsys, "train", *SMALL_RUN, *tiny, "--data", corpus_file, "--tokenizer",
                           tmp_path / "no-such-dir", "--out-dir", tmp_path / "none")
    assert_one_line_error(code, err, "tokenizer folder not found")


def test_a_changed_tokenizer_folder_cannot_resume_its_run(capsys, tmp_path, corpus_file, small_bpe_dir,
                                                          wiki_articles) -> None:
    args = ["train", *SMALL_RUN, "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
            "--max-steps", "1", "--data", corpus_file, "--tokenizer", small_bpe_dir, "--out-dir", tmp_path / "run"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args)  # the same command again: the finished run, as it was
    assert code == 0 and "already complete" in err, err
    (small_bpe_dir / TOKENIZER_FILE).write_text(train_bpe(wiki_articles[6:9], 300).backend.to_str(), encoding="utf-8")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "not the one the run", "trained with")


def test_own_tokenizer_end_to_end(capsys, tmp_path, wiki_valid_path) -> None:
    """An 8,192-token BPE learned from the first 90% of WikiText-2's validation articles; `tiny`
    trained a few steps with it; then generate, eval and export, and the export read back by
    transformers' AutoTokenizer and AutoModelForCausalLM."""
    transformers = pytest.importorskip("transformers")
    import torch

    tok_dir, run, hf_dir = tmp_path / "tok8k", tmp_path / "run", tmp_path / "hf"
    code, out, err = run_cli(capsys, "tokenizer", "train", "--data", wiki_valid_path, "--vocab-size", "8192",
                             "--out", tok_dir)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["vocab_size"] == 8192 and summary["train_documents"] == 54  # 60 articles, 10% held out
    assert 3.0 < summary["held_out_bytes_per_token"] < summary["gpt2_held_out_bytes_per_token"]

    code, _, err = run_cli(capsys, "train", *SMALL_RUN, "--data", wiki_valid_path, "--tokenizer", tok_dir,
                           "--max-steps", "3", "--out-dir", run)
    assert code == 0, err
    ckpt = load_checkpoint(run)
    tokenizer = load_tokenizer_dir(tok_dir)
    assert ckpt.model_config.vocab_size == 8192 and ckpt.tokenizer.identity == tokenizer.identity
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["train_tokens"] > 0 and start["config"]["train"]["dataset"]["tokenizer"] == str(tok_dir)
    # the token cache holds this tokenizer's ids: below 8192, and a different count from GPT-2's
    gpt2_ids = gpt2_tokenizer().encode_batch(load_corpus(str(wiki_valid_path)).splits["train"])
    assert start["train_tokens"] != sum(len(ids) + 1 for ids in gpt2_ids)

    code, out, err = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", "The game", "--max-new-tokens",
                             "8", "--temperature", "0", "--json")
    assert code == 0, err
    sample = json.loads(out.strip().splitlines()[-1])
    assert sample["completion_tokens"] >= 1 and sample["prompt_tokens"] == len(tokenizer.encode("The game"))

    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", wiki_valid_path)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["tokens"] > 0 and 0 < report["bpb"] < 20

    code, out, err = run_cli(capsys, "export", run, hf_dir)
    assert code == 0, err
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "The game's \u201cdesign\u201d  was  praised , in 2011 ."
    assert hf_tok(text).input_ids == tokenizer.encode(text)
    assert hf_tok.decode(hf_tok(text).input_ids) == text
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == tokenizer.eot_id == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tokenizer.encode("The game")])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.eot_id)
    # the same greedy tokens; transformers keeps a final <|endoftext|>, pocketlm stops before it
    assert hf_tok.decode(generated[0, ids.size(1):], skip_special_tokens=True) == sample["completion"]
    assert bytes_per_token(tokenizer, ["The game"]) == len(b"The game") / ids.size(1)
    assert latest_checkpoint(run).name == "step-00000003"
