"""Fault injection: every class of fault the reliability issue found, several cases each.

Each case asserts the exit status, a single ``pocketlm: error:`` line (or, where the run can
carry on, a warning and a resume), that the files already on disk are unchanged or still
resumable, and that the same command run again either resumes to the weights of a run never
interrupted (bit for bit) or repeats one line saying what to do. ``docs/reliability.md`` tabulates
these cases; ``test_reliability_doc_counts_the_suite`` keeps the two in step.

The classes: non-finite numbers; damaged checkpoint and run files; a disk that fills up or turns
read-only; two trainers on one folder; processes killed at any moment (``tests/fault_runner.py``).
Bad config values are in test_config.py, and the resume that re-decides its plan in test_plan.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from pocketlm import checkpoint as ckpt_mod
from pocketlm.checkpoint import HASHED_FILES, list_checkpoints, meta_digest
from pocketlm.cli import main
from pocketlm.losses import NextTokenLoss
from pocketlm.metrics import MetricsLog

from cli_checks import assert_one_line_error, run_cli, tree_digest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "tiny", "--batch-size", "2", "--grad-accum", "2", "--precision", "fp32", "--device", "cpu",
         "--eval-batches", "2", "--log-interval", "1", "--seed", "3", "--save-interval", "2", "--eval-interval", "2",
         "--no-compile"]
YAML = "model:\n  n_layer: 1\n  n_embd: 64\n  n_head: 2\n  block_size: 64\n"
FINAL = "step-00000004"


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults-config") / "small.yaml"
    path.write_text(YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def command(small_yaml, corpus_file) -> Callable[..., list[str]]:
    """The one training command of this suite: 4 steps, a checkpoint every 2."""
    def make(run: Path, *extra: str) -> list[str]:
        return ["train", *SMALL, "--config", str(small_yaml), "--data", str(corpus_file), "--out-dir", str(run),
                "--max-steps", "4", *extra]
    return make


@pytest.fixture(scope="module")
def short_text(tmp_path_factory, corpus_file) -> Path:
    """A few short paragraphs to evaluate on: the faults under test are in the checkpoint."""
    path = tmp_path_factory.mktemp("faults-text") / "short.txt"
    words = corpus_file.read_text(encoding="utf-8").split()
    path.write_text("\n\n".join(" ".join(words[i:i + 40]) for i in range(0, 400, 40)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, command) -> Path:
    """The same run, never interrupted: what every recovered run must end with."""
    run = tmp_path_factory.mktemp("faults") / "straight"
    assert main(command(run)) == 0
    return run


def final_weights(run: Path) -> bytes:
    return (run / "checkpoints" / FINAL / "model.safetensors").read_bytes()


def assert_recovers(capsys, command, run: Path, straight: Path) -> str:
    """The same command again finishes the run with the uninterrupted run's weights."""
    code, out, err = run_cli(capsys, *command(run))
    assert code == 0, err
    assert "Traceback" not in err
    assert final_weights(run) == final_weights(straight)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    return err


# ---------------------------------------------------------------------------------------------
# Damaged checkpoint files


def resign(ckpt: Path, meta: dict | None = None) -> None:
    """Recompute every hash and meta.json's own, as a forger (or a buggy tool) would."""
    meta = meta if meta is not None else json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {n: ckpt_mod._sha256(ckpt / n) for n in HASHED_FILES if (ckpt / n).exists()}
    meta["meta_sha256"] = meta_digest(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def edit_meta(ckpt: Path, change: Callable[[dict], None], *, sign: bool) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    if sign:
        meta["meta_sha256"] = meta_digest(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_weights(ckpt: Path, change: Callable[[dict], None]) -> None:
    weights = load_file(str(ckpt / "model.safetensors"))
    change(weights)
    save_file(weights, str(ckpt / "model.safetensors"))
    resign(ckpt)


def reinterpret_as_int32(weights: dict) -> None:
    # same bytes, another dtype: loaded without a dtype check it would train on garbage
    weights["transformer.h.0.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"].view(torch.int32)


def wrong_shape(weights: dict) -> None:
    weights["transformer.h.0.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"][:-1].clone()


def poison(weights: dict) -> None:
    weights["transformer.ln_f.weight"] = torch.full_like(weights["transformer.ln_f.weight"], float("nan"))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/pocketlm-pwned",))


def pickled_code(ckpt: Path) -> None:
    import pickle

    (ckpt / "state.pt").write_bytes(pickle.dumps({"optimizer": Evil(), "progress": {}, "rng": {}}))
    resign(ckpt)


def foreign_state(ckpt: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, ckpt / "state.pt")
    resign(ckpt)


def other_tokenizer(ckpt: Path) -> None:
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": 50257, "content": "<|pad|>"})
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    resign(ckpt)


def delete(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).unlink()


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_text(text)


def config_without_model(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    del config["model"]
    (ckpt / "config.json").write_text(json.dumps(config))
    resign(ckpt)


# (file, case, damage, the file the one line names, whether `eval` needs that file)
DAMAGE = [
    ("meta", "empty", write("meta.json", ""), "meta.json", True),
    ("meta", "a JSON list", write("meta.json", "[]"), "meta.json", True),
    ("meta", "not JSON", write("meta.json", "{\"format\": 2,"), "meta.json", True),
    ("meta", "deleted", delete("meta.json"), "meta.json", True),
    ("meta", "step removed, re-signed", lambda c: edit_meta(c, lambda m: m.pop("step"), sign=True), "meta.json", True),
    ("meta", "step edited", lambda c: edit_meta(c, lambda m: m.update(step=3), sign=False), "meta.json", True),
    ("meta", "step edited, re-signed", lambda c: edit_meta(c, lambda m: m.update(step=6), sign=True), "meta.json", True),
    ("meta", "hash list emptied", lambda c: edit_meta(c, lambda m: m.update(files={}), sign=False), "meta.json", True),
    ("meta", "hash list emptied, re-signed", lambda c: edit_meta(c, lambda m: m.update(files={}), sign=True),
     "meta.json", True),
    ("config", "empty", write("config.json", ""), "config.json", True),
    ("config", "not JSON", write("config.json", "{"), "config.json", True),
    ("config", "a JSON list, re-signed", lambda c: (write("config.json", "[]")(c), resign(c)), "config.json", True),
    ("config", "model removed, re-signed", config_without_model, "config.json", True),
    ("state", "truncated", lambda c: truncate(c / "state.pt"), "state.pt", True),
    ("state", "one byte flipped", lambda c: flip_byte(c / "state.pt"), "state.pt", True),
    ("state", "deleted", delete("state.pt"), "state.pt", True),
    ("state", "pickled code, re-signed", pickled_code, "state.pt", False),
    ("state", "another program's state, re-signed", foreign_state, "state.pt", False),
    ("weights", "truncated", lambda c: truncate(c / "model.safetensors"), "model.safetensors", True),
    ("weights", "one byte flipped", lambda c: flip_byte(c / "model.safetensors"), "model.safetensors", True),
    ("weights", "deleted", delete("model.safetensors"), "model.safetensors", True),
    ("weights", "wrong shape, re-signed", lambda c: rewrite_weights(c, wrong_shape), "model.safetensors", True),
    ("weights", "int32 with the right byte count, re-signed", lambda c: rewrite_weights(c, reinterpret_as_int32),
     "model.safetensors", True),
    ("weights", "NaN, re-signed", lambda c: rewrite_weights(c, poison), "model.safetensors", True),
    ("tokenizer", "not JSON", write("tokenizer.json", "{"), "tokenizer.json", True),
    ("tokenizer", "deleted", delete("tokenizer.json"), "tokenizer.json", True),
    ("tokenizer", "another vocabulary, re-signed", other_tokenizer, "tokenizer.json", True),
]
DAMAGE_IDS = [f"{kind}: {case}" for kind, case, *_ in DAMAGE]


@pytest.fixture
def damaged_run(straight, tmp_path, request):
    """A copy of the finished run whose newest checkpoint is damaged as the case says."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    request.param[2](run / "checkpoints" / FINAL)
    return run, request.param


@pytest.mark.parametrize("damaged_run", DAMAGE, ids=DAMAGE_IDS, indirect=True)
def test_damaged_checkpoint_gets_one_line_naming_the_file(capsys, damaged_run, short_text):
    run, (_, _, _, names, eval_reads_it) = damaged_run
    ckpt = run / "checkpoints" / FINAL
    before = tree_digest(run)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", short_text)
    if eval_reads_it:
        assert_one_line_error(code, err, names)
    else:  # evaluation needs no training state; nothing in it was unpickled
        assert code == 0, err
    assert tree_digest(run) == before
    assert not Path("/tmp/pocketlm-pwned").exists()


@pytest.mark.parametrize("damaged_run", DAMAGE, ids=DAMAGE_IDS, indirect=True)
def test_resume_passes_over_the_damaged_checkpoint(capsys, monkeypatch, damaged_run, command):
    """The same command resumes from the previous checkpoint, warning with the damaged file's name
    (the training loop is stubbed: the end-to-end test below trains on from there)."""
    from pocketlm.train import TrainResult

    run, (_, _, _, names, _) = damaged_run
    opened = []
    monkeypatch.setattr("pocketlm.train.run_loop", lambda run, *rest: opened.append(run) or
                        TrainResult(run.out_dir, run.state.progress.step, None, None))
    code, _, err = run_cli(capsys, *command(run))
    assert code == 0, err
    assert opened[0].resumed_from.name == "step-00000002" and opened[0].state.progress.step == 2
    warning = [line for line in err.splitlines() if "resuming from the previous checkpoint, step-00000002" in line]
    assert len(warning) == 1 and names in warning[0], err
    assert not Path("/tmp/pocketlm-pwned").exists()


ONE_OF_EACH_FILE = [DAMAGE[DAMAGE_IDS.index(case)] for case in (
    "meta: step edited", "config: model removed, re-signed", "state: pickled code, re-signed",
    "weights: int32 with the right byte count, re-signed", "tokenizer: another vocabulary, re-signed")]


@pytest.mark.parametrize("damaged_run", ONE_OF_EACH_FILE, ids=[f"{k}: {c}" for k, c, *_ in ONE_OF_EACH_FILE],
                         indirect=True)
def test_resume_past_a_damaged_checkpoint_ends_bit_identical(capsys, damaged_run, command, straight):
    run, _ = damaged_run
    damaged = tree_digest(run / "checkpoints" / FINAL)
    assert_recovers(capsys, command, run, straight)
    # nothing is deleted: the damaged checkpoint is kept aside, where no resume picks it again (as
    # "superseded" when its files verify and only loading them showed the damage)
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.endswith(f"-{FINAL}")]
    assert [p.name for p in aside] in ([f"damaged-{FINAL}"], [f"superseded-{FINAL}"])
    assert tree_digest(aside[0]) == damaged
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", FINAL]


RUN_FILE_DAMAGE = [("empty", ""), ("not JSON", "{"), ("a JSON list", "[]")]


@pytest.mark.parametrize("case, text", RUN_FILE_DAMAGE, ids=[c for c, _ in RUN_FILE_DAMAGE])
def test_damaged_run_config_does_not_stop_the_run(capsys, straight, command, tmp_path, case, text):
    """The run folder's config.json is a record for people; the checkpoints hold what resumes."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / FINAL)  # an unfinished run
    (run / "config.json").write_text(text)
    assert_recovers(capsys, command, run, straight)
    assert json.loads((run / "config.json").read_text())["plan"]["total_steps"] == 4


def test_every_checkpoint_damaged_says_what_to_do_and_that_works(capsys, straight, command, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for ckpt in list_checkpoints(run):
        truncate(ckpt / "model.safetensors")
    before = tree_digest(run)
    for _ in range(2):  # the same command gives the same line, and changes nothing
        code, _, err = run_cli(capsys, *command(run))
        assert_one_line_error(code, err, "model.safetensors", "every checkpoint is damaged",
                              f"move {run / 'checkpoints'} aside")
        assert tree_digest(run) == before
    shutil.move(run / "checkpoints", tmp_path / "aside")  # what the line says to do
    assert_recovers(capsys, command, run, straight)


def test_explicit_resume_of_a_damaged_checkpoint_is_refused(capsys, straight, command, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    flip_byte(run / "checkpoints" / FINAL / "model.safetensors")
    code, _, err = run_cli(capsys, *command(tmp_path / "branch") + ["--resume", run / "checkpoints" / FINAL])
    assert_one_line_error(code, err, "model.safetensors", "checksum")


def test_generate_refuses_non_finite_weights(capsys, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    rewrite_weights(run / "checkpoints" / FINAL, poison)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", "The", "--max-new-tokens", "3")
    assert_one_line_error(code, err, "not finite", "earlier checkpoint")


# ---------------------------------------------------------------------------------------------
# Non-finite numbers


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose update would not be."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_training_from(monkeypatch, micro_batch: int, how: str) -> None:
    """From the given training micro-batch on (2 per step here), make the loss or its gradient NaN."""
    real = NextTokenLoss.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        loss = real(self, *args, **kwargs)
        if calls[0] < micro_batch:
            return loss
        return loss * float("nan") if how == "loss" else NanGradient.apply(loss)

    monkeypatch.setattr(NextTokenLoss, "forward", forward)


NAN_CASES = [("loss at step 1", "loss", 1), ("loss at step 4", "loss", 7), ("gradient at step 4", "grad", 8)]


@pytest.mark.parametrize("case, how, micro_batch", NAN_CASES, ids=[c for c, *_ in NAN_CASES])
def test_nan_is_never_saved_and_names_the_last_good_checkpoint(capsys, monkeypatch, command, straight, tmp_path,
                                                               case, how, micro_batch):
    run = tmp_path / "run"
    step = (micro_batch + 1) // 2
    last_good = "step-00000002" if step > 2 else "none"
    for attempt in range(2):  # a NaN that persists: the same command repeats the same line, saves nothing
        resumed_micro_batches = 4 if attempt and step > 2 else 0  # the second attempt starts after step 2
        monkeypatch.undo()
        poison_training_from(monkeypatch, micro_batch - resumed_micro_batches, how)
        code, _, err = run_cli(capsys, *command(run))
        line = assert_one_line_error(code, err, f"at step {step}", "nothing was saved", "lower --lr")
        assert re.search(rf"last good checkpoint: [^;]*{last_good}", line), line
        assert [p.name for p in list_checkpoints(run)] == ([] if step <= 2 else ["step-00000002"])
    if step > 2:
        assert (run / "checkpoints" / "step-00000002" / "model.safetensors").read_bytes() == \
            (straight / "checkpoints" / "step-00000002" / "model.safetensors").read_bytes()
    monkeypatch.undo()  # a passing fault (a flipped bit, a bad batch): the same command resumes
    assert_recovers(capsys, command, run, straight)


UPDATE_CASES = [("caught by the save", ["--save-interval", "1"], "weights became non-finite at step 3"),
                ("caught by validation", ["--save-interval", "1", "--eval-interval", "1"],
                 "validation loss became nan at step 3")]


@pytest.mark.parametrize("case, flags, needle", UPDATE_CASES, ids=[c for c, *_ in UPDATE_CASES])
def test_an_update_that_overflows_the_weights_is_never_saved(capsys, monkeypatch, command, tmp_path, case, flags,
                                                             needle):
    """The loss and gradient of step 3 are finite, its update is not (an overflow)."""
    from pocketlm.optim import Optimizers

    real, calls = Optimizers.step, [0]

    def step(self, scaler=None):
        real(self, scaler)
        calls[0] += 1
        if calls[0] == 3:
            for group in self.optimizers[0].param_groups:
                group["params"][0].data.fill_(float("inf"))

    monkeypatch.setattr(Optimizers, "step", step)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *command(run, *flags))
    line = assert_one_line_error(code, err, needle, "nothing was saved", "lower --lr")
    assert re.search(r"last good checkpoint: [^;]*step-00000002", line), line
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]


def test_eval_refuses_a_non_finite_loss(capsys, straight, tmp_path, short_text):
    """Finite weights whose loss is not (huge logits): eval says so rather than print NaN."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    rewrite_weights(run / "checkpoints" / FINAL,
                    lambda w: w.update({"transformer.ln_f.weight": torch.full_like(w["transformer.ln_f.weight"], 3e38)}))
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", short_text)
    assert_one_line_error(code, err, "non-finite loss")
    assert out == ""


# ---------------------------------------------------------------------------------------------
# A disk that refuses writes


def refuse_nth_call(monkeypatch, owner, name: str, n: int, code: int, *, partial: bool) -> None:
    """The n-th call fails as a disk would (after writing part of its file, if ``partial``)."""
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return real(*args, **kwargs)
        target = next((a for a in args if isinstance(a, (str, Path))), None)
        if partial and target is not None and not Path(target).is_dir():
            Path(target).write_bytes(b"\0" * 1000)
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(owner, name, wrapper)


DISK_CASES = [
    ("full while writing the weights", ckpt_mod, "save_file", errno.ENOSPC, "the disk is full"),
    ("full while writing the state", torch, "save", errno.ENOSPC, "the disk is full"),
    ("full while writing the tokenizer", ckpt_mod.Tokenizer, "save", errno.ENOSPC, "the disk is full"),
    ("full at the rename", ckpt_mod.os, "rename", errno.ENOSPC, "the disk is full"),
    ("quota used up", ckpt_mod, "save_file", errno.EDQUOT, "quota"),
    ("read-only while writing the weights", ckpt_mod, "save_file", errno.EROFS, "read-only"),
    ("read-only at the rename", ckpt_mod.os, "rename", errno.EROFS, "read-only"),
    ("permission denied while writing the state", torch, "save", errno.EACCES, "permission denied"),
    ("permission denied while writing the weights", ckpt_mod, "save_file", errno.EACCES, "permission denied"),
]


@pytest.mark.parametrize("case, owner, name, code, why", DISK_CASES, ids=[c for c, *_ in DISK_CASES])
def test_save_refused_by_the_disk_fails_cleanly(capsys, monkeypatch, command, straight, tmp_path, case, owner,
                                                name, code, why):
    run = tmp_path / "run"
    refuse_nth_call(monkeypatch, owner, name, 2, code, partial=True)  # the first save works, the second fails
    exit_code, _, err = run_cli(capsys, *command(run))
    assert_one_line_error(exit_code, err, "step 4", why, "needs about", "MB", "step-00000002", "is intact",
                          "run the same command")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # no temporary folder left
    monkeypatch.undo()  # space freed, permissions fixed
    assert_recovers(capsys, command, run, straight)


def test_log_write_refused_mid_run_fails_cleanly(capsys, monkeypatch, command, straight, tmp_path):
    run = tmp_path / "run"
    real, calls = MetricsLog.write, [0]

    def write(self, record):
        calls[0] += 1
        if record.get("event") == "step" and record["step"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real(self, record)

    monkeypatch.setattr(MetricsLog, "write", write)
    code, _, err = run_cli(capsys, *command(run))
    assert_one_line_error(code, err, "metrics.jsonl", "No space left", "run the same command again")
    monkeypatch.undo()
    assert_recovers(capsys, command, run, straight)


def test_out_dir_that_is_a_file_or_under_one(capsys, command, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out, needle in ((blocker, "is a file"), (blocker / "run", "under a file")):
        code, _, err = run_cli(capsys, *command(out))
        assert_one_line_error(code, err, needle, "--out-dir")
    assert blocker.read_text() == "not a folder"


def test_leftovers_of_a_refused_save_are_cleaned_up_by_the_next_start(capsys, command, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / FINAL)
    leftover = run / "checkpoints" / ".tmp-step-00000004-999999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 100)
    err = assert_recovers(capsys, command, run, straight)
    assert "removed .tmp-step-00000004-999999" in err


def test_low_space_is_warned_before_a_save(capsys, monkeypatch, command, straight, tmp_path):
    run = tmp_path / "run"
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda folder: 10_000_000)
    code, _, err = run_cli(capsys, *command(run))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("pocketlm: warning: only 10 MB free")]
    assert len(warnings) == 1 and "a checkpoint needs about" in warnings[0], err


def _user_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


REAL_DISK_SCRIPT = r"""
set -u
ARGS=("$@")
cmd() { "$PY" "$REPO/tests/fault_runner.py" none 0 train "${ARGS[@]}" --out-dir "$DISK/run" > /dev/null 2> "$RESULTS/$1.err"; echo "$?" > "$RESULTS/$1.code"; }
mount -t tmpfs -o size=70m tmpfs "$DISK"
cmd full1; ls -a "$DISK/run/checkpoints" > "$RESULTS/full1.ls"
cmd full2
mount -o remount,ro "$DISK"; cmd readonly
mount -o remount,rw,size=300m "$DISK"; cmd freed
sha256sum "$DISK/run/checkpoints/step-00000004/model.safetensors" > "$RESULTS/freed.sha"
"""


@pytest.mark.slow
@pytest.mark.skipif(not _user_namespaces_work(), reason="needs unshare and user namespaces to mount a small tmpfs")
def test_real_full_and_read_only_disk(tmp_path, small_yaml, corpus_file, straight):
    """A real 70 MB tmpfs: the second checkpoint does not fit; the same command says the same; the
    disk turns read-only; once space is freed the same command resumes to the uninterrupted weights."""
    results = tmp_path / "results"
    results.mkdir()
    args = [*SMALL, "--config", str(small_yaml), "--data", str(corpus_file), "--max-steps", "4"]
    env = dict(os.environ, PY=sys.executable, REPO=str(REPO), DISK=str(tmp_path / "disk"), RESULTS=str(results),
               PYTHONUNBUFFERED="1")
    (tmp_path / "disk").mkdir()
    subprocess.run(["unshare", "-r", "-m", "bash", "-c", REAL_DISK_SCRIPT, "script", *args], env=env, check=True,
                   timeout=600)

    def outcome(name):
        return int((results / f"{name}.code").read_text()), (results / f"{name}.err").read_text()

    for name in ("full1", "full2"):  # refused twice in the same words, nothing left behind
        code, err = outcome(name)
        assert_one_line_error(code, err, "the disk is full", "needs about", "step-00000002", "is intact")
    assert (results / "full1.ls").read_text().split() == [".", "..", "step-00000002"]
    code, err = outcome("readonly")
    assert_one_line_error(code, err, "Read-only file system")
    code, err = outcome("freed")
    assert code == 0, err
    expected = hashlib.sha256(final_weights(straight)).hexdigest()
    assert (results / "freed.sha").read_text().split()[0] == expected


# ---------------------------------------------------------------------------------------------
# Two trainers, and processes killed at any moment


def _cmd(*args) -> list[str]:
    return _runner("none", 0, "train", *args)


def _runner(point: str, n: int, *args) -> list[str]:
    return [sys.executable, str(REPO / "tests" / "fault_runner.py"), point, str(n), *map(str, args)]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", POCKETLM_CACHE=str(tmp_path / "cache"))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited early: {proc.stderr.read()}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.slow
def test_second_trainer_is_refused_while_the_first_runs_on(tmp_path, command, straight):
    run = tmp_path / "run"
    args = command(run)[1:]
    first = subprocess.Popen(_cmd(*args), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run / ".lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip() != "", first)
    first.send_signal(signal.SIGSTOP)  # holds the folder, mid-run, for as long as the second tries
    try:
        second = subprocess.run(_cmd(*args), env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second.returncode, second.stderr, "in use by another trainer",
                          f"pid {first.pid} on {socket.gethostname()}")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert final_weights(run) == final_weights(straight)
    assert lock.read_text() == ""  # released


def test_stale_lock_of_a_dead_trainer_is_taken_over(capsys, command, straight, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    err = assert_recovers(capsys, command, run, straight)
    assert f"took over a stale lock in {run} left by pid {dead.pid}" in err


KILL_POINTS = [("mid-step", 7), ("mid-eval", 2), ("weights-written", 2), ("state-written", 2), ("before-rename", 2),
               ("before-prune", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("point, nth", KILL_POINTS, ids=[f"{p}-{n}" for p, n in KILL_POINTS])
def test_kill_dash_nine_at_a_chosen_point_then_the_same_command_resumes_exactly(capsys, tmp_path, command,
                                                                                 straight, point, nth):
    run = tmp_path / "run"
    killed = subprocess.run(_runner(point, nth, *command(run)), env=_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_recovers(capsys, command, run, straight)


RANDOM_KILLS = 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(RANDOM_KILLS))
def test_kill_dash_nine_at_a_random_moment_then_the_same_command_resumes_exactly(capsys, tmp_path, command,
                                                                                  straight, seed):
    """Killed from outside at a random moment after the process started (mid-save included, when
    it lands there); the same command finishes the run."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(*command(run)[1:]), env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    proc.kill()
    proc.communicate(timeout=60)
    assert_recovers(capsys, command, run, straight)


# ---------------------------------------------------------------------------------------------
# The table in docs/reliability.md


def suite_counts() -> dict[str, int]:
    from test_config import BAD  # the config-value cases live beside the config's other tests

    return {
        "non-finite numbers": len(NAN_CASES) + len(UPDATE_CASES) + 2,
        "bad config values": 2 * len(BAD) + 6,
        "damaged checkpoint files": 2 * len(DAMAGE) + len(ONE_OF_EACH_FILE) + 2,
        "damaged run files": len(RUN_FILE_DAMAGE),
        "disk full, read-only, no permission": len(DISK_CASES) + 5,
        "two trainers on one folder": 2,
        "kill -9": len(KILL_POINTS) + RANDOM_KILLS,
        "resume that re-decides its plan": 3,
    }


def test_reliability_doc_counts_the_suite():
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = {m.group(1).strip(): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\| ([^|]+?) \| (\d+) \| (\d+) \|", text, flags=re.M)}
    counts = suite_counts()
    assert {k: v[0] for k, v in rows.items() if k in counts} == counts
    assert set(counts) <= set(rows)
    total = rows.get("total")
    assert total == (sum(counts.values()), sum(counts.values()))
