"""benchmarks/gpu_check.py: its dry run on the CPU (every step wired, toy sizes) and the report a
GPU run's result renders to, so the check is ready when a GPU is at hand."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

MIB, GIB = 2 ** 20, 2 ** 30

STEPS = {"device", "cuda_tests", "memory", "small_card", "throughput", "generation"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory, wiki_valid_path: Path) -> tuple[dict, Path, Path]:
    """One dry run for the module: the JSON it printed, its --out file and the docs it wrote."""
    pytest.importorskip("transformers")
    import gpu_check  # benchmarks/ is on sys.path (conftest.py)

    tmp = tmp_path_factory.mktemp("gpu-check")
    out, docs = tmp / "gpu_check.json", tmp / "benchmarks.md"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = gpu_check.main(["--dry-run", "--out", str(out), "--data", str(wiki_valid_path), "--update-docs",
                             "--docs", str(docs)])
    assert rc == 0
    result = json.loads(printed.getvalue())
    return result, out, docs


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_its_json(dry_run):
    result, out, _ = dry_run
    assert result == json.loads(out.read_text())
    assert result["benchmark"] == "gpu_check" and result["dry_run"] is True
    assert result["command"].startswith("python benchmarks/gpu_check.py --dry-run")
    sections = result["sections"]
    assert set(sections) == STEPS
    assert all(step["ok"] and step["seconds"] >= 0 for step in sections.values()), sections
    assert sections["device"]["skipped"]
    tests = sections["cuda_tests"]  # no GPU: every CUDA case skips, none fails
    assert tests["returncode"] == 0 and tests["skipped_tests"] >= 8 and tests["passed"] == tests["failed"] == 0
    memory = sections["memory"]["rows"]["defaults"]
    assert memory["peak_bytes"] > 0 and abs(memory["planner_rel_error"]) < 0.15
    card = sections["small_card"]["runs"]
    assert card["fp16"]["skipped"]
    assert card["fp32"]["ok"] and card["fp32"]["steps_done"] == 2 and card["fp32"]["finite"]
    assert card["fp32"]["plan"]["predicted_peak_bytes"] > 0 and not card["fp32"]["oom_events"]
    rows = sections["throughput"]["rows"]
    assert set(rows) == {"pocketlm_fp32", "hf_fp32"} and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert sections["throughput"]["ratios"]["pocketlm_fp32_vs_hf_fp32"] > 0
    for batch in sections["generation"]["batches"].values():
        assert batch["tokens_per_s"]["pocketlm"] > 0 and batch["tokens_per_s"]["hf"] > 0
        assert all(batch["same_tokens_as_hf"].values())
    assert set(result["targets"]) == {"cuda_tests_failed", "planner_worst_error", "small_card_ok"}
    assert all(t["met"] is None for t in result["targets"].values())  # a dry run measures no GPU
    assert result["planner_figures"]["documented"]["context_bytes"] > 0


@pytest.mark.slow
def test_dry_run_writes_its_section_beside_the_json_and_into_the_docs(dry_run, capsys):
    import gpu_check

    result, out, docs = dry_run
    section = out.with_suffix(".md").read_text()
    assert section.startswith("## GPU\n") and "dry run" in section and "No GPU has run pocketlm yet" in section
    assert section in docs.read_text()
    assert gpu_check.main(["--from-json", str(out)]) == 0  # renders the same section again, later
    assert capsys.readouterr().out.strip() == section.strip()


def gpu_result() -> dict:
    """What a GPU run writes, in brief: one failed CUDA test, an allocator 20% above the allocated
    peak, a bigger context than documented, and a simulated card whose fp16 run ran out of memory."""
    context = {"bytes": 500 * MIB, "method": "nvidia-smi"}
    memory = {"peak_bytes": 2 * GIB, "planner_predicted_bytes": int(2.1 * GIB), "planner_rel_error": 0.05,
              "reserved_peak_bytes": int(2.4 * GIB), "reserved_over_allocated": 0.2}
    card = {"ok": True, "steps_done": 30, "losses": [10.9, 7.5], "oom_events": [], "error": None,
            "plan": {"batch_size": 8, "grad_accum": 2, "checkpointing": "selective", "predicted_peak_bytes": 3 * GIB},
            "allocated_peak_bytes": 3 * GIB, "reserved_peak_bytes": 3 * GIB + 256 * MIB,
            "context_at_end_bytes": 600 * MIB}
    row = {"implementation": "pocketlm", "precision": "bf16", "compiled": True, "micro_batch": 4, "grad_accum": 4,
           "tokens_per_s": 250_000.0, "mfu": 0.2}
    return {
        "benchmark": "gpu_check", "date": "2026-12-04 10:00 UTC", "command": "python benchmarks/gpu_check.py",
        "machine": {"cpu": "x86", "usable_cores": 16, "logical_cores": 16, "torch_threads": 16, "torch": "2.11",
                    "transformers": "5.17", "python": "3.12", "device": "cuda", "gpu": "NVIDIA H200"},
        "load_average": {"before": 0.1, "after": 2.0}, "runtime_s": 400.0, "dry_run": False,
        "sections": {
            "device": {"ok": True, "seconds": 3.0, "name": "NVIDIA H200", "total_memory_bytes": 140 * GIB,
                       "context": {"after_init": context, "at_end": context}},
            "cuda_tests": {"ok": True, "seconds": 60.0, "passed": 9, "failed": 1, "errors": 0, "skipped_tests": 0,
                           "summary": "1 failed, 9 passed in 50s"},
            "memory": {"ok": True, "seconds": 20.0, "rows": {"defaults": memory},
                       "workload": {"preset": "gpt2-125m", "batch_size": 4, "seq_len": 512, "grad_accum": 4,
                                    "precision": "bf16"}},
            "small_card": {"ok": True, "seconds": 50.0, "card": "4GB",
                           "runs": {"bf16": card, "fp16": {"ok": False, "error": "TrainingError: out of memory",
                                                            "steps_done": 3, "losses": [10.9], "plan": {},
                                                            "oom_events": [{"step": 1}]}}},
            "throughput": {"ok": True, "seconds": 120.0, "rows": {"pocketlm": row},
                           "ratios": {"pocketlm_vs_hf_bf16": 1.3}, "peak_source": "datasheet bf16",
                           "workload": {"preset": "gpt2-125m", "seq_len": 512, "tokens_per_step": 8192,
                                        "timed_steps": 5, "warmup_steps": 3}},
            "generation": {"ok": False, "seconds": 1.0, "error": "RuntimeError: boom | twice"}}}


def test_a_gpu_result_renders_its_findings():
    import gpu_check

    r = gpu_result()
    r["planner_figures"] = gpu_check.planner_figures(r["sections"])
    r["targets"] = gpu_check.verdicts(r["sections"])
    assert r["planner_figures"]["measured"] == {"context_bytes": 600 * MIB, "fragmentation": 0.2}
    assert {k: t["met"] for k, t in r["targets"].items()} == {"cuda_tests_failed": False, "planner_worst_error": True,
                                                               "small_card_ok": False}
    assert r["targets"]["small_card_ok"]["value"] == 0.5
    section = gpu_check.docs_section(r)
    assert "checked by `benchmarks/gpu_check.py` on NVIDIA H200" in section
    assert "measured here 600 MiB" in section and "+20.0%" in section  # the figures to replace the planner's
    assert "**failed** (TrainingError: out of memory)" in section and "1 failed, 9 passed" in section
    assert "**failed**: RuntimeError: boom / twice" in section  # a failed step, its message table-safe
    assert "250,000" in section and "20.0%" in section


def test_junit_counts(tmp_path):
    import gpu_check

    path = tmp_path / "junit.xml"
    path.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                    '<testcase classname="tests.test_cuda" name="test_a[cuda]"><failure message="x"/></testcase>'
                    '<testcase classname="tests.test_cuda" name="test_b[cuda]"/></testsuite></testsuites>')
    assert gpu_check.junit_counts(path) == {"passed": 1, "failed": 1, "errors": 0, "skipped_tests": 2,
                                            "failed_tests": ["tests.test_cuda::test_a[cuda]"]}
