"""Smoke test of benchmarks/memory.py on a tiny seed workload: every row, check and target present."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    import memory  # benchmarks/ is on sys.path (conftest.py)

    threads = torch.get_num_threads()
    try:
        rc = memory.main(["--preset", "tiny", "--batch-size", "1", "--seq-len", "32", "--precision", "fp32",
                          "--device", "cpu", "--threads", "1", "--grid", "tiny:1:32", "--throughput-steps", "1",
                          "--no-rss-check", "--update-docs", "--docs", str(tmp_path / "benchmarks.md")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["results"]
    assert set(rows) == set(memory.SEED_ROWS)
    for row in rows.values():
        assert row["static_bytes"]["total"] < row["peak_bytes"] and row["method"] == "dispatch-tracker"
    assert rows["pocketlm_no_savers"]["fused_loss"] is False and rows["pocketlm_no_savers"]["checkpointing"] == "none"
    assert rows["pocketlm_low_memory"]["low_memory"] and rows["hf"]["implementation"].startswith("transformers")
    assert "planner_rel_error" in rows["pocketlm"] and "planner_rel_error" not in rows["pocketlm_single"]
    assert all(check["memtracker_agrees"] for check in result["checks"]["memtracker"].values())
    modes = {g["checkpointing_mode"] for g in result["grid"]}
    assert modes == {"none", "selective", "full (= the default on 2 blocks)", "low memory"}
    tp = result["throughput"]["rows"]
    assert set(tp) == set(memory.THROUGHPUT_SETTINGS) and all(r["tokens_per_s"] > 0 for r in tp.values())
    assert all(r["max_abs_loss_diff_vs_no_savers"] < 1e-3 for r in tp.values())  # the savers change no result
    targets = result["targets"]
    assert set(targets) == set(memory.TARGETS)
    assert targets["default_peak_gib"]["value"] == rows["pocketlm"]["peak_gib"] and targets["default_peak_gib"]["met"]
    assert targets["fp32_weights_and_state"]["met"] is True
    assert result["planner"]["configurations"] == 3 + 4  # the seed rows with gradients alive, the grid rows


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_rss_child_reports_the_rise_of_one_step() -> None:
    import memory

    out = memory.rss_child("tiny", 1, 16, "fp32")
    assert out["peak_rss"] >= out["rss_before_step"] > 0 and out["rise_bytes"] >= 0
