"""The command line: one-line errors with exit status 2, YAML configs, eval, and real processes
killed mid-run (SIGTERM and kill -9) that resume to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocketlm.checkpoint import latest_checkpoint
from pocketlm.losses import NextTokenLoss

from cli_checks import assert_one_line_error, run_cli, tree_digest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "tiny", "--batch-size", "2", "--grad-accum", "2", "--precision", "fp32", "--device", "cpu",
         "--eval-batches", "2", "--log-interval", "1", "--seed", "3"]


@pytest.fixture
def small_yaml(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("model:\n  n_layer: 1\n  n_embd: 64\n  n_head: 2\n  block_size: 64\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    (b"", "empty"),
    (b"   \n\n  ", "empty"),
    (b"\x00\x01\x02binary\x00", "binary"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
    (b"hello\n", "too small"),
])
def test_bad_data_gets_one_line(capsys, tmp_path, content, needle):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_cli(capsys, "train", *SMALL, "--data", path, "--out-dir", tmp_path / "run")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("flag, value, needle", [
    ("--batching", "zigzag", "--batching"),
    ("--precision", "fp8", "--precision"),
    ("--device", "tpu", "--device"),
    ("--max-steps", "0", "--max-steps"),
    ("--max-steps", "many", "--max-steps"),
    ("--lr", "-1", "--lr"),
    ("--preset", "gpt5", "preset"),
])
def test_bad_flag_values_get_one_line(capsys, tmp_path, corpus_file, flag, value, needle):
    code, _, err = run_cli(capsys, "train", "--data", corpus_file, "--out-dir", tmp_path / "run", flag, value)
    assert_one_line_error(code, err, needle)


def test_offline_hub_default_says_how_to_pass_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, _, err = run_cli(capsys, "train", *SMALL, "--out-dir", tmp_path / "run")
    assert_one_line_error(code, err, "Salesforce/wikitext", "--data")


def test_bad_yaml_gets_one_line(capsys, tmp_path, corpus_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed\n")
    code, _, err = run_cli(capsys, "train", "--config", bad, "--data", corpus_file)
    assert_one_line_error(code, err, "not valid YAML")
    bad.write_text("learning_rate: 0.1\n")
    code, _, err = run_cli(capsys, "train", "--config", bad, "--data", corpus_file)
    assert_one_line_error(code, err, "unknown field", "learning_rate")


def test_yaml_sets_fields_and_flags_override(capsys, tmp_path, corpus_file, small_yaml):
    small_yaml.write_text(small_yaml.read_text() + "max_steps: 1\nlr: 0.002\nseed: 11\n")
    code, out, err = run_cli(capsys, "train", *SMALL, "--config", small_yaml, "--data", corpus_file,
                             "--out-dir", tmp_path / "run", "--lr", "0.001")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["optim"]["max_steps"] == 1  # from YAML
    assert saved["train"]["optim"]["lr"] == 0.001  # flag beats YAML
    assert saved["train"]["run"]["seed"] == 3  # flag beats YAML
    assert saved["model"]["n_layer"] == 1 and saved["model"]["n_embd"] == 64
    assert "done: step 1" in out


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(capsys, tmp_path, corpus_file, small_yaml, monkeypatch):
    run = tmp_path / "run"
    args = ["train", *SMALL, "--config", small_yaml, "--data", corpus_file, "--out-dir", run, "--save-interval", "1"]
    code, _, err = run_cli(capsys, *args, "--max-steps", "2")
    assert code == 0, err
    before = tree_digest(run / "checkpoints")

    real = NextTokenLoss.forward
    monkeypatch.setattr(NextTokenLoss, "forward", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    # a longer run in a new dir, resumed from the good checkpoint, hits NaN at its first step
    code, _, err = run_cli(capsys, *args, "--max-steps", "4", "--out-dir", tmp_path / "run2",
                           "--resume", run)
    assert_one_line_error(code, err, "loss became nan")
    assert tree_digest(run / "checkpoints") == before
    assert latest_checkpoint(tmp_path / "run2") is None


def test_checkpoint_from_another_model_gets_one_line(capsys, tmp_path, corpus_file, small_yaml):
    code, _, err = run_cli(capsys, "train", *SMALL, "--config", small_yaml, "--data", corpus_file,
                           "--out-dir", tmp_path / "small", "--max-steps", "1")
    assert code == 0, err
    # the checkpoint's model is taken by a resume; a flag that contradicts it is refused
    code, _, err = run_cli(capsys, "train", *SMALL, "--data", corpus_file, "--out-dir", tmp_path / "other",
                           "--max-steps", "1", "--resume", tmp_path / "small", "--n-layer", "2")
    assert_one_line_error(code, err, "different model")


def test_eval_prints_metrics_and_json_last_line(capsys, tmp_path, corpus_file, small_yaml):
    code, _, err = run_cli(capsys, "train", *SMALL, "--config", small_yaml, "--data", corpus_file,
                           "--out-dir", tmp_path / "run", "--max-steps", "2")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run", "--data", corpus_file)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) >= {"loss", "ppl", "bpb", "word_ppl"}
    assert report["ppl"] == pytest.approx(2.718281828 ** report["loss"], rel=1e-6)
    assert report["word_ppl"] is not None  # WikiText text
    assert 0 < report["bpb"] < 20
    assert "bits/byte" in err


def test_eval_of_missing_checkpoint_gets_one_line(capsys, tmp_path, corpus_file):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "nothing", "--data", corpus_file)
    assert_one_line_error(code, err, "checkpoint not found")


# --------------------------------------------------------------------------------------------
# Real processes


def _cmd(*args):
    return [sys.executable, str(REPO / "train.py"), *map(str, args)]


def _env(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", POCKETLM_CACHE=str(tmp_path / "cache"))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _wait_for_checkpoint(proc, run, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest_checkpoint(run) is not None:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigterm_then_rerun_gives_identical_weights(tmp_path, corpus_file, small_yaml):
    """`python train.py` stopped with SIGTERM after its first checkpoint saves, says how to resume,
    and the same command again ends bit-identical to an uninterrupted run. (SIGKILL at chosen and
    random moments: test_faults.py.)"""
    args = [*SMALL, "--config", small_yaml, "--data", corpus_file, "--max-steps", "8", "--save-interval", "2",
            "--eval-interval", "4"]
    env = _env(tmp_path)
    straight = tmp_path / "straight"
    subprocess.run(_cmd(*args, "--out-dir", straight), env=env, check=True, capture_output=True, timeout=300)

    for sig, expected_code in ((signal.SIGTERM, 128 + signal.SIGTERM),):
        run = tmp_path / f"run-{sig.name}"
        proc = subprocess.Popen(_cmd(*args, "--out-dir", run), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _wait_for_checkpoint(proc, run)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            pytest.skip("the run finished before the signal landed")  # too fast to interrupt
        assert proc.returncode == expected_code, err
        if sig == signal.SIGTERM:
            assert "run the same command again to resume" in err
            assert "Traceback" not in err
        done = subprocess.run(_cmd(*args, "--out-dir", run), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        final = latest_checkpoint(run)
        assert final.name == "step-00000008"
        assert (final / "model.safetensors").read_bytes() == \
            (latest_checkpoint(straight) / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_smoke_tiny_preset_on_wikitext_loss_falls(tmp_path, wiki_valid_path):
    """The README's smoke run in miniature: tiny preset on wiki.valid.raw; the loss falls, the run
    checkpoints, eval reads the checkpoint and a re-run with more steps is refused."""
    run = tmp_path / "run"
    env = _env(tmp_path)
    done = subprocess.run(_cmd("--preset", "tiny", "--data", wiki_valid_path, "--out-dir", run, "--max-steps", "30",
                               "--grad-accum", "1", "--eval-interval", "15", "--eval-batches", "8", "--lr", "2e-3"),
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in records if r["event"] == "step"]
    evals = [r["val_loss"] for r in records if r["event"] == "eval"]
    assert steps[-1] < steps[0] - 1.0
    assert evals[-1] < evals[0]
    assert latest_checkpoint(run).name == "step-00000030"
    ev = subprocess.run([sys.executable, "-m", "pocketlm.cli", "eval", "--checkpoint", str(run), "--data",
                         str(wiki_valid_path)], env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(evals[-1], rel=0.05)


# --------------------------------------------------------------------------------------------
# The first hour of a new user


def test_unreachable_hub_fails_within_seconds_in_one_line(capsys, tmp_path, monkeypatch):
    """No offline variables set, the Hub's endpoint refusing connections: the trainer must not sit
    through the Hub client's retries, and must print only its own line."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "train", *SMALL, "--out-dir", tmp_path / "run")
    assert time.perf_counter() - started < 5
    assert_one_line_error(code, err, "Hub is out of reach", "--data PATH")
    assert err.strip().count("\n") == 0  # nothing else on stderr
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # restored


def test_hub_probe_follows_the_endpoint(monkeypatch):
    import socket

    from huggingface_hub import constants

    from pocketlm.data import hub_reachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=2)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert not hub_reachable(timeout=2)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub_reachable(timeout=2)


def test_version_and_python_dash_m(capsys):
    from pocketlm import __version__

    assert run_cli(capsys, "--version")[:2] == (0, f"pocketlm {__version__}\n")
    proc = subprocess.run([sys.executable, "-m", "pocketlm", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--grad-accum" in proc.stdout and "--min-lr-ratio" in proc.stdout


def test_every_config_field_has_a_flag_with_its_help():
    import dataclasses

    from pocketlm.cli import train_parameters
    from pocketlm.config import SECTIONS, ModelConfig, field_docs

    params = {p.name: p for p in train_parameters()}
    for cls in [*SECTIONS.values(), ModelConfig]:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in params, f.name
            help_text = params[f.name].default.help
            assert docs[f.name].split()[0] in help_text, (f.name, help_text)


def test_plan_on_a_cpu_only_machine_plans_for_the_cpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, _ = run_cli(capsys, "plan", "--preset", "tiny")
    assert code == 0 and out.startswith("tiny on cpu, ")
    assert json.loads(out.strip().splitlines()[-1])["device"] == "cpu"
    code, out, _ = run_cli(capsys, "plan", "--preset", "tiny", "--device", "cuda", "--precision", "fp16")
    assert code == 0 and out.startswith("tiny on cuda, ") and ", fp16, " in out.splitlines()[0]
