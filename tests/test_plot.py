"""`pocketlm plot`: loss and learning-rate curves against tokens seen, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pocketlm.config import build_train_config
from pocketlm.errors import DataError
from pocketlm.plot import plot_runs, read_curves, tokens_at
from pocketlm.train import train
from test_cli import assert_one_line_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, records: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return folder


def fabricated(tokens_per_step: int, steps: int = 20, lr: float = 1e-3) -> list[dict]:
    records: list[dict] = [{"event": "start", "n_params": 1000}, {"event": "eval", "step": 0, "val_loss": 10.0}]
    for step in range(2, steps + 1, 2):
        records.append({"event": "step", "step": step, "loss": 10 - step / 4, "lr": lr * (1 - step / (2 * steps)),
                        "tokens_seen": step * tokens_per_step})
        if step % 10 == 0:
            records.append({"event": "eval", "step": step, "val_loss": 10.2 - step / 4})
    return records


def test_two_fabricated_runs_on_one_chart(capsys, tmp_path) -> None:
    a = write_run(tmp_path / "a" / "tiny", fabricated(100))
    b = write_run(tmp_path / "b" / "tiny", fabricated(300, steps=30, lr=2e-3))
    out = tmp_path / "charts" / "loss.png"
    code, stdout, err = run_cli(capsys, "plot", a, b, "--out", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    assert stdout.splitlines()[0] == f"wrote {out}: 2 runs"
    assert "a/tiny: 20 steps, 2,000 tokens; training loss 9.500 -> 5.000; validation 10.000 -> 5.200" in stdout
    assert "b/tiny: 30 steps, 9,000 tokens" in stdout  # same folder names: told apart by their parents
    curves = read_curves(a)
    assert curves.eval_steps.tolist() == [0, 10, 20] and curves.eval_tokens.tolist() == [0, 1000, 2000]
    assert plot_runs([a], tmp_path / "loss.svg")[0].name == "tiny"
    assert (tmp_path / "loss.svg").read_text().lstrip().startswith("<?xml")


def test_eval_steps_map_to_tokens_between_and_beyond_logged_steps() -> None:
    steps, tokens = np.array([10, 20]), np.array([1000.0, 2100.0])
    assert tokens_at(np.array([0, 5, 10, 15, 20, 30]), steps, tokens).tolist() == [0, 500, 1000, 1550, 2100, 3150]


def test_a_resumed_run_counts_each_step_once_the_later_line_winning(tmp_path) -> None:
    """Steps trained again after a crash are logged twice; the resumed run's lines are the real ones."""
    records = fabricated(100, steps=6)
    replay = [{"event": "start"}, {"event": "step", "step": 4, "loss": 1.5, "lr": 1e-4, "tokens_seen": 400},
              {"event": "step", "step": 6, "loss": 1.25, "lr": 1e-4, "tokens_seen": 600}]
    curves = read_curves(write_run(tmp_path / "run", records + replay))
    assert curves.steps.tolist() == [2, 4, 6] and curves.loss.tolist() == [9.5, 1.5, 1.25]


def test_a_last_line_cut_short_is_left_out_but_other_damage_is_an_error(capsys, tmp_path) -> None:
    cut = write_run(tmp_path / "cut", fabricated(100), tail='{"event": "step", "step": 22, "lo')
    assert read_curves(cut).steps[-1] == 20
    damaged = write_run(tmp_path / "damaged", fabricated(100))
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:10]
    (damaged / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "plot", cut, damaged, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "is damaged: line 4 is not valid JSON")
    assert not (tmp_path / "x.png").exists()


def test_missing_empty_or_unusable_metrics_are_one_line_errors(capsys, tmp_path) -> None:
    good = write_run(tmp_path / "good", fabricated(100))
    (tmp_path / "no-metrics").mkdir()
    empty = write_run(tmp_path / "empty", [])
    evals_only = write_run(tmp_path / "evals", [{"event": "start"}, {"event": "eval", "step": 0, "val_loss": 9.0}])
    old = write_run(tmp_path / "old", [{"event": "step", "step": 1, "loss": 9.0, "lr": 1e-4}])
    cases = [([tmp_path / "no-metrics"], "has no metrics.jsonl"), ([tmp_path / "nowhere"], "not found"),
             ([empty], "holds no training steps"), ([evals_only], "only evaluations"),
             ([old], "without tokens_seen")]
    for runs, needle in cases:
        code, _, err = run_cli(capsys, "plot", *runs, "--out", tmp_path / "x.png")
        assert_one_line_error(code, err, needle)
    code, _, err = run_cli(capsys, "plot", good, "--out", tmp_path / "x.bmpx")
    assert_one_line_error(code, err, "unknown image format")
    with pytest.raises(DataError, match="at least one run"):
        plot_runs([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_real_run(capsys, tmp_path, corpus_file) -> None:
    cfg = build_train_config(None, preset="tiny", model={"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32},
                             data=str(corpus_file), out_dir=str(tmp_path / "run"), max_steps=4, eval_interval=2,
                             eval_batches=2, log_interval=1, batch_size=2, grad_accum=1, device="cpu",
                             precision="fp32", compile=False)
    result = train(cfg, show_progress=False)
    code, out, err = run_cli(capsys, "plot", result.out_dir, "--out", tmp_path / "loss.png")
    assert code == 0, err
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    curves = read_curves(result.out_dir)
    seen = [r["tokens_seen"] for r in result.history if r["event"] == "step"]
    assert curves.steps.tolist() == [1, 2, 3, 4] and curves.tokens.tolist() == seen
    assert curves.eval_steps.tolist() == [0, 2, 4] and curves.eval_tokens.tolist() == [0, seen[1], seen[3]]
