"""Checkpoint folders: weights, config and tokenizer together, written atomically.

Layout of ``OUT/checkpoints/step-00000100/``:

- ``model.safetensors``: the weights (the tied output embedding stored once);
- ``state.pt``: optimizer, LR schedule, loss scaler, progress and RNG states, tensors and
  plain containers only, so it loads with ``torch.load(weights_only=True)``;
- ``config.json``: the model and training config;
- ``tokenizer.json``: the tokenizer, so generation needs nothing else;
- ``meta.json``: format version, step, tokenizer identity and each file's SHA-256. Written last.

A save writes into a temporary folder, fsyncs every file, then renames the folder into place:
a crash at any moment leaves either the whole new checkpoint or none of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pocketlm.config import ModelConfig
from pocketlm.errors import CheckpointError
from pocketlm.model import GPT
from pocketlm.tokenizer import Tokenizer

FORMAT_VERSION = 1
WEIGHTS, STATE, CONFIG, TOKENIZER, META = "model.safetensors", "state.pt", "config.json", "tokenizer.json", "meta.json"
TIED_KEY = "lm_head.weight"  # same tensor as transformer.wte.weight
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. Half-written saves never match the name."""
    folder = checkpoints_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (then its latest checkpoint)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} holds no checkpoint (expected {META} or a checkpoints/ folder)")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; rename is still atomic there
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}


def save_checkpoint(out_dir: str | Path, step: int, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
                    config: dict[str, Any], state: dict[str, Any], keep: int | None = None,
                    val_loss: float | None = None) -> Path:
    """Write ``step-<step>`` atomically and keep only the newest ``keep`` checkpoints.
    ``weights``: ``weights_state_dict(model)``; ``val_loss``, if the step was evaluated, is recorded
    in meta.json."""
    folder = checkpoints_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    if final.exists():
        return final  # this exact step is already safely on disk
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    tokenizer.save(tmp)
    meta = {"format": FORMAT_VERSION, "step": step, "tokenizer": tokenizer.identity, "val_loss": val_loss,
            "files": {name: _sha256(tmp / name) for name in (WEIGHTS, STATE, CONFIG, TOKENIZER)}}
    (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for name in (WEIGHTS, STATE, CONFIG, TOKENIZER, META):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(folder)
    _prune(out_dir, keep)
    return final


def _prune(out_dir: str | Path, keep: int | None) -> None:
    folder = checkpoints_dir(out_dir)
    for stale in folder.glob(".tmp-step-*"):  # left by a process killed mid-save
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.config["model"])

    def load_state(self) -> dict[str, Any]:
        """Optimizer, schedule, scaler, progress and RNG states. Never unpickles arbitrary objects."""
        try:
            return torch.load(self.path / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{self.path / STATE} cannot be read ({type(exc).__name__})") from None


def load_checkpoint(path: str | Path, expected_model: ModelConfig | None = None) -> Checkpoint:
    """Read and verify a checkpoint. Missing, truncated or corrupt files and a different model
    config each raise a one-line ``CheckpointError``."""
    path = resolve_checkpoint(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: {META} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path / META} is corrupt") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT_VERSION}")
    for name, digest in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupt (checksum mismatch)")
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    try:
        model_config = ModelConfig(**config["model"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{path / CONFIG} does not describe a pocketlm model") from None
    if expected_model is not None:
        check_same_model(model_config, expected_model, path)
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / WEIGHTS} cannot be read: {str(exc).splitlines()[0]}") from None
    tokenizer = Tokenizer.load(path, name=meta.get("tokenizer", "bpe").split(":")[0])
    if tokenizer.identity != meta.get("tokenizer"):
        raise CheckpointError(f"{path}: tokenizer.json does not match the recorded tokenizer identity")
    return Checkpoint(path, int(meta["step"]), config, weights, tokenizer, meta)


def check_same_model(found: ModelConfig, expected: ModelConfig, path: Path) -> None:
    if found != expected:
        diffs = [f"{f.name} {getattr(found, f.name)} vs {getattr(expected, f.name)}"
                 for f in dataclasses.fields(ModelConfig) if getattr(found, f.name) != getattr(expected, f.name)]
        raise CheckpointError(f"checkpoint {path} is for a different model ({'; '.join(diffs)})")


def load_weights(model: GPT, weights: dict[str, torch.Tensor], path: Path | str = "checkpoint") -> None:
    expected = set(weights_state_dict(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(weights, strict=False)  # strict=False only because the tied key is stored once


def check_finite(weights: dict[str, torch.Tensor], path: Path | str) -> None:
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: the weights are not finite ({name} holds NaN or inf); "
                                  "use an earlier checkpoint")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, Checkpoint]:
    """A ready-to-use model in eval mode with its tokenizer, for generation and evaluation."""
    ckpt = load_checkpoint(path)
    check_finite(ckpt.weights, ckpt.path)
    model = GPT(ckpt.model_config)
    load_weights(model, ckpt.weights, ckpt.path)
    return model.to(device).eval(), ckpt.tokenizer, ckpt
