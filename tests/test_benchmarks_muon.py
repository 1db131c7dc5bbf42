"""benchmarks/muon_step.py at a toy width: both optimizers step, the report reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def test_muon_step_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import muon_step  # benchmarks/ is on sys.path (conftest.py)

    threads = torch.get_num_threads()
    docs = tmp_path / "benchmarks.md"
    try:
        rc = muon_step.main(["--n-embd", "32", "--repeats", "1", "--threads", "1", "--update-docs", "--docs",
                             str(docs)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matrices"] == 4 and set(result["seconds"]) == {"bf16", "fp32"}
    assert all(s > 0 for s in result["seconds"].values())
    assert 0 < result["relative_difference"] < 0.05  # the same update up to bf16's rounding
    from pocketlm.device import cpu_has_native_bf16

    assert result["chosen"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    target = result["targets"]["chosen_over_fastest"]
    assert target["value"] >= 1.0 and target["met"] is (target["value"] <= 1.0)
    assert muon_step.SECTION in docs.read_text()
