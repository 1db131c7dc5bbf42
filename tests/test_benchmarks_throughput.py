"""Smoke test of benchmarks/throughput.py: a tiny model, one warm-up and one timed step per row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path: Path, wiki_valid_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    import throughput  # benchmarks/ is on sys.path (conftest.py)

    docs = tmp_path / "benchmarks.md"
    threads = torch.get_num_threads()
    try:  # fp32 rows: CPUs without native bf16 emulate it very slowly
        rc = throughput.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--seq-len", "64",
                              "--batch-size", "2", "--grad-accum", "2", "--rows", "pocketlm_fp32,hf_fp32",
                              "--device", "cpu", "--threads", "1", "--data", str(wiki_valid_path),
                              "--data-repeat", "1", "--update-docs", "--docs", str(docs),
                              "--json-out", str(tmp_path / "result.json")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert result["benchmark"] == "throughput" and result["command"].startswith("python benchmarks/throughput.py")
    assert set(result["load_average"]) == {"before", "after"} and result["machine"]["torch_threads"] == 1
    rows = result["rows"]
    assert set(rows) == {"pocketlm_fp32", "hf_fp32"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["precision"] == "fp32"
        assert row["tokens_per_step"] == 2 * 64 * 2 and len(row["losses"]) == 2 and len(row["step_s"]) == 1
    assert rows["pocketlm_fp32"]["implementation"] == "pocketlm" and rows["pocketlm_fp32"]["fused_loss"]
    assert rows["hf_fp32"]["attn_implementation"] and rows["hf_fp32"]["fused_adamw"]
    assert result["ratios"]["pocketlm_fp32_vs_hf_fp32"] > 0 and result["ratios"]["pocketlm_vs_hf_bf16"] is None
    assert result["peaks"]["fp32_flops"] > 0
    assert result["data"]["tokens"] > 200_000 and result["data"]["reload_matches"]
    targets = result["targets"]
    assert set(targets) == {"pocketlm_vs_hf_bf16", "pocketlm_vs_hf_bf16_gpt2_dropouts", "mfu", "tokenize_s", "reload_s"}
    assert all(set(t) >= {"goal", "bound", "value", "met"} for t in targets.values())
    assert targets["tokenize_s"]["met"] is None  # 1.1 MB is not the 11 MB the target is about
    floor = result["kernel_floor"]
    assert floor["total_s"] > 0 and floor["mfu_ceiling"] > 0
    assert docs.is_file()  # --update-docs wrote its section (the report writer's own test checks how)
