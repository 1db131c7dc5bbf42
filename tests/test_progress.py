"""What a run prints while it runs: plain progress lines without a terminal, a bar with loss and
tokens/s from step 1 on one, and a word for the long pauses (evaluating, compiling)."""

from __future__ import annotations

import io
import re

import pytest

from pocketlm import progress as progress_mod
from pocketlm.config import build_train_config
from pocketlm.progress import ProgressReporter, format_duration
from pocketlm.train import train

LINE = re.compile(r"^step (\d+)/(\d+) \| loss \d+\.\d{4} \| [\d,]+ tok/s \| ETA (\d+m\d\ds|\d+h\d\dm|\?)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_at_a_steady_pace(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    out = io.StringIO()
    report = ProgressReporter(total=500, mode="auto", out=out, line_seconds=30, line_steps=100)
    assert report.mode == "lines"  # a StringIO is no terminal
    printed = []
    for step in range(1, 501):
        clock.now += 1.0 if step < 200 else 0.1  # slow steps first, then fast ones
        report.step(step, 5.0, 1000.0, None, 1e-4)
        if out.getvalue().count("\n") > len(printed):
            printed.append(step)
    # step 1 at once; then every 30 s while steps take 1 s; every 100 steps once they are fast; the last
    assert printed[:4] == [1, 31, 61, 91] and printed[-1] == 500
    gaps = [b - a for a, b in zip(printed, printed[1:])]
    assert all(g <= 100 for g in gaps)
    lines = out.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert LINE.match(lines[1]).group(3) == "7m49s"  # 469 steps left at 1 s each


def test_status_and_messages_in_line_mode():
    out = io.StringIO()
    report = ProgressReporter(total=3, mode="lines", out=out)
    report.status("evaluating")
    report.message("step 0: val_loss 10.0")
    assert out.getvalue() == "evaluating...\nstep 0: val_loss 10.0\n"
    silent = io.StringIO()
    off = ProgressReporter(total=3, mode="off", out=silent)
    off.status("evaluating")
    off.step(1, 1.0, 1.0, None, 1.0)
    assert silent.getvalue() == ""


def test_bar_shows_loss_and_speed_from_the_first_step():
    out = io.StringIO()
    report = ProgressReporter(total=10, mode="bar", out=out)
    report.status("compiling (about 60 s, first steps only)")
    assert "compiling (about 60 s" in out.getvalue()
    report.step(1, 4.25, 1234.0, 0.5, 3e-4)
    report.bar.refresh()
    shown = out.getvalue().split("\r")[-1]
    assert "1/10" in shown and "loss=4.250" in shown and "tok_s=1,234" in shown and "compiling" not in shown
    report.close()


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (59.6, "1m00s"), (3599, "59m59s"), (3600, "1h00m"),
                                           (7322, "2h02m"), (-5, "0m00s")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_training_without_a_terminal_prints_progress_lines(corpus_file, tmp_path, capsys):
    cfg = build_train_config(None, preset="tiny", model=dict(n_layer=1, n_embd=32, n_head=2, block_size=32),
                             data=str(corpus_file), out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                             max_steps=3, batch_size=2, grad_accum=1, precision="fp32", device="cpu",
                             eval_interval=3, eval_batches=1, log_interval=10)
    train(cfg, show_progress=None)  # capsys' stderr is not a terminal
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("step ") and "|" in line]
    assert [LINE.match(line).group(1) for line in steps] == ["1", "3"]  # the first and the last, not every 10th
    assert err.count("evaluating...") == 2  # step 0 and the end
