"""Text sources (all offline), one-line data errors, article splitting, examples and the token cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pocketlm.data as data
from conftest import SMALL_EOT, synthetic_stream
from pocketlm.data import (Corpus, TokenStream, cached_token_stream, content_key, load_corpus, load_dataset,
                           make_examples, split_documents, split_wikitext_articles, tokenize_documents)
from pocketlm.errors import DataError
from pocketlm.tokenizer import Tokenizer


def assert_one_line_data_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


def article_slices(articles: list[str], *cuts: int) -> list[str]:
    bounds = [0, *cuts, len(articles)]
    return ["".join(articles[a:b]) for a, b in zip(bounds, bounds[1:])]


def write_jsonl(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row, "id": len(row)}) + "\n")


# ---------------------------------------------------------------------------------------------
# Article splitting


def test_split_wikitext_articles_on_real_file(wiki_valid_text: str, wiki_articles: list[str]) -> None:
    assert "".join(wiki_articles) == wiki_valid_text
    assert len(wiki_articles) == 60
    for i, article in enumerate(wiki_articles):
        assert article.strip()
        first_heading = next(line for line in article.splitlines() if line.strip())
        assert data._TOP_HEADING.match(first_heading), first_heading
        if i > 0:  # the first article also carries the file's leading blank line
            assert data._TOP_HEADING.match(article.splitlines()[0])
        # exactly one top-level heading per article; section headings ( = = x = = ) stay inside
        assert sum(bool(data._TOP_HEADING.match(line)) for line in article.splitlines()) == 1
    assert wiki_articles[0].startswith(" \n = Homarus gammarus = \n")
    assert any(" = = " in a for a in wiki_articles)


def test_split_wikitext_articles_edge_cases() -> None:
    assert split_wikitext_articles(" = A = \nx\n = B = \ny\n") == [" = A = \nx\n", " = B = \ny\n"]
    # leading blank lines join the first article; leading prose is a document of its own
    assert split_wikitext_articles(" \n\n = A = \nx\n") == [" \n\n = A = \nx\n"]
    assert split_wikitext_articles("intro\n = A = \nx\n") == ["intro\n", " = A = \nx\n"]
    # section headings never start an article; CRLF headings are recognised
    assert split_wikitext_articles(" = A = \n = = S = = \nx\n") == [" = A = \n = = S = = \nx\n"]
    assert split_wikitext_articles(" = A = \r\nx\r\n = B = \r\n") == [" = A = \r\nx\r\n", " = B = \r\n"]
    assert split_wikitext_articles("no headings at all\n") == ["no headings at all\n"]


@given(st.lists(st.sampled_from([" = T = \n", " = = S = = \n", " \n", "text\n", "x = y\n", "\r\n", "\n"]),
                max_size=30))
def test_split_wikitext_articles_keeps_every_byte(lines: list[str]) -> None:
    text = "".join(lines)
    docs = split_wikitext_articles(text)
    assert "".join(docs) == text
    assert all(docs)


@given(st.text(alphabet=st.sampled_from(list("ab \t\n\r")), max_size=80))
def test_split_documents_paragraphs_keep_every_byte(text: str) -> None:
    docs = split_documents(text)
    if text.strip():
        assert "".join(docs) == text
        assert all(d.strip() for d in docs)


def test_split_documents_variants() -> None:
    assert split_documents("p1 line1\np1 line2\n\np2\n\n\np3\n") == ["p1 line1\np1 line2\n", "\np2\n\n", "\np3\n"]
    assert split_documents("one<|endoftext|>two<|endoftext|>  <|endoftext|>") == ["one", "two"]


# ---------------------------------------------------------------------------------------------
# Sources


def test_wikitext_directory(tmp_path: Path, wiki_articles: list[str]) -> None:
    train, valid, test = article_slices(wiki_articles, 40, 52)
    for name, text in (("wiki.train.raw", train), ("wiki.valid.raw", valid), ("wiki.test.raw", test)):
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    corpus = load_corpus(str(tmp_path))
    assert corpus.wikitext
    assert set(corpus.splits) == {"train", "validation", "test"}
    assert corpus.splits["train"] == wiki_articles[:40]
    assert corpus.splits["validation"] == wiki_articles[40:52]
    assert corpus.splits["test"] == wiki_articles[52:]


def test_wikitext_directory_without_validation_file(tmp_path: Path, wiki_articles: list[str]) -> None:
    (tmp_path / "wiki.train.raw").write_text("".join(wiki_articles[:3]), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path))
    assert "wiki.valid.raw" in assert_one_line_data_error(excinfo)


def test_single_wikitext_file_holds_out_whole_articles(wiki_valid_path: Path, wiki_valid_text: str,
                                                      wiki_articles: list[str]) -> None:
    corpus = load_corpus(str(wiki_valid_path), val_fraction=0.1)
    assert corpus.wikitext
    train, val = corpus.splits["train"], corpus.splits["validation"]
    assert len(val) == 6 and len(train) == 54  # ceil(10% of 60) articles held out
    assert "".join(train + val) == wiki_valid_text
    assert train + val == wiki_articles
    assert all(data._TOP_HEADING.match(doc.splitlines()[0]) for doc in val)


def test_single_plain_text_file_holds_out_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}.\nIts second line.\n" for i in range(20)]
    text = "\n".join(paragraphs)
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path), val_fraction=0.25)
    assert not corpus.wikitext
    assert len(corpus.splits["validation"]) == 5 and len(corpus.splits["train"]) == 15
    assert "".join(corpus.splits["train"] + corpus.splits["validation"]) == text
    assert corpus.splits["validation"][-1].strip() == "Paragraph 19.\nIts second line."


def test_single_file_with_end_of_text_separators(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("<|endoftext|>".join(f"document {i}\n\nwith a blank line" for i in range(10)), encoding="utf-8")
    corpus = load_corpus(str(path), val_fraction=0.2)
    assert corpus.splits["train"] == [f"document {i}\n\nwith a blank line" for i in range(8)]
    assert corpus.splits["validation"] == [f"document {i}\n\nwith a blank line" for i in (8, 9)]


def test_directory_of_text_files(tmp_path: Path) -> None:
    texts = {f"{i:02d}.txt": f"File {i}.\n\nTwo paragraphs, one document.\n" for i in range(10)}
    texts["sub/99.txt"] = "Nested file.\n"
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a .txt file", encoding="utf-8")
    corpus = load_corpus(str(tmp_path), val_fraction=0.2)
    ordered = [texts[name] for name in sorted(texts)]
    assert corpus.splits["train"] + corpus.splits["validation"] == ordered
    assert len(corpus.splits["validation"]) == 3  # ceil(0.2 * 11)
    assert "11 text files" in corpus.description


def test_directory_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("markdown", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path))
    assert ".txt" in assert_one_line_data_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets, offline, from local files


def test_hub_path_on_local_jsonl(tmp_path: Path, hf_offline: Path) -> None:
    train = [f"Training document {i}.\nSecond line {i}." for i in range(8)]
    val = ["Validation document A.", "Validation document B.\n"]
    write_jsonl(tmp_path / "ds" / "train.jsonl", train + ["   ", ""])
    write_jsonl(tmp_path / "ds" / "validation.jsonl", val)
    corpus = load_corpus(f"hf:{tmp_path / 'ds'}")
    assert not corpus.wikitext
    assert corpus.splits["train"] == train  # rows are documents; blank rows dropped
    assert corpus.splits["validation"] == val


def test_hub_path_on_local_parquet_without_validation(tmp_path: Path, hf_offline: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = [f"Parquet document number {i}." for i in range(10)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": docs, "n": list(range(10))}), tmp_path / "pq" / "train.parquet")
    corpus = load_corpus(f"hf:{tmp_path / 'pq'}", val_fraction=0.2)
    assert corpus.splits["train"] == docs[:8]
    assert corpus.splits["validation"] == docs[8:]


def test_hub_path_rejoins_wikitext_lines_into_articles(tmp_path: Path, hf_offline: Path,
                                                      wiki_articles: list[str]) -> None:
    """Like the Hub's WikiText: one row per line of the raw file."""
    train_text, val_text = article_slices(wiki_articles[:12], 9)
    write_jsonl(tmp_path / "wt" / "train.jsonl", train_text.splitlines(keepends=True))
    write_jsonl(tmp_path / "wt" / "validation.jsonl", val_text.splitlines(keepends=True))
    corpus = load_corpus(f"hf:{tmp_path / 'wt'}")
    assert corpus.wikitext
    assert corpus.splits["train"] == wiki_articles[:9]
    assert corpus.splits["validation"] == wiki_articles[9:12]


def test_hub_wikitext_rows_without_newlines(tmp_path: Path, hf_offline: Path, wiki_articles: list[str]) -> None:
    """Rows without their line ends (blank lines as empty rows) still give whole articles."""
    lines = "".join(wiki_articles[:6]).split("\n")[:-1]
    rows = [line if line.strip() else "" for line in lines]  # " " blank lines become empty rows
    write_jsonl(tmp_path / "wt2" / "train.jsonl", rows)
    corpus = load_corpus(f"hf:{tmp_path / 'wt2'}", val_fraction=0.2)
    assert corpus.wikitext
    docs = corpus.splits["train"] + corpus.splits["validation"]
    assert len(docs) == 6 and len(corpus.splits["validation"]) == 2
    assert [d.split("\n", 1)[0] for d in docs[1:]] == [a.split("\n", 1)[0] for a in wiki_articles[1:6]]
    assert all(d.strip() for d in docs)


def test_hub_dataset_without_text_column(tmp_path: Path, hf_offline: Path) -> None:
    (tmp_path / "nt").mkdir()
    (tmp_path / "nt" / "train.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_corpus(f"hf:{tmp_path / 'nt'}")
    assert "'text' column" in assert_one_line_data_error(excinfo)


def test_default_source_offline_says_use_data_flag(hf_offline: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_corpus(None)
    message = assert_one_line_data_error(excinfo)
    assert "--data" in message and "Salesforce/wikitext" in message


def test_unknown_hub_dataset_offline(hf_offline: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_corpus(f"hf:{tmp_path / 'does-not-exist'}")
    assert "--data" in assert_one_line_data_error(excinfo)


# ---------------------------------------------------------------------------------------------
# One-line errors for bad files


BAD_FILES = {
    "empty": (b"", "empty"),
    "whitespace": (b"  \n\t\r\n   \n", "empty"),
    "binary": (b"PK\x03\x04\x00\x00some zip-like bytes\x00\x00" * 10, "binary"),
    "undecodable": ("Caf\u00e9 au lait\n\nand more text\n".encode("latin-1"), "UTF-8"),
    "one_document": (b"Just one paragraph.\nIt has no blank lines, so it is one document.\n", "too small"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_raises_one_line_data_error(tmp_path: Path, kind: str) -> None:
    content, expected = BAD_FILES[kind]
    path = tmp_path / f"{kind}.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(path))
    message = assert_one_line_data_error(excinfo)
    assert expected in message and str(path) in message


def test_missing_file_raises_one_line_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path / "nope.txt"))
    message = assert_one_line_data_error(excinfo)
    assert "nope.txt" in message and "--data" in message
    assert "not found" in message or "no such file" in message


def test_read_text_errors_directly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        data.read_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="directory"):
        data.read_text(tmp_path)


@pytest.mark.parametrize("kind", ["empty", "binary", "undecodable"])
def test_bad_file_in_text_directory(tmp_path: Path, kind: str) -> None:
    (tmp_path / "good1.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "good2.txt").write_text("also fine\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(BAD_FILES[kind][0])
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path))
    assert "bad.txt" in assert_one_line_data_error(excinfo)


def test_directory_with_one_text_file_is_too_small(tmp_path: Path) -> None:
    (tmp_path / "only.txt").write_text("one file\n\nmany paragraphs\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path))
    assert "too small" in assert_one_line_data_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Token streams and examples


def check_examples(stream: TokenStream, block_size: int) -> None:
    """make_examples' contract: bounded length, exact tiling of each document, no crossing."""
    ex = make_examples(stream, block_size)
    assert len(ex.starts) == len(ex.lengths) == len(ex)
    assert (ex.lengths >= 1).all() and (ex.lengths <= block_size).all()
    # Every example lies inside one document: inputs from its opening EOT on, targets up to
    # (and including) its closing EOT, never past it.
    doc = np.searchsorted(stream.doc_starts, ex.starts, side="right") - 1
    assert (doc >= 0).all() and (doc < stream.n_docs).all()
    assert (ex.starts + ex.lengths <= stream.doc_starts[doc + 1]).all()
    # Per document, the examples tile its predictions [start+1, next_start] exactly, in order.
    for k in range(stream.n_docs):
        mine = np.flatnonzero(doc == k)
        a, b = int(stream.doc_starts[k]), int(stream.doc_starts[k + 1])
        covered = np.concatenate([np.arange(s + 1, s + n + 1) for s, n in zip(ex.starts[mine], ex.lengths[mine])])
        assert np.array_equal(covered, np.arange(a + 1, b + 1)), k
    assert ex.n_tokens == int(stream.doc_starts[-1])  # every prediction in the stream, once
    # inputs_targets is the shifted window; a target equals EOT only as a document's last target.
    eot = int(stream.tokens[0])
    for i in range(len(ex)):
        x, y = ex.inputs_targets(i)
        s, n = int(ex.starts[i]), int(ex.lengths[i])
        assert x.dtype == np.int64 and len(x) == len(y) == n
        assert np.array_equal(x, stream.tokens[s:s + n]) and np.array_equal(y, stream.tokens[s + 1:s + n + 1])
        eots = np.flatnonzero(y == eot)
        assert len(eots) == 0 or (list(eots) == [n - 1] and s + n == stream.doc_starts[doc[i] + 1])


@given(doc_lengths=st.lists(st.integers(0, 70), min_size=1, max_size=12), block_size=st.integers(1, 33))
def test_make_examples_properties(doc_lengths: list[int], block_size: int) -> None:
    check_examples(synthetic_stream(doc_lengths), block_size)


def test_make_examples_on_real_validation(wiki_valid_stream: TokenStream, tokenizer: Tokenizer) -> None:
    assert wiki_valid_stream.tokens[0] == tokenizer.eot_id
    assert wiki_valid_stream.n_docs == 60
    check_examples(wiki_valid_stream, 512)


def test_tokenize_documents_layout(tokenizer: Tokenizer) -> None:
    docs = ["Hello world", "", " second\n"]
    stream = tokenize_documents(docs, tokenizer)
    assert stream.tokens.dtype == np.uint16
    assert stream.n_docs == 3
    eot = tokenizer.eot_id
    expected = [eot, 15496, 995, eot, eot, *tokenizer.encode(" second\n"), eot]
    assert stream.tokens.tolist() == expected
    assert stream.doc_starts.tolist() == [0, 3, 4, len(expected) - 1]
    for k, doc in enumerate(docs):
        a, b = stream.doc_starts[k], stream.doc_starts[k + 1]
        assert tokenizer.decode(stream.tokens[a + 1:b].tolist()) == doc


def test_load_dataset_end_to_end(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(f"Paragraph {i} " + "word " * (i * 7) for i in range(12)), encoding="utf-8")
    dataset = load_dataset(str(path), tokenizer, block_size=16, val_fraction=0.25, cache_dir=tmp_path / "cache")
    assert len(dataset.corpus.splits["validation"]) == 3
    assert (dataset.train.lengths <= 16).all() and (dataset.validation.lengths <= 16).all()
    val_text = tokenizer.decode(np.asarray(dataset.validation.tokens).tolist())
    assert val_text.replace("<|endoftext|>", "") == "".join(dataset.corpus.splits["validation"])


def test_load_dataset_rejects_an_empty_split(tmp_path: Path, tokenizer: Tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(data, "load_corpus", lambda spec, val_fraction: Corpus(
        {"train": ["some text"], "validation": ["   "]}, "fake source"))
    with pytest.raises(DataError) as excinfo:
        load_dataset("x", tokenizer, block_size=8, cache_dir=tmp_path)
    assert "empty validation split" in assert_one_line_data_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Token cache


DOCS = ["First document.\n", "Second one, a little longer.\n", "Third: ünïcödé 🙂\n"]


def _spy_tokenize(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = data.tokenize_documents

    def spy(docs, tokenizer):
        calls.append(len(docs))
        return real(docs, tokenizer)

    monkeypatch.setattr(data, "tokenize_documents", spy)
    return calls


def test_cache_second_call_loads_from_disk(tmp_path: Path, tokenizer: Tokenizer, monkeypatch) -> None:
    calls = _spy_tokenize(monkeypatch)
    first = cached_token_stream(DOCS, tokenizer, tmp_path)
    assert calls == [3]
    folder = tmp_path / content_key(DOCS, tokenizer)
    assert (folder / "tokens.npy").is_file() and (folder / "doc_starts.npy").is_file()
    assert not list(folder.glob(".*.tmp"))  # temporary files were renamed into place

    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer ran again although the cache holds this content")

    monkeypatch.setattr(data, "tokenize_documents", fail)
    second = cached_token_stream(DOCS, tokenizer, tmp_path)
    assert isinstance(second.tokens, np.memmap)
    assert np.array_equal(second.tokens, first.tokens) and second.tokens.dtype == first.tokens.dtype
    assert np.array_equal(second.doc_starts, first.doc_starts)


def test_cache_defaults_to_pocketlm_cache_env(tmp_path: Path, tokenizer: Tokenizer, monkeypatch) -> None:
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "envcache"))
    cached_token_stream(DOCS, tokenizer)
    assert (tmp_path / "envcache" / content_key(DOCS, tokenizer) / "tokens.npy").is_file()


def test_cache_key_depends_on_content_and_tokenizer(tokenizer: Tokenizer) -> None:
    base = content_key(DOCS, tokenizer)
    assert content_key(list(DOCS), tokenizer) == base  # deterministic
    assert content_key(DOCS[:2], tokenizer) != base
    assert content_key([DOCS[0] + DOCS[1], DOCS[2]], tokenizer) != base  # same text, other cuts
    assert content_key(DOCS[:2] + ["Third: unicode\n"], tokenizer) != base
    renamed = Tokenizer(tokenizer.backend, "other")
    assert renamed.identity != tokenizer.identity
    assert content_key(DOCS, renamed) != base


def test_cache_rebuilds_for_another_tokenizer(tmp_path: Path, tokenizer: Tokenizer, monkeypatch) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    backend = HFTokenizer(models.WordLevel({"[UNK]": 0, "First": 1, "document.": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|endoftext|>"])
    other = Tokenizer(backend, "words")
    cached_token_stream(DOCS, tokenizer, tmp_path)
    calls = _spy_tokenize(monkeypatch)
    stream = cached_token_stream(DOCS, other, tmp_path)
    assert calls == [3]
    assert stream.tokens[:3].tolist() == [3, 1, 0]  # EOT, "First", "[UNK]" ("document." splits at ".")
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "header_only", "mismatched"])
def test_corrupt_cache_is_rebuilt(tmp_path: Path, tokenizer: Tokenizer, monkeypatch, damage: str) -> None:
    fresh = cached_token_stream(DOCS, tokenizer, tmp_path)
    folder = tmp_path / content_key(DOCS, tokenizer)
    tokens_path = folder / "tokens.npy"
    raw = tokens_path.read_bytes()
    if damage == "garbage":
        tokens_path.write_bytes(b"this is not an npy file at all" * 4)
    elif damage == "truncated":
        tokens_path.write_bytes(raw[:len(raw) - 7])
    elif damage == "empty":
        tokens_path.write_bytes(b"")
    elif damage == "header_only":
        tokens_path.write_bytes(raw[:12])
    else:  # a well-formed array that does not fit doc_starts
        np.save(tokens_path, np.asarray(fresh.tokens[:-2]))
    calls = _spy_tokenize(monkeypatch)
    rebuilt = cached_token_stream(DOCS, tokenizer, tmp_path)
    assert calls == [3]
    assert np.array_equal(rebuilt.tokens, fresh.tokens)
    assert np.array_equal(rebuilt.doc_starts, fresh.doc_starts)
    assert np.array_equal(np.load(tokens_path), fresh.tokens)  # and the cache file is whole again
    calls.clear()
    cached_token_stream(DOCS, tokenizer, tmp_path)
    assert calls == []


def test_read_only_cache_still_works(tmp_path: Path, tokenizer: Tokenizer) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be", encoding="utf-8")
    stream = cached_token_stream(DOCS, tokenizer, blocker)
    assert stream.n_docs == 3


def test_synthetic_stream_helper() -> None:
    stream = synthetic_stream([2, 0, 3])
    assert stream.doc_starts.tolist() == [0, 3, 4, 8]
    assert stream.tokens[[0, 3, 4, 8]].tolist() == [SMALL_EOT] * 4
    assert (np.delete(stream.tokens, [0, 3, 4, 8]) < SMALL_EOT).all()
