"""Checkpoint folders: weights, config and tokenizer together, written atomically.

Layout of ``OUT/checkpoints/step-00000100/``:

- ``model.safetensors``: the weights (the tied output embedding stored once);
- ``state.pt``: optimizer, LR schedule, loss scaler, progress and RNG states, tensors and
  plain containers only, so it loads with ``torch.load(weights_only=True)``;
- ``config.json``: the model and training config;
- ``tokenizer.json``: the tokenizer, so generation needs nothing else;
- ``meta.json``: format version, step, tokenizer identity, each file's SHA-256, and the SHA-256
  of meta.json's own content (``meta_sha256``), so an edited step or an emptied hash list is
  caught too. Written last.

A save writes into a temporary folder, fsyncs every file, then renames the folder into place:
a crash at any moment leaves either the whole new checkpoint or none of it. A save the disk
refuses (full, read-only, no permission) removes its temporary folder and raises one line that
says how much space a checkpoint needs; the previous checkpoint is untouched.

Loading verifies meta.json's own hash, every file's hash, then the tensors' names, shapes and
dtypes against the model, before any weight is copied. Each failure is one ``CheckpointError``
naming the damaged file, which a resume answers by falling back to the previous checkpoint
(``rundir.resume_candidates``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pocketlm.config import ModelConfig
from pocketlm.errors import CheckpointError, ConfigError, DamagedCheckpoint, DataError
from pocketlm.model import GPT
from pocketlm.tokenizer import Tokenizer

FORMAT_VERSION = 2
"""2: meta.json carries its own SHA-256. Format 1 (without it) still loads."""
WEIGHTS, STATE, CONFIG, TOKENIZER, META = "model.safetensors", "state.pt", "config.json", "tokenizer.json", "meta.json"
HASHED_FILES = (WEIGHTS, STATE, CONFIG, TOKENIZER)
AVERAGE = "ema.safetensors"
"""With --ema-decay: the average of the weights, which eval, generate and export use."""
META_HASH = "meta_sha256"
TIED_KEY = "lm_head.weight"  # same tensor as transformer.wte.weight
_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-step-"
DAMAGED_PREFIX, SUPERSEDED_PREFIX = "damaged-", "superseded-"
# Errors of a disk that refuses a write: reported in one line, never as a traceback.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for the file system"}


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


def recorded_val_loss(path: Path) -> float | None:
    """The validation loss meta.json records for a checkpoint (None: not evaluated, or unreadable)."""
    try:
        value = read_meta(path).get("val_loss")
    except CheckpointError:
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_checkpoint(out_dir: str | Path) -> Path | None:
    """The run's checkpoint with the lowest recorded validation loss (the first to reach it: a tie is
    no improvement, as early stopping counts it)."""
    scored = [(loss, i, p) for i, p in enumerate(list_checkpoints(out_dir))
              if (loss := recorded_val_loss(p)) is not None]
    return min(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def checkpoint_for_use(path: str | Path, say: Callable[[str], None] | None = None) -> Path:
    """What ``eval``, ``generate`` and ``export`` read: a checkpoint folder as given; for a run folder
    its best checkpoint when one was evaluated (saying so), else its latest."""
    path = Path(path)
    if not (path / META).is_file() and not _STEP_DIR.match(path.name):
        best, latest = best_checkpoint(path), latest_checkpoint(path)
        if best is not None:
            if say is not None:
                newer = f", not the latest, {latest.name}" if latest is not None and latest != best else ""
                say(f"using the best checkpoint of {path}: {best.name} (validation loss "
                    f"{recorded_val_loss(best):.4f}){newer}")
            return best
    return resolve_checkpoint(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (then its latest checkpoint)."""
    path = Path(path)
    if (path / META).is_file() or (_STEP_DIR.match(path.name) and path.is_dir()):
        return path  # a step folder without meta.json is a damaged checkpoint: verifying it says so
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


_HASHED: dict[tuple[str, int, int, int], str] = {}
SETTLED_SECONDS = 2.0


def _sha256(path: Path) -> str:
    """The file's SHA-256. A resume verifies the same checkpoint more than once (settings, then
    weights), so the digest of an unchanged file (same inode, size and mtime) is remembered for
    the process; only for files last modified seconds ago, so that a change within the file
    system's timestamp granularity can never hide behind an old entry."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHED:
        return _HASHED[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if time.time() - st.st_mtime_ns / 1e9 > SETTLED_SECONDS:
        _HASHED[key] = h.hexdigest()
    return h.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """The SHA-256 of meta.json's content without its own hash (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != META_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line ``CheckpointError`` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedCheckpoint(f"{what} {path} is damaged (not valid JSON)") from None
    except OSError as exc:
        raise DamagedCheckpoint(f"{what} {path} cannot be read ({exc.strerror})") from None
    if not isinstance(value, dict):
        raise DamagedCheckpoint(f"{what} {path} is damaged (a JSON {type(value).__name__}, not an object)")
    return value


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def free_bytes(folder: Path) -> int | None:
    """Free space where ``folder`` (or its nearest existing parent) lives; None if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def megabytes(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / 1e6:,.0f} MB"


def low_space_warning(folder: Path, needed: int) -> str | None:
    """A warning when less than two checkpoints' worth of space is free: the next save needs one,
    and the previous checkpoint is only pruned after it."""
    free = free_bytes(folder)
    if free is None or free >= 2 * needed:
        return None
    return (f"only {megabytes(free)} free in {folder}; a checkpoint needs about {megabytes(needed)}: "
            "free some space before the next save")


def weights_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}


def save_checkpoint(out_dir: str | Path, step: int, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
                    config: dict[str, Any], state: dict[str, Any], keep: int | None = None,
                    val_loss: float | None = None, average: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``step-<step>`` atomically and keep only the newest ``keep`` checkpoints.
    ``weights``: ``weights_state_dict(model)``; ``val_loss``, if the step was evaluated, is recorded
    in meta.json; ``average``, the weight average (``ema.safetensors``). A write the disk refuses
    raises a one-line ``CheckpointError`` (see ``DISK_ERRNOS``) after removing the temporary folder."""
    folder = checkpoints_dir(out_dir)
    final = folder / f"step-{step:08d}"
    tmp = folder / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if final.exists():  # left by an earlier process: a resume passed it over, or branched back before it
            set_aside(final)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_checkpoint_files(tmp, step, weights, tokenizer, config, state, val_loss, average)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_refused(exc, folder, step, tensor_bytes(weights) + tensor_bytes(state) + tensor_bytes(average),
                           latest_checkpoint(out_dir)) from None
    _prune(out_dir, keep)
    return final


def _write_checkpoint_files(tmp: Path, step: int, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
                            config: dict[str, Any], state: dict[str, Any], val_loss: float | None,
                            average: dict[str, torch.Tensor] | None = None) -> None:
    _as_disk_error(lambda: save_file(weights, str(tmp / WEIGHTS)), tmp / WEIGHTS, tensor_bytes(weights))
    files = list(HASHED_FILES)
    if average is not None:
        _as_disk_error(lambda: save_file(average, str(tmp / AVERAGE)), tmp / AVERAGE, tensor_bytes(average))
        files.append(AVERAGE)
    _as_disk_error(lambda: torch.save(state, tmp / STATE), tmp / STATE, tensor_bytes(state))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    tokenizer.save(tmp)
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "tokenizer": tokenizer.identity,
                            "val_loss": val_loss, "files": {name: _sha256(tmp / name) for name in files}}
    meta[META_HASH] = meta_digest(meta)
    (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for name in (*files, META):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)


def _as_disk_error(write: Callable[[], None], path: Path, nbytes: int) -> None:
    """Run ``write``; torch's zip writer and safetensors report a short write as a RuntimeError or
    SafetensorError, not as the OSError it is. Turn those into an OSError with the likely errno."""
    try:
        write()
    except (RuntimeError, SafetensorError) as exc:
        free = free_bytes(path.parent)
        code = errno.ENOSPC if free is not None and free < nbytes else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({str(exc).splitlines()[0][:80]})" if code == errno.EIO
                      else os.strerror(code), str(path)) from exc


def save_refused(exc: OSError, folder: Path, step: int, needed: int, previous: Path | None) -> CheckpointError:
    """The one line for a save the disk refused: why, the space a checkpoint needs, and what to do."""
    why = DISK_ERRNOS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
        "make the folder writable (or move the run to a writable --out-dir with --resume)"
    kept = f"the last checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
    return CheckpointError(f"cannot save the checkpoint of step {step} in {folder}: {why} "
                           f"({exc.strerror}{': ' + str(exc.filename) if exc.filename else ''}); a checkpoint "
                           f"needs about {megabytes(needed)}, {megabytes(free_bytes(folder))} are free; "
                           f"{kept}; {fix}, then run the same command to resume")


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that a new save of the same step replaces to ``damaged-step-...`` (if it
    does not verify) or ``superseded-step-...``: nothing is deleted, and no resume picks it again."""
    try:
        verify_checkpoint(path)
        prefix = SUPERSEDED_PREFIX
    except CheckpointError:
        prefix = DAMAGED_PREFIX
    target = path.with_name(f"{prefix}{path.name}")
    if target.exists():
        target = path.with_name(f"{prefix}{path.name}-{int(time.time())}")
    os.rename(path, target)
    return target


def remove_leftovers(out_dir: str | Path, own_pid: int | None = None) -> list[Path]:
    """Delete the temporary folders of saves that never finished (killed mid-save, or refused by
    the disk). Call it holding the run lock: no other trainer is then writing here."""
    folder = checkpoints_dir(out_dir)
    removed = []
    if folder.is_dir():
        for stale in folder.glob(f"{TMP_PREFIX}*"):
            if own_pid is None or not stale.name.endswith(f"-{own_pid}"):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


def _prune(out_dir: str | Path, keep: int | None) -> None:
    """Keep the newest ``keep`` checkpoints, and the best one wherever it is."""
    remove_leftovers(out_dir, own_pid=os.getpid())
    if keep:
        best = best_checkpoint(out_dir)
        for old in list_checkpoints(out_dir)[:-keep]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    meta: dict[str, Any]
    average: dict[str, torch.Tensor] | None = None
    """The weight average (``ema.safetensors``), when the run kept one."""

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.config["model"])

    def load_state(self) -> dict[str, Any]:
        """Optimizer, schedule, scaler, progress and RNG states. Never unpickles arbitrary objects."""
        try:
            state = torch.load(self.path / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DamagedCheckpoint(f"{self.path / STATE} cannot be read ({type(exc).__name__})") from None
        if not isinstance(state, dict):
            raise DamagedCheckpoint(f"{self.path / STATE} is damaged (not a mapping)")
        return state


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, checked whole: its own hash, a step that matches the folder's
    name, and a hash for every file."""
    meta = read_json(path / META, "checkpoint file")
    where = path / META
    version = meta.get("format")
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{where} has checkpoint format {version!r}; this pocketlm reads 1 and {FORMAT_VERSION}")
    if version >= 2 and meta.get(META_HASH) != meta_digest(meta):
        raise DamagedCheckpoint(f"{where} is damaged or was edited (its own SHA-256 does not match)")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise DamagedCheckpoint(f"{where} is damaged (no valid step)")
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise DamagedCheckpoint(f"{where} is damaged (it says step {step}, its folder is {path.name})")
    files = meta.get("files")
    if not isinstance(files, dict) or any(not isinstance(files.get(n), str) for n in HASHED_FILES):
        raise DamagedCheckpoint(f"{where} is damaged (it does not list a SHA-256 for each of "
                                f"{', '.join(HASHED_FILES)})")
    if not isinstance(meta.get("tokenizer"), str):
        raise DamagedCheckpoint(f"{where} is damaged (no tokenizer identity)")
    return meta


def verify_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, config) of a checkpoint whose every file is present and matches its hash, and whose
    config describes a pocketlm model; else a one-line ``CheckpointError`` naming the file."""
    meta = read_meta(path)
    for name, digest in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(file) != digest:
            raise DamagedCheckpoint(f"checkpoint file {file} is truncated or corrupt (checksum mismatch)")
    config = read_json(path / CONFIG, "checkpoint file")
    try:
        ModelConfig(**config["model"])
    except (KeyError, TypeError, ConfigError):
        raise DamagedCheckpoint(f"{path / CONFIG} does not describe a pocketlm model") from None
    return meta, config


def load_checkpoint(path: str | Path, expected_model: ModelConfig | None = None) -> Checkpoint:
    """Read and verify a checkpoint. Missing, truncated or corrupt files and a different model
    config each raise a one-line ``CheckpointError``."""
    path = resolve_checkpoint(path)
    meta, config = verify_checkpoint(path)
    model_config = ModelConfig(**config["model"])
    if expected_model is not None:
        check_same_model(model_config, expected_model, path)
    weights = _read_weights(path / WEIGHTS, model_config)
    try:
        tokenizer = Tokenizer.load(path, name=meta["tokenizer"].split(":")[0])
    except DataError:
        raise DamagedCheckpoint(f"checkpoint file {path / TOKENIZER} is damaged (not a tokenizer)") from None
    if tokenizer.identity != meta["tokenizer"]:
        raise DamagedCheckpoint(f"{path / TOKENIZER} does not match the tokenizer recorded in {META}")
    average = _read_weights(path / AVERAGE, model_config) if AVERAGE in meta["files"] else None
    return Checkpoint(path, meta["step"], config, weights, tokenizer, meta, average)


def _read_weights(file: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A safetensors file of this model's weights (the trained ones, or their average)."""
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise DamagedCheckpoint(f"{file} cannot be read: {str(exc).splitlines()[0]}") from None
    check_weights_fit(weights, config, file)
    return weights


def expected_weights(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors a checkpoint of this model holds (built on the meta
    device: no memory, no initialisation)."""
    with torch.device("meta"):
        model = GPT(config)
    return {name: (tuple(t.shape), t.dtype) for name, t in weights_state_dict(model).items()}


def check_weights_fit(weights: dict[str, torch.Tensor], config: ModelConfig, where: Path | str) -> None:
    """Names, shapes and dtypes of ``weights`` against the model, before anything is copied: a
    tensor stored as another dtype with the right byte count would otherwise be reinterpreted."""
    expected = expected_weights(config)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise DamagedCheckpoint(f"{where}: weights do not fit this model (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
    for name, (shape, dtype) in expected.items():
        found = weights[name]
        if tuple(found.shape) != shape or found.dtype != dtype:
            raise DamagedCheckpoint(f"{where}: {name} is {str(found.dtype).removeprefix('torch.')} "
                                    f"{tuple(found.shape)}, the model needs "
                                    f"{str(dtype).removeprefix('torch.')} {shape}")


def check_same_model(found: ModelConfig, expected: ModelConfig, path: Path) -> None:
    if found != expected:
        diffs = [f"{f.name} {getattr(found, f.name)} vs {getattr(expected, f.name)}"
                 for f in dataclasses.fields(ModelConfig) if getattr(found, f.name) != getattr(expected, f.name)]
        raise CheckpointError(f"checkpoint {path} is for a different model ({'; '.join(diffs)})")


def load_weights(model: GPT, weights: dict[str, torch.Tensor], path: Path | str = "checkpoint") -> None:
    check_weights_fit(weights, model.config, path)
    model.load_state_dict(weights, strict=False)  # strict=False only because the tied key is stored once


def check_finite(weights: dict[str, torch.Tensor], path: Path | str) -> None:
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DamagedCheckpoint(f"{path}: the weights are not finite ({name} holds NaN or inf); "
                                  "use an earlier checkpoint")


def is_finite_checkpoint(path: Path) -> bool:
    """Whether a checkpoint's meta.json reads whole and its recorded validation loss (if any) is
    finite: the cheap test for naming a last good checkpoint (saves refuse non-finite weights)."""
    try:
        val_loss = read_meta(path).get("val_loss")
    except CheckpointError:
        return False
    return val_loss is None or (isinstance(val_loss, (int, float)) and math.isfinite(val_loss))


def load_model(path: str | Path, device: torch.device | str = "cpu",
               say: Callable[[str], None] | None = None) -> tuple[GPT, Tokenizer, Checkpoint]:
    """A ready-to-use model in eval mode with its tokenizer, for generation and evaluation. A run
    folder gives its best checkpoint (``checkpoint_for_use``)."""
    ckpt = load_checkpoint(checkpoint_for_use(path, say))
    weights, file = (ckpt.average, AVERAGE) if ckpt.average is not None else (ckpt.weights, WEIGHTS)
    if ckpt.average is not None and say is not None:
        say(f"using the run's weight average ({AVERAGE}) of {ckpt.path.name}")
    check_finite(weights, ckpt.path / file)
    model = GPT(ckpt.model_config)
    load_weights(model, weights, ckpt.path / file)
    return model.to(device).eval(), ckpt.tokenizer, ckpt
