"""Text sources, documents, the on-disk token cache, and training examples.

A source becomes a ``Corpus``: lists of documents per split. Each split is tokenized once into
one stream ``EOT d1 EOT d2 EOT ... dn EOT`` (``<|endoftext|>`` joins documents) and cached as
``.npy`` files keyed by the split's content hash and the tokenizer identity. An example is a
contiguous slice of that stream inside one document, at most ``block_size`` predictions long:
inputs are ``slice[:-1]`` and targets ``slice[1:]``, so no target ever crosses a document.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pocketlm.errors import DataError
from pocketlm.tokenizer import Tokenizer

DEFAULT_HUB_DATASET = "hf:Salesforce/wikitext:wikitext-2-raw-v1"
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_TOP_HEADING = re.compile(r"^ = [^=].* = $")


@dataclass
class Corpus:
    """Documents per split. Joining a split's documents gives back its text exactly."""

    splits: dict[str, list[str]]
    description: str
    wikitext: bool = False


# ---------------------------------------------------------------------------------------------
# Reading text and cutting it into documents


def read_text(path: Path) -> str:
    """Read UTF-8 text, with one-line errors for missing, empty and binary files."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file, got a directory: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if not raw.strip():
        raise DataError(f"data file is empty: {path}")
    if b"\x00" in raw:
        raise DataError(f"{path} looks binary (it contains NUL bytes); pass UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (undecodable byte at offset {exc.start})") from None


def split_wikitext_articles(text: str) -> list[str]:
    """Cut WikiText into articles; each begins at a top-level `` = Title = `` heading line."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _TOP_HEADING.match(line.rstrip("\r\n"))]
    if not starts:
        starts = [0]
    elif starts[0] != 0:
        # Text before the first heading is its own document, unless it is only blank lines (as at
        # the top of every WikiText file): those join the first article instead of becoming a
        # whitespace-only document.
        if "".join(lines[:starts[0]]).strip():
            starts = [0] + starts
        else:
            starts[0] = 0
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:]) if a < b]


def looks_like_wikitext(text: str) -> bool:
    return sum(1 for line in text.splitlines()[:5000] if _TOP_HEADING.match(line)) >= 2


def split_documents(text: str) -> list[str]:
    """Documents of a plain text: WikiText articles, else ``<|endoftext|>``-separated parts,
    else paragraphs (blank-line separated)."""
    if looks_like_wikitext(text):
        return split_wikitext_articles(text)
    if "<|endoftext|>" in text:
        return [d for d in text.split("<|endoftext|>") if d.strip()]
    parts = re.split(r"(?<=\n)(?=[ \t]*\r?\n)", text)  # keep every byte: cut before blank lines
    docs: list[str] = []
    for part in parts:
        if docs and not part.strip():
            docs[-1] += part
        elif docs and not docs[-1].strip():
            docs[-1] += part
        else:
            docs.append(part)
    return [d for d in docs if d.strip()] or [text]


def hold_out(docs: list[str], val_fraction: float, what: str) -> tuple[list[str], list[str]]:
    """Last ``val_fraction`` of the documents (at least one) become validation."""
    if len(docs) < 2:
        raise DataError(f"{what} is too small: it holds {len(docs)} document(s); "
                        "at least two are needed to hold one out for validation")
    n_val = min(len(docs) - 1, max(1, math.ceil(len(docs) * val_fraction)))
    return docs[:-n_val], docs[-n_val:]


# ---------------------------------------------------------------------------------------------
# Sources


def source_not_found(spec: str) -> DataError:
    return DataError(f"--data {spec}: file or directory not found (for a Hub dataset use hf:NAME)")


def load_corpus(spec: str | None, val_fraction: float = 0.1) -> Corpus:
    """Resolve ``--data``: a WikiText dir, a text file, a dir of .txt files, or ``hf:NAME[:CONFIG]``."""
    spec = spec or DEFAULT_HUB_DATASET
    if spec.startswith("hf:"):
        return load_hub_corpus(spec[3:], val_fraction)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / WIKITEXT_FILES["train"]).is_file():
            return load_wikitext_dir(path)
        return load_text_dir(path, val_fraction)
    if path.is_file():
        text = read_text(path)
        wikitext = looks_like_wikitext(text)
        train, val = hold_out(split_documents(text), val_fraction, str(path))
        return Corpus({"train": train, "validation": val}, f"file {path}", wikitext)
    raise source_not_found(spec)


def check_source(spec: str) -> None:
    """A quick check of a local ``--data`` source (exists, is readable text), before anything else
    is judged; Hub sources are checked when they load."""
    if spec.startswith("hf:"):
        return
    path = Path(spec).expanduser()
    if path.is_file():
        read_text(path)
    elif not path.is_dir():
        raise source_not_found(spec)


def load_wikitext_dir(path: Path) -> Corpus:
    splits = {}
    for split, name in WIKITEXT_FILES.items():
        if (path / name).is_file():
            splits[split] = split_wikitext_articles(read_text(path / name))
    if "validation" not in splits:
        raise DataError(f"{path} has {WIKITEXT_FILES['train']} but no {WIKITEXT_FILES['validation']}")
    return Corpus(splits, f"WikiText directory {path}", wikitext=True)


def load_text_dir(path: Path, val_fraction: float) -> Corpus:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"{path} has no .txt files (and no wiki.train.raw)")
    docs = [read_text(p) for p in files]  # one file, one document
    train, val = hold_out(docs, val_fraction, f"directory {path}")
    return Corpus({"train": train, "validation": val}, f"{len(files)} text files in {path}")


HUB_PROBE_SECONDS = 3.0
OFFLINE_ADVICE = "pass --data PATH (a text file, a folder of .txt files, or a WikiText folder with wiki.train.raw)"


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within ``timeout`` seconds. Without
    this, an offline machine waits through the Hub client's retries (half a minute and a dozen
    lines) before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` in offline mode: only what is in the local cache."""
    import datasets
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[2]


def load_hub_corpus(name_and_config: str, val_fraction: float) -> Corpus:
    """A Hugging Face dataset with a ``text`` column. WikiText rows are lines and are joined back
    into articles; any other dataset's rows are documents. With the Hub out of reach only the
    local cache is tried, so an offline machine gets its one-line error within seconds."""
    name, _, config = name_and_config.partition(":")
    label = f"{name}{':' + config if config else ''}"
    online = hub_reachable()
    try:
        import datasets  # slow to import; only this source needs it

        with contextlib.nullcontext() if online else hub_offline():
            dataset = datasets.load_dataset(name, config or None)
    except Exception as exc:  # offline, unknown name, bad config: all one line for the user
        if not online:
            raise DataError(f"cannot load Hub dataset {label}: the Hugging Face Hub is out of reach (no network?) "
                            f"and the dataset is not in the local cache; {OFFLINE_ADVICE}") from None
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load Hub dataset {label} ({reason}); if offline, {OFFLINE_ADVICE}") from None
    splits: dict[str, list[str]] = {}
    wikitext = False
    for split in ("train", "validation", "test"):
        if split not in dataset:
            continue
        if "text" not in dataset[split].column_names:
            raise DataError(f"Hub dataset {name} has no 'text' column (columns: {dataset[split].column_names})")
        rows = [r for r in dataset[split]["text"] if r is not None]
        joined = "".join(r if r.endswith("\n") else r + "\n" for r in rows)
        if looks_like_wikitext(joined):
            wikitext = True
            splits[split] = split_wikitext_articles(joined)
        else:
            splits[split] = [r for r in rows if r.strip()]
    if "train" not in splits or not splits["train"]:
        raise DataError(f"Hub dataset {name} has no non-empty 'train' split")
    if "validation" not in splits:
        splits["train"], splits["validation"] = hold_out(splits["train"], val_fraction, f"Hub dataset {name}")
    return Corpus(splits, f"Hub dataset {name_and_config}", wikitext)


# ---------------------------------------------------------------------------------------------
# Tokenizing and caching


@dataclass
class TokenStream:
    """One split as ``EOT d1 EOT d2 ... EOT``; document k spans ``tokens[doc_starts[k]:doc_starts[k+1]+1]``."""

    tokens: np.ndarray
    doc_starts: np.ndarray  # (n_docs + 1,), last entry is the final EOT's index

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm"))


def content_key(docs: list[str], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(tokenizer.identity.encode())
    for doc in docs:
        h.update(len(doc).to_bytes(8, "little"))
        h.update(doc.encode("utf-8"))
    return h.hexdigest()[:24]


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> TokenStream:
    encoded = tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    doc_starts = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_starts[1:])
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tokens = np.empty(int(doc_starts[-1]) + 1, dtype=dtype)
    tokens[doc_starts] = tokenizer.eot_id
    for start, ids in zip(doc_starts[:-1], encoded):
        tokens[start + 1:start + 1 + len(ids)] = ids
    return TokenStream(tokens, doc_starts)


def _stream_fits(tokens: np.ndarray, doc_starts: np.ndarray, n_docs: int) -> bool:
    """Whether cached arrays are shaped like ``tokenize_documents``'s output for ``n_docs`` documents."""
    return (tokens.ndim == 1 and doc_starts.ndim == 1 and len(doc_starts) == n_docs + 1
            and np.issubdtype(tokens.dtype, np.integer) and np.issubdtype(doc_starts.dtype, np.integer)
            and len(tokens) > 0 and doc_starts[0] == 0 and doc_starts[-1] == len(tokens) - 1)


def cached_token_stream(docs: list[str], tokenizer: Tokenizer, cache_dir: Path | None = None) -> TokenStream:
    """Tokenize once per (content, tokenizer); later runs memory-map the saved arrays."""
    folder = (cache_dir or default_cache_dir()) / content_key(docs, tokenizer)
    tokens_path, starts_path = folder / "tokens.npy", folder / "doc_starts.npy"
    if tokens_path.is_file() and starts_path.is_file():
        try:
            tokens, doc_starts = np.load(tokens_path, mmap_mode="r"), np.load(starts_path)
        except (ValueError, OSError, EOFError):  # EOFError: a zero-length file
            pass  # a damaged cache entry is rebuilt below
        else:
            if _stream_fits(tokens, doc_starts, len(docs)):
                return TokenStream(tokens, doc_starts)
            # arrays that parse but do not fit together (or these documents) are rebuilt too
    stream = tokenize_documents(docs, tokenizer)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, array in ((tokens_path, stream.tokens), (starts_path, stream.doc_starts)):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)  # readers see a whole file or none
    except OSError:
        pass  # a read-only cache only costs speed
    return stream


# ---------------------------------------------------------------------------------------------
# Examples


@dataclass
class ExampleSet:
    """Training examples: example i predicts ``tokens[starts[i]+1 : starts[i]+lengths[i]+1]``
    from ``tokens[starts[i] : starts[i]+lengths[i]]``."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def inputs_targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, n = int(self.starts[i]), int(self.lengths[i])
        window = np.asarray(self.tokens[s:s + n + 1], dtype=np.int64)
        return window[:-1], window[1:]


def make_examples(stream: TokenStream, block_size: int) -> ExampleSet:
    """Cut each document (with its two framing EOTs) into pieces of at most ``block_size`` predictions."""
    n_pred = np.diff(stream.doc_starts)  # predictions per document: its tokens plus the closing EOT
    pieces = -(-n_pred // block_size)
    doc_of_piece = np.repeat(np.arange(stream.n_docs), pieces)
    first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
    piece_index = np.arange(len(doc_of_piece)) - first_piece
    starts = stream.doc_starts[doc_of_piece] + piece_index * block_size
    lengths = np.minimum(block_size, n_pred[doc_of_piece] - piece_index * block_size)
    return ExampleSet(stream.tokens, starts.astype(np.int64), lengths.astype(np.int64))


@dataclass
class Dataset:
    corpus: Corpus
    train: ExampleSet
    validation: ExampleSet


def load_dataset(spec: str | None, tokenizer: Tokenizer, block_size: int, val_fraction: float = 0.1,
                 cache_dir: Path | None = None) -> Dataset:
    corpus = load_corpus(spec, val_fraction)
    sets = {}
    for split in ("train", "validation"):
        docs = corpus.splits.get(split) or []
        if not any(d.strip() for d in docs):
            raise DataError(f"{corpus.description} has an empty {split} split")
        sets[split] = make_examples(cached_token_stream(docs, tokenizer, cache_dir), block_size)
    return Dataset(corpus, sets["train"], sets["validation"])
