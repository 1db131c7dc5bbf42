"""Smoke test of benchmarks/cpu_kernels.py at toy shapes: every kernel pair runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_cpu_kernels_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import cpu_kernels  # benchmarks/ is on sys.path (conftest.py)

    threads = torch.get_num_threads()
    try:
        rc = cpu_kernels.main(["--batch-size", "1", "--seq-len", "32", "--n-embd", "32", "--n-head", "2",
                               "--repeats", "1", "--bands", "2", "--threads", "1",
                               "--update-docs", "--docs", str(tmp_path / "benchmarks.md")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    kernels = result["kernels"]
    assert set(kernels) == {"dropout", "gelu", "attention"}
    assert set(kernels["attention"]["ms"]) == {"sdpa_flash", "pocketlm", "pocketlm_2_bands"}
    assert all(ms > 0 for row in kernels.values() for ms in row["ms"].values())
    assert all(row["speedup"] > 0 and row["reference"] in row["ms"] for row in kernels.values())
    assert set(result["targets"]) == set(kernels)
    assert all(t["value"] == kernels[name]["speedup"] for name, t in result["targets"].items())
