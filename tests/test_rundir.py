"""The run folder's rules: one trainer per folder, a folder without a checkpoint starts afresh,
and a resume takes its settings from the checkpoint, refusing flags that contradict it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pocketlm.cli import main
from pocketlm.config import given_settings
from pocketlm.errors import CheckpointError, ConfigError
from pocketlm.metrics import METRICS_FILE
from pocketlm.rundir import LOCK_FILE, RunLock, resolve_settings, set_aside_old_log
from pocketlm.train import train

TINY = dict(preset="tiny", n_layer=1, n_embd=32, n_head=2, block_size=32, max_steps=2, batch_size=2, grad_accum=1,
            precision="fp32", device="cpu", eval_interval=2, eval_batches=1, save_interval=2, lr=1e-3, seed=3)


@pytest.fixture(scope="module")
def finished_run(corpus_file, tmp_path_factory):
    """A two-step run with one checkpoint (step 2)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = resolve_settings(given_settings(None, **TINY, data=str(corpus_file), out_dir=str(out)))
    train(cfg, show_progress=False)
    return out


# --------------------------------------------------------------------------------------------
# One trainer per folder


def test_second_trainer_on_the_same_folder_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match="in use by another trainer .*pid %d" % os.getpid()):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit: the folder is free again
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_lock_of_another_process_is_held_until_it_dies(tmp_path):
    """flock is held by the kernel for the live process, whatever it is doing; when it dies (even
    by SIGKILL) the lock is free, and its stale pid is taken over with a warning."""
    code = ("import sys, time; from pathlib import Path; from pocketlm.rundir import RunLock\n"
            "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    warnings = []
    with RunLock(tmp_path, warn=warnings.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and f"stale lock in {tmp_path} left by pid {holder.pid}" in warnings[0]


def test_cli_refuses_a_second_trainer_in_one_line(capsys, tmp_path, corpus_file):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        code = main(["train", "--preset", "tiny", "--data", str(corpus_file), "--out-dir", str(out),
                     "--max-steps", "1", "--device", "cpu", "--precision", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pocketlm: error: ") and "in use" in err[0]
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# A folder without a checkpoint


def test_folder_without_checkpoint_starts_afresh_keeping_its_old_log(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"train": {"optim": {"lr": 0.5}}}))  # another run's settings
    (out / METRICS_FILE).write_text('{"event": "start"}\n')
    args = ["train", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in TINY.items()), []),
            "--data", str(corpus_file), "--out-dir", str(out)]
    assert main(args) == 0
    assert "held no checkpoint: starting afresh" in capsys.readouterr().err
    assert (out / "metrics.1.jsonl").read_text() == '{"event": "start"}\n'
    starts = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()
              if json.loads(line)["event"] == "start"]
    assert len(starts) == 1  # the new log has this run's start only


def test_missing_data_is_reported_before_the_folder_is_judged(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"train": {"optim": {"lr": 0.5}}}))
    (out / METRICS_FILE).write_text('{"event": "start"}\n')
    code = main(["train", "--preset", "tiny", "--data", str(tmp_path / "nofile.txt"), "--out-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not found" in err[0] and "different settings" not in err[0]
    assert (out / METRICS_FILE).read_text() == '{"event": "start"}\n'  # nothing touched


def test_set_aside_numbers_the_old_logs(tmp_path):
    assert set_aside_old_log(tmp_path) is None
    for n in (1, 2):
        (tmp_path / METRICS_FILE).write_text(str(n))
        (tmp_path / "tb").mkdir()
        assert set_aside_old_log(tmp_path) == tmp_path / f"metrics.{n}.jsonl"
        assert (tmp_path / f"tb.{n}").is_dir() and not (tmp_path / "tb").exists()
    assert [(tmp_path / f"metrics.{n}.jsonl").read_text() for n in (1, 2)] == ["1", "2"]


# --------------------------------------------------------------------------------------------
# Resume and branch take the checkpoint's settings


def test_resume_needs_no_flags_but_the_folder(finished_run):
    cfg = resolve_settings({"out_dir": str(finished_run)})
    assert cfg.preset == "tiny" and cfg.model_config().n_embd == 32 and cfg.optim.lr == 1e-3
    assert cfg.run.seed == 3 and cfg.dataset.data is not None and cfg.optim.max_steps == 2


def test_branch_takes_model_data_and_recipe_from_the_checkpoint(finished_run, tmp_path):
    cfg = resolve_settings({"resume": str(finished_run), "out_dir": str(tmp_path / "more"), "max_steps": 4})
    assert cfg.model_config().n_layer == 1 and cfg.optim.max_steps == 4 and cfg.optim.batch_size == 2
    result = train(cfg, show_progress=False)
    assert result.step == 4 and result.final_checkpoint.name == "step-00000004"


@pytest.mark.parametrize("given, needle", [
    ({"lr": 0.01}, "--lr 0.01 contradicts the run"),
    ({"seed": 4}, "--seed 4 contradicts the run"),
    ({"batching": "pack"}, "--batching 'pack' contradicts the run"),
    ({"max_steps": 9}, "to change it, branch with --resume CHECKPOINT --out-dir NEW"),
])
def test_flag_that_contradicts_the_run_is_refused_naming_it(finished_run, given, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
        resolve_settings({"out_dir": str(finished_run), **given})


def test_model_flag_that_contradicts_the_checkpoint_is_refused(finished_run):
    with pytest.raises(CheckpointError, match="different model .*n_layer 1 vs 3"):
        resolve_settings({"out_dir": str(finished_run), "model": {"n_layer": 3}})


def test_free_settings_may_change_on_resume(finished_run):
    cfg = resolve_settings({"out_dir": str(finished_run), "eval_interval": 7, "keep_checkpoints": 5,
                            "checkpointing": "full"})
    assert (cfg.run.eval_interval, cfg.run.keep_checkpoints, cfg.memory.checkpointing) == (7, 5, "full")
