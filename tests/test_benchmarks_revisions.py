"""Smoke test of benchmarks/revisions.py: the same tree twice gives the same losses and weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_same_tree_twice_is_the_same_trainer(tmp_path: Path, wiki_valid_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("pocketlm_revisions_benchmark", REPO / "benchmarks" / "revisions.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        rc = bench.main([str(REPO), str(REPO), "--preset", "tiny", "--batch-size", "2", "--steps", "3",
                         "--rounds", "1", "--threads", "1", "--data", str(wiki_valid_path),
                         "--json-out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)  # --threads sets this process's count too
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "r.json").read_text())
    for tree in result["trees"].values():
        assert tree["package"].startswith(str(REPO / "src")) and len(tree["losses"]) == 3
        assert tree["tokens_per_s_median"] > 0 and tree["peak_rss_gib"] > 0 and not tree["compiled"]
    assert result["comparison"]["same_losses"] and result["comparison"]["same_weights"]
    assert result["settings"]["max_steps"] == 3 and result["rounds"] == 1
