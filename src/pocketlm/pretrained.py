"""Where a run's model starts: its tokenizer, its shape, and with ``--init`` existing weights.

``resolve_start(cfg)`` serves ``train.open_run``:

- neither ``--init`` nor ``--tokenizer``: GPT-2's BPE, the preset's model, random weights;
- ``--tokenizer DIR``: that tokenizer; the model's ``vocab_size`` follows it, rounded up to a
  multiple of 64 (``tokenizer.padded_vocab_size``) unless ``--vocab-size`` is given;
- ``--init SOURCE``: the shape, tokenizer and weights of SOURCE, one of
  a Hugging Face Hub model id (fetched with ``huggingface_hub.snapshot_download``; ``hf:NAME``
  always means the Hub, a bare name means a local folder when one exists), a local Hugging Face
  GPT-2 folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), or a pocketlm
  checkpoint or run folder. The context may be shorter than the source's (its first positions are
  kept), never longer; by default it is the preset's, capped at the source's.

The fields that follow from these (``vocab_size``; with ``--init`` the whole shape and context) are
written into the config's model overrides, so the run's config.json records them and a resume
compares them like any other setting. A resume takes them, and the tokenizer, from its checkpoint:
it never needs the ``--init`` source again (the Hub may be out of reach by then).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pocketlm.checkpoint import META, check_finite, list_checkpoints, load_checkpoint
from pocketlm.config import ModelConfig, TrainConfig, flag_name, model_preset
from pocketlm.errors import CheckpointError, ConfigError, PocketLMError
from pocketlm.hf import WPE_KEY, model_config_from_hf, weights_from_hf
from pocketlm.rundir import resume_source
from pocketlm.tokenizer import (BPE_NAME, HF_MERGES_FILE, HF_VOCAB_FILE, TOKENIZER_FILE, Tokenizer, get_tokenizer,
                                gpt2_tokenizer, load_tokenizer_dir, padded_vocab_size)

# What an --init source decides about the model (the context too, within its positions); the
# dropouts stay the preset's or the flags': they are how it trains, not what it is.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "layer_norm_eps")
HF_CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
HUB_WEIGHTS = [SAFETENSORS, SAFETENSORS_INDEX, "model-*.safetensors"]
HUB_TOKENIZER = [TOKENIZER_FILE, HF_VOCAB_FILE, HF_MERGES_FILE]
# OpenAI's GPT-2 checkpoints on the Hub: their tokenizer is exactly the built-in GPT-2 BPE, so
# nothing more is fetched and their token caches are the ones from-scratch runs already made.
GPT2_FAMILY = frozenset({"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
                         "openai-community/gpt2", "openai-community/gpt2-medium", "openai-community/gpt2-large",
                         "openai-community/gpt2-xl", "distilbert/distilgpt2"})
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
OFFLINE_ADVICE = "pass a local folder instead: a Hugging Face GPT-2 folder or a pocketlm checkpoint"


@dataclass
class InitSource:
    """Existing weights to start from (``open_init_source``), with their shape and tokenizer."""

    spec: str
    """As given to --init."""
    kind: str
    """``hub``, ``huggingface`` (a local folder) or ``pocketlm`` (a checkpoint)."""
    description: str
    """What exactly was found: the Hub revision, the folder, the checkpoint's step."""
    shape: ModelConfig
    """The source's model at its full context (``block_size`` = its positions)."""
    tokenizer: Tokenizer
    read_weights: Callable[[ModelConfig], dict[str, torch.Tensor]] = field(repr=False)

    def weights(self, config: ModelConfig) -> dict[str, torch.Tensor]:
        """fp32 weights named as ``checkpoint.weights_state_dict`` names them, for ``config``'s context."""
        return self.read_weights(config)

    def record(self) -> dict[str, str]:
        return {"source": self.spec, "kind": self.kind, "description": self.description}


# ---------------------------------------------------------------------------------------------
# Opening a source


def open_init_source(spec: str) -> InitSource:
    """Find and check an --init source; its weights are read later, by ``InitSource.weights``."""
    name = spec.removeprefix("hf:")
    path = Path(name).expanduser()
    if not spec.startswith("hf:") and path.exists():
        return _local_source(spec, path)
    if not _HUB_ID.fullmatch(name):
        raise CheckpointError(f"--init {spec}: no such file or folder, and not a Hugging Face Hub model id")
    builtin = name in GPT2_FAMILY
    folder = fetch_hub_model(spec, name, with_tokenizer=not builtin)
    return _huggingface_source(spec, folder, "hub", f"Hub model {name} (revision {folder.name[:12]})", builtin)


def _local_source(spec: str, path: Path) -> InitSource:
    if path.is_file():
        raise CheckpointError(f"--init {spec} is a file; pass the folder that holds it")
    if (path / META).is_file() or list_checkpoints(path):  # before config.json: a checkpoint holds one too
        return _pocketlm_source(spec, path)
    if (path / HF_CONFIG).is_file():
        return _huggingface_source(spec, path, "huggingface", f"Hugging Face folder {path.resolve()}", False)
    raise CheckpointError(f"--init {spec}: {path} is neither a pocketlm checkpoint or run folder ({META}, "
                          f"checkpoints/) nor a Hugging Face model folder ({HF_CONFIG})")


def _pocketlm_source(spec: str, path: Path) -> InitSource:
    try:
        ckpt = load_checkpoint(path)
        check_finite(ckpt.weights, ckpt.path)
    except CheckpointError as exc:
        raise CheckpointError(f"--init {spec}: {exc}") from None

    def read(config: ModelConfig) -> dict[str, torch.Tensor]:
        weights = dict(ckpt.weights)
        weights[WPE_KEY] = weights[WPE_KEY][:config.block_size].clone()  # a shorter context keeps the first positions
        return weights

    return InitSource(spec, "pocketlm", f"pocketlm checkpoint {ckpt.path.resolve()} (step {ckpt.step})",
                      ckpt.model_config, ckpt.tokenizer, read)


def _huggingface_source(spec: str, folder: Path, kind: str, description: str, builtin_tokenizer: bool) -> InitSource:
    config_path = folder / HF_CONFIG
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"--init {spec}: {config_path} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--init {spec}: {config_path} cannot be read ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"--init {spec}: {config_path} is not a model config (a JSON object)")
    try:
        shape = model_config_from_hf(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"--init {spec}: {config_path}: {exc}") from None
    try:
        tokenizer = gpt2_tokenizer() if builtin_tokenizer else load_tokenizer_dir(folder, BPE_NAME)
    except PocketLMError as exc:
        raise CheckpointError(f"--init {spec}: {exc}") from None
    weight_files = _weight_files(folder)
    if not weight_files:
        raise CheckpointError(f"--init {spec}: {folder} holds no weights ({SAFETENSORS} or {PYTORCH_BIN})")
    tied = bool(raw.get("tie_word_embeddings", True))

    def read(config: ModelConfig) -> dict[str, torch.Tensor]:
        state = _read_state_dict(spec, weight_files)
        try:
            return weights_from_hf(state, config, tied=tied)
        except CheckpointError as exc:
            raise CheckpointError(f"--init {spec}: {exc}") from None

    return InitSource(spec, kind, description, shape, tokenizer, read)


def _weight_files(folder: Path) -> list[Path]:
    """The files holding a Hugging Face folder's weights: safetensors (one file, or the shards its
    index lists) before PyTorch's pickle format."""
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    if (folder / SAFETENSORS_INDEX).is_file():
        try:
            weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{folder / SAFETENSORS_INDEX} is damaged") from None
    if (folder / PYTORCH_BIN).is_file():
        return [folder / PYTORCH_BIN]
    return []


def _read_state_dict(spec: str, files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                state.update(load_file(str(file)))
            else:  # weights_only: a checkpoint from the internet must not run code while unpickling
                loaded = torch.load(file, map_location="cpu", weights_only=True)
                if not isinstance(loaded, Mapping):
                    raise ValueError("not a state dict")
                state.update(loaded)
        except Exception as exc:  # safetensors, pickle and I/O errors alike: one line
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"--init {spec}: cannot read {file} ({reason})") from None
    return state


# ---------------------------------------------------------------------------------------------
# The Hub


def hub_offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` set, whether huggingface_hub read it at import or it was set since."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def fetch_hub_model(spec: str, repo_id: str, *, with_tokenizer: bool) -> Path:
    """The local snapshot folder of a Hub model: its config, weights (safetensors if published,
    else ``pytorch_model.bin``) and, ``with_tokenizer``, tokenizer files. Offline, or with the Hub
    out of reach, only the local cache is tried, so the one-line error comes within seconds rather
    than after the client's retries."""
    from huggingface_hub import snapshot_download

    from pocketlm.data import hub_reachable

    offline = hub_offline_requested() or not hub_reachable()
    patterns = [HF_CONFIG, *HUB_WEIGHTS, *(HUB_TOKENIZER if with_tokenizer else [])]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
        if not _weight_files(folder):  # a repository that publishes only PyTorch's pickle format
            folder = Path(snapshot_download(repo_id, allow_patterns=[PYTORCH_BIN], local_files_only=offline))
    except Exception as exc:  # offline, unknown repository, gated, no permission: one line each
        if offline:
            raise CheckpointError(f"--init {spec}: the Hugging Face Hub is out of reach (no network, or HF_HUB_OFFLINE "
                                  f"set) and {repo_id} is not in the local cache; {OFFLINE_ADVICE}") from None
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"--init {spec}: no such local folder, and cannot fetch {repo_id} from the "
                              f"Hugging Face Hub ({reason})") from None
    return folder


# ---------------------------------------------------------------------------------------------
# The run's start


@dataclass
class RunStart:
    """What ``open_run`` builds the model from."""

    cfg: TrainConfig
    """The config with the fields the tokenizer or --init source decides filled in."""
    tokenizer: Tokenizer
    init: InitSource | None = None
    """The weights to copy: a fresh --init run only (a resume loads its checkpoint)."""
    origin: dict[str, str] | None = None
    """Where the run's weights came from (config.json and the log's start line); None: random."""
    notes: list[str] = field(default_factory=list)

    def check_resumed_tokenizer(self, checkpoint_tokenizer: Tokenizer, where: Path) -> None:
        """A --tokenizer folder must still hold the tokenizer the run was trained with."""
        if self.cfg.dataset.tokenizer and checkpoint_tokenizer.identity != self.tokenizer.identity:
            raise ConfigError(f"the tokenizer in {self.cfg.dataset.tokenizer} is not the one the run in {where} was "
                              "trained with (it has changed since); use a new --out-dir to train with it")


def resolve_start(cfg: TrainConfig) -> RunStart:
    """The tokenizer and model shape of a run, and for a fresh --init run its source (see the module
    docstring). Reads the source's config and tokenizer (fetching a Hub model); writes nothing else."""
    if cfg.run.init and cfg.dataset.tokenizer:
        raise ConfigError("--tokenizer cannot be combined with --init: the tokenizer comes with the --init "
                          "source's weights")
    if not cfg.run.init and not cfg.dataset.tokenizer:
        tokenizer = get_tokenizer("gpt2")
        check_vocab_fits(cfg.model_config(), tokenizer)
        return RunStart(cfg, tokenizer)
    resumed = resume_source(cfg)
    if resumed is not None:
        return _resumed_start(cfg, *resumed)
    if cfg.run.init:
        source = open_init_source(cfg.run.init)
        cfg = with_source_shape(cfg, source)
        note = (f"starting from the weights of {source.description}; steps, optimizer and learning-rate schedule "
                "start fresh")
        return RunStart(cfg, source.tokenizer, source, source.record(), [note])
    tokenizer = load_tokenizer_dir(cfg.dataset.tokenizer)
    notes = []
    if "vocab_size" not in cfg.model:
        vocab = padded_vocab_size(tokenizer.vocab_size)
        cfg = cfg.replace(model={**cfg.model, "vocab_size": vocab})
        rounded = " (rounded up to a multiple of 64, for speed)" if vocab != tokenizer.vocab_size else ""
        notes.append(f"tokenizer {cfg.dataset.tokenizer}: {tokenizer.vocab_size:,} tokens; the model's vocabulary has "
                     f"{vocab:,} rows{rounded}")
    check_vocab_fits(cfg.model_config(), tokenizer)
    return RunStart(cfg, tokenizer, notes=notes)


def _resumed_start(cfg: TrainConfig, checkpoint: Path, record: Mapping[str, Any]) -> RunStart:
    """A resume: the derived fields the config leaves out, and the tokenizer, come from the checkpoint."""
    saved_model = record.get("model") if isinstance(record.get("model"), Mapping) else {}
    derived = (*SHAPE_FIELDS, "block_size") if cfg.run.init else ("vocab_size",)
    missing = {k: saved_model[k] for k in derived if k in saved_model and k not in cfg.model}
    if missing:
        cfg = cfg.replace(model={**missing, **cfg.model})
    if cfg.dataset.tokenizer:
        tokenizer = load_tokenizer_dir(cfg.dataset.tokenizer)
    else:
        plan = record.get("plan") if isinstance(record.get("plan"), Mapping) else {}
        tokenizer = Tokenizer.load(checkpoint, name=plan.get("tokenizer") or BPE_NAME)
    check_vocab_fits(cfg.model_config(), tokenizer)
    origin = record.get("init")
    return RunStart(cfg, tokenizer, origin=dict(origin) if isinstance(origin, Mapping) else None)


def with_source_shape(cfg: TrainConfig, source: InitSource) -> TrainConfig:
    """``cfg`` with the model's shape taken from ``source``. A model flag that contradicts the source
    is refused, and so is a context longer than its position table."""
    given = dict(cfg.model)
    for name in SHAPE_FIELDS:
        if name in given and given[name] != getattr(source.shape, name):
            raise ConfigError(f"{flag_name(name)} {given[name]} contradicts the --init source {source.spec}, whose "
                              f"{name} is {getattr(source.shape, name)}: the model's shape comes from the source")
    positions = source.shape.block_size
    if "block_size" in given:
        if given["block_size"] > positions:
            raise ConfigError(f"--block-size {given['block_size']} is longer than the {positions} positions of the "
                              f"--init source {source.spec}; use --block-size {positions} or less")
        block_size = given["block_size"]
    else:
        block_size = min(model_preset(cfg.preset).block_size, positions)
    shape = {name: getattr(source.shape, name) for name in SHAPE_FIELDS}
    cfg = cfg.replace(model={**given, **shape, "block_size": block_size})
    check_vocab_fits(cfg.model_config(), source.tokenizer, f" of the --init source {source.spec}")
    return cfg


def check_vocab_fits(model: ModelConfig, tokenizer: Tokenizer, whose: str = "") -> None:
    """Every token id must have an embedding row (more rows than tokens is fine: padding)."""
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model vocab_size {model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
                          f"{whose}: every token needs an embedding row")
