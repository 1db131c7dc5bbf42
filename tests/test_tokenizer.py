"""GPT-2 byte-level BPE: known ids, exact round trips, identity, save/load."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketlm.errors import DataError
from pocketlm.tokenizer import (EOT, GPT2_FILE_SHA256, TOKENIZER_FILE, Tokenizer, build_gpt2_backend,
                                get_tokenizer, gpt2_tokenizer, gpt2_vocab_files)


def test_hello_world(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_end_of_text_and_vocab_size(tokenizer: Tokenizer) -> None:
    assert tokenizer.eot_id == 50256
    assert tokenizer.vocab_size == 50257
    assert tokenizer.encode(EOT) == [50256]
    assert tokenizer.decode([50256]) == EOT
    assert tokenizer.encode("a" + EOT + "b") == [64, 50256, 65]


def test_get_tokenizer(tokenizer: Tokenizer) -> None:
    assert get_tokenizer("gpt2") is gpt2_tokenizer()
    with pytest.raises(DataError, match="unknown tokenizer"):
        get_tokenizer("nope")


def test_whole_wikitext_valid_round_trip(tokenizer: Tokenizer, wiki_valid_path: Path) -> None:
    raw = wiki_valid_path.read_bytes()
    ids = tokenizer.encode(raw.decode("utf-8"))
    assert len(ids) == 249_887
    assert tokenizer.decode(ids).encode("utf-8") == raw  # byte-exact


def test_encode_batch_matches_encode(tokenizer: Tokenizer) -> None:
    texts = ["Hello world", " leading", "", "emoji 🙂 and ünïcödé", EOT + "x"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("text", [
    "naïve café — “quotes” and ‘apostrophes’",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji: 🙂👍🏽👨‍👩‍👧‍👦 flags 🇳🇿",
    "windows\r\nline\r\nendings\r\n",
    "   three leading spaces",
    " one leading space and trailing   ",
    "\ttabs\tinside\t\tand\n\n\nnewlines",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
    "control \x00 \x01 \x7f chars",
    "combining e\u0301 vs \u00e9",
    "<|endoftext",
    "",
])
def test_round_trip_odd_text(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


# Arbitrary Unicode, with whitespace, digits and emoji over-represented (GPT-2's pre-tokenizer
# regex treats them specially).
# Lone surrogates are not text (no UTF-8 encoding): they get a DataError, tested below.
_chars = st.one_of(st.characters(blacklist_categories=("Cs",)),
                   st.sampled_from(list(" \t\r\n\x0b\x0c\u00a0\u3000'0123456789🙂é<|>")))


@given(st.text(alphabet=_chars, max_size=200).filter(lambda s: EOT not in s))
def test_round_trip_property(text: str) -> None:
    tok = gpt2_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["\ud800", "ok \udcff then"])
def test_text_that_is_not_unicode_gets_a_one_line_error(text: str) -> None:
    """Undecodable bytes in a command-line prompt reach Python as lone surrogates."""
    tok = gpt2_tokenizer()
    with pytest.raises(DataError, match="not valid Unicode"):
        tok.encode(text)
    with pytest.raises(DataError, match="not valid Unicode"):
        tok.encode_batch(["fine", text])


def test_identity_is_stable(tokenizer: Tokenizer) -> None:
    assert tokenizer.identity.startswith("gpt2:")
    rebuilt = Tokenizer(build_gpt2_backend(*gpt2_vocab_files()), "gpt2")
    assert rebuilt.identity == tokenizer.identity
    assert rebuilt.encode("Hello world") == [15496, 995]


def test_packaged_vocabulary_is_the_published_one(gpt2_bpe_dir: Path, tokenizer: Tokenizer) -> None:
    """The wheel's files, the shared data's files and the pinned hashes all agree."""
    for name, expected in GPT2_FILE_SHA256.items():
        assert hashlib.sha256((gpt2_bpe_dir / name).read_bytes()).hexdigest() == expected
    from_shared = Tokenizer(build_gpt2_backend(gpt2_bpe_dir / "encoder.json", gpt2_bpe_dir / "vocab.bpe"), "gpt2")
    assert from_shared.identity == tokenizer.identity


def test_save_load_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tokenizer.save(tmp_path)
    assert path == tmp_path / TOKENIZER_FILE and path.is_file()
    loaded = Tokenizer.load(tmp_path, name="gpt2")
    assert loaded.identity == tokenizer.identity
    assert loaded.eot_id == tokenizer.eot_id and loaded.vocab_size == tokenizer.vocab_size
    text = "Hello world <|endoftext|> ünïcödé 🙂\r\n  spaces\ttab"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    # Saving the loaded one again gives the same file, so the identity survives any number of trips.
    again = tmp_path / "again"
    again.mkdir()
    assert loaded.save(again).read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
    # The identity is "<name>:<content hash>": the hash part does not depend on the name given.
    assert Tokenizer.load(tmp_path).identity.split(":")[1] == tokenizer.identity.split(":")[1]


def test_different_vocabulary_gives_different_identity(tokenizer: Tokenizer) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    backend = HFTokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([EOT])
    other = Tokenizer(backend, "gpt2")
    assert other.identity != tokenizer.identity
    assert other.eot_id == 3 and other.encode("hello world") == [1, 2]


def test_load_errors_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)


def test_tokenizer_without_end_of_text_is_rejected() -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    backend = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="no <\\|endoftext\\|> token"):
        Tokenizer(backend, "plain")
