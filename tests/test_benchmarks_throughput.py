"""Smoke test of benchmarks/throughput.py: a tiny model, one warm-up and one timed step per row."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("pocketlm_throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path: Path, wiki_valid_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    bench = _load_benchmark()
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Memory\n\nkept as it is\n", encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--seq-len", "64", "--batch-size", "2",
                         "--grad-accum", "2", "--rows", "pocketlm_eager_bf16,hf_bf16", "--device", "cpu",
                         "--threads", "1", "--data", str(wiki_valid_path), "--data-repeat", "1",
                         "--update-docs", "--docs", str(docs), "--json-out", str(tmp_path / "result.json")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "result.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"pocketlm_eager_bf16", "hf_bf16"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] <= 1
        assert row["tokens_per_step"] == 2 * 64 * 2 and len(row["losses"]) == 2
    assert rows["hf_bf16"]["attn_implementation"]
    assert result["ratios"]["eager_bf16_vs_hf_bf16"] > 0
    assert result["peaks"]["bf16_flops"] > 0 and result["peaks"]["fp32_flops"] > 0
    assert result["data"]["tokens"] > 200_000 and result["data"]["reload_matches"]
    assert set(result["targets"]) == {"vs_hf_bf16_at_least_2x", "vs_hf_bf16_gpt2_dropouts_at_least_2x",
                                      "mfu_at_least_50pct", "tokenize_11mb_within_5s", "cache_reload_within_0_5s"}
    floor = result["kernel_floor"]
    assert floor["total_s"] > 0 and 0 < floor["mfu_ceiling"] <= 1
    text = docs.read_text(encoding="utf-8")
    assert "## Memory\n\nkept as it is\n" in text and "## Throughput" in text
    assert "| implementation | precision | compiled |" in text and "| HF `GPT2LMHeadModel` | bf16 | no |" in text
