"""The run folder's rules: what may resume what, and one trainer per folder.

- A folder with a checkpoint holds a run. The same settings resume it; settings that would
  change its result are refused, naming them (``config.FIXED`` fields; a new length only when
  branching with ``--resume``).
- A folder without a checkpoint (a run killed before its first save) holds nothing to resume:
  it is started afresh, saying so, and its old log is kept aside (``metrics.1.jsonl``...).
- ``resolve_settings`` serves the command line: a resume or a branch takes the model, data and
  recipe from the checkpoint, and flags may change only what a resume may change.
- ``RunLock``: a lock file holding the live trainer's pid and host. A second trainer on the same
  folder is refused; a lock left by a process that died is taken over with a warning.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from pocketlm.checkpoint import CONFIG, META, list_checkpoints, remove_leftovers, resolve_checkpoint, verify_checkpoint
from pocketlm.config import FIXED, LAUNCH, LENGTH, ModelConfig, TrainConfig, config_from_dict, config_from_flat, flag_name, on_resume
from pocketlm.errors import CheckpointError, ConfigError, DamagedCheckpoint
from pocketlm.metrics import METRICS_FILE

RUN_CONFIG = "config.json"
LOCK_FILE = ".lock"


def saved_train_config(record: Mapping[str, Any], path: Path) -> TrainConfig:
    """The ``TrainConfig`` a config.json record holds."""
    if not isinstance(record.get("train"), Mapping):
        raise DamagedCheckpoint(f"{path} is damaged: it holds no training config")
    try:
        return config_from_dict(record["train"])
    except ConfigError as exc:
        raise DamagedCheckpoint(f"{path} holds a config this pocketlm cannot use ({exc})") from None


def differing_settings(saved: TrainConfig, current: TrainConfig, *, branching: bool) -> list[str]:
    """Names of the settings on which ``current`` may not differ from the run ``saved``."""
    a, b = saved.flat(), current.flat()
    names = [k for k in a if k not in ("model", "preset") and a[k] != b.get(k)
             and (on_resume(k) == FIXED or (on_resume(k) == LENGTH and not branching))]
    if saved.model_config() != current.model_config():
        names.insert(0, "model")
    return names


def check_resumable(saved: TrainConfig, current: TrainConfig, where: Path, *, branching: bool) -> None:
    names = differing_settings(saved, current, branching=branching)
    if not names:
        return
    a, b = saved.flat(), current.flat()

    def show(name: str) -> str:
        if name == "model":
            fields = [f for f in ModelConfig.__dataclass_fields__
                      if getattr(saved.model_config(), f) != getattr(current.model_config(), f)]
            return "model " + ", ".join(f"{f} {getattr(saved.model_config(), f)} -> "
                                        f"{getattr(current.model_config(), f)}" for f in fields)
        return f"{name}: {a[name]!r} -> {b[name]!r}"

    raise ConfigError(f"{where} holds a run with different settings ({'; '.join(show(n) for n in names[:4])}); "
                      "use a new --out-dir to start another run")


def resume_candidates(cfg: TrainConfig) -> tuple[list[Path], bool]:
    """The checkpoints this run may continue from, best first, and whether later ones may stand in
    for a damaged first one. ``--resume CHECKPOINT`` names exactly one; a run folder (the run's own,
    or ``--resume RUN``) offers all of its checkpoints, newest first."""
    if cfg.run.resume and (Path(cfg.run.resume) / META).is_file():
        return [Path(cfg.run.resume)], False
    folder = Path(cfg.run.resume) if cfg.run.resume else cfg.resolved_out_dir()
    if cfg.run.resume and not list_checkpoints(folder):
        return [resolve_checkpoint(folder)], False  # raises its one line: not found, or no checkpoint
    return list(reversed(list_checkpoints(folder))), True


def first_usable(candidates: list[Path], fallback: bool, load: Callable[[Path], Any],
                 warn: Callable[[str], None]) -> tuple[Path, Any] | None:
    """The first candidate that ``load`` accepts, with what it returned. A damaged checkpoint is
    skipped with a warning naming its file when ``fallback`` allows; when every one is damaged,
    one line says what to do."""
    problems = []
    for path in candidates:
        try:
            loaded = load(path)
        except DamagedCheckpoint as exc:
            if not fallback:
                raise
            problems.append(str(exc))
            continue
        for problem in problems:
            warn(f"{problem}; resuming from the previous checkpoint, {path.name}")
        return path, loaded
    if problems:
        folder = candidates[0].parent
        raise CheckpointError(f"no usable checkpoint in {folder} ({problems[0]}); every checkpoint is damaged: "
                              f"move {folder} aside to start the run afresh, or use a new --out-dir")
    return None


def verified_record(path: Path) -> dict[str, Any]:
    """The config.json record of a checkpoint verified whole, holding a usable training config."""
    _, record = verify_checkpoint(path)
    saved_train_config(record, path / CONFIG)
    return record


def resume_source(cfg: TrainConfig, warn: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint this run continues from and its config record: ``--resume``'s, else the run
    folder's newest usable one."""
    return first_usable(*resume_candidates(cfg), load=verified_record, warn=warn or (lambda msg: None))


def resolve_settings(given: Mapping[str, Any], check_data: Callable[[str], None] | None = None) -> TrainConfig:
    """The config for a command line's settings. Resuming (the run folder has a checkpoint, or
    ``--resume``), the checkpoint's settings are the base and the given ones may change only what a
    resume may change; a contradiction is refused naming its flag. ``check_data`` validates a given
    ``--data`` first, so a missing file is reported as such, not as a different setting."""
    draft = config_from_flat(given)  # types and ranges first: nothing else is judged on a bad value
    if check_data is not None and draft.dataset.data is not None:
        check_data(draft.dataset.data)
    found = resume_source(draft)
    if found is None:
        return draft
    source, record = found
    saved = saved_train_config(record, source / CONFIG)
    branching = bool(given.get("resume"))
    base = saved.flat()
    for name, value in given.items():
        if name == "model":
            wanted = config_from_flat({**base, "model": {**saved.model, **value}}).model_config()
            have = saved.model_config()
            if wanted != have:
                diffs = "; ".join(f"{f} {getattr(have, f)} vs {getattr(wanted, f)}" for f in ModelConfig.__dataclass_fields__
                                  if getattr(have, f) != getattr(wanted, f))
                raise CheckpointError(f"checkpoint {source} is for a different model ({diffs}); model flags cannot "
                                      "change it on resume (use a new --out-dir)")
            continue
        rule = on_resume(name)
        if base.get(name) != value and (rule == FIXED or (rule == LENGTH and not branching)):
            hint = "branch with --resume CHECKPOINT --out-dir NEW" if rule == LENGTH else "use a new --out-dir"
            raise ConfigError(f"{flag_name(name)} {value!r} contradicts the run in {source} "
                              f"(it has {base.get(name)!r}); to change it, {hint}")
    base = {name: value for name, value in base.items() if on_resume(name) != LAUNCH}  # this command's, or defaults
    merged_values = {**base, **{k: v for k, v in given.items() if k != "model"}}
    if not given.get("out_dir") and not branching:
        merged_values["out_dir"] = str(draft.resolved_out_dir())
    return config_from_flat(merged_values)


def prepare_out_dir(out_dir: Path) -> None:
    """Create the run folder, or say in one line why it cannot be (a file in the way, a
    read-only or foreign file system)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--out-dir {out_dir} is a file, not a folder; choose another --out-dir") from None
    except NotADirectoryError:
        raise ConfigError(f"--out-dir {out_dir} lies under a file, not a folder; choose another --out-dir") from None
    except OSError as exc:
        raise ConfigError(f"cannot create --out-dir {out_dir} ({exc.strerror}); choose a writable --out-dir") from None
    if not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is not a folder; choose another --out-dir")


def clean_up_after_crashes(out_dir: Path, warn: Callable[[str], None]) -> None:
    """Remove what an earlier trainer left half-done (temporary checkpoint folders). Holding the
    lock, nothing else is writing here."""
    for stale in remove_leftovers(out_dir):
        warn(f"removed {stale.name}, an unfinished save left by an earlier run")


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole or not at all (a full disk leaves the old file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_aside_old_log(out_dir: Path) -> Path | None:
    """Move a log without a checkpoint behind it out of the way: metrics.jsonl -> metrics.N.jsonl."""
    log = out_dir / METRICS_FILE
    if not log.exists():
        return None
    n = 1
    while (out_dir / f"metrics.{n}.jsonl").exists():
        n += 1
    kept = out_dir / f"metrics.{n}.jsonl"
    os.replace(log, kept)
    tb = out_dir / "tb"
    if tb.is_dir():
        os.replace(tb, out_dir / f"tb.{n}")
    return kept


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder for the life of this trainer (see the module docstring).

    The lock is an ``flock`` on ``OUT/.lock``, which the kernel releases when its process dies
    however it dies; the file's content (pid, host, start time) is for the messages.
    """

    def __init__(self, out_dir: Path, warn: Callable[[str], None] | None = None) -> None:
        self.path = out_dir / LOCK_FILE
        self.warn = warn or (lambda msg: None)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {self.path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock_held = True
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by another trainer ({holder}); wait for it to "
                              "finish or stop it, or use another --out-dir") from None
        except OSError:
            flock_held = False  # a file system without flock: the pid check below is all there is
        previous = self._read(fd)
        if previous:
            pid, host = previous.get("pid"), previous.get("host")
            alive = host == socket.gethostname() and isinstance(pid, int) and _pid_alive(pid)
            if alive and not flock_held:
                os.close(fd)
                raise ConfigError(f"{self.path.parent} is in use by another trainer (pid {pid} on {host})")
            self.warn(f"took over a stale lock in {self.path.parent} left by pid {pid} on {host}, "
                      "which is no longer running")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": round(time.time(), 3)}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            value = json.loads(raw.decode()) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return {"pid": None, "host": "unknown"}
        return value if isinstance(value, dict) else {}

    def _holder(self, fd: int) -> str:
        info = self._read(fd)
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file is a free folder
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
