"""Smoke test of benchmarks/cpu_kernels.py at toy shapes: every kernel pair runs and the docs
section is written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_kernels.py"


@pytest.mark.slow
def test_cpu_kernels_benchmark_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("pocketlm_cpu_kernels_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    docs = tmp_path / "benchmarks.md"
    args = bench.parse_args(["--batch-size", "1", "--seq-len", "32", "--n-embd", "32", "--n-head", "2",
                             "--repeats", "1", "--update-docs", "--docs", str(docs)])
    result = bench.run(args)
    bench.update_docs(bench.docs_section(result), bench.SECTION, docs)
    kernels = result["kernels"]
    assert set(kernels) == {"dropout", "gelu", "attention"}
    assert set(kernels["attention"]["ms"]) == {"sdpa_flash", "pocketlm", "pocketlm_1_bands", "pocketlm_2_bands",
                                               "pocketlm_8_bands"}
    assert all(ms > 0 for row in kernels.values() for ms in row["ms"].values())
    text = docs.read_text()
    assert "## CPU kernels" in text and "| attention |" in text and "1 band " in text
