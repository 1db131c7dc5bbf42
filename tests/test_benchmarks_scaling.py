"""benchmarks/scaling.py's arithmetic and report (the runs themselves are torchrun launches of
the trainer, which tests/test_distributed.py covers)."""

from __future__ import annotations

import _common as common  # benchmarks/ is on sys.path (conftest.py)
import scaling

GIB = 1024 ** 3


def launch_result(nproc: int, speeds: list[float], losses: list[float], rise_gib: float, before_gib: float = 0.5,
                  cuda: float | None = None) -> dict:
    steps = [{"tokens_per_s": v, "loss": loss} for v, loss in zip(speeds, losses)]
    ranks = [{"rank": r, "rss_before_bytes": int(before_gib * GIB), "peak_rss_bytes": int((before_gib + rise_gib) * GIB),
              "cuda_peak_allocated_bytes": None if cuda is None else int(cuda * GIB)} for r in range(nproc)]
    return {"steps": steps, "ranks": ranks}


def test_throughput_is_the_median_after_the_skipped_steps_and_per_rank_divides_it() -> None:
    row = scaling.throughput(launch_result(2, [10.0, 900.0, 1000.0, 1100.0], [5, 4, 3, 2], 1.0), 2, skip=1)
    assert row["tokens_per_s"] == 1000.0 and row["tokens_per_s_per_rank"] == 500.0 and row["losses"] == [5, 4, 3, 2]


def test_memory_takes_the_largest_rank() -> None:
    result = launch_result(2, [1.0], [1.0], 1.0)
    result["ranks"][1]["peak_rss_bytes"] += GIB
    row = scaling.memory(result, 2, "FSDP")
    assert row["peak_rss_bytes"] == int(2.5 * GIB) and row["rss_rise_bytes"] == 2 * GIB
    assert row["cuda_peak_allocated_bytes"] is None


def test_report_gives_efficiency_loss_agreement_and_the_memory_ratio() -> None:
    section = {"device": "cpu", "precision": "fp32",
               "throughput": [{"nproc": 1, "tokens_per_s": 1000.0, "tokens_per_s_per_rank": 1000.0,
                               "efficiency": 1.0, "max_loss_difference": 0.0},
                              {"nproc": 2, "tokens_per_s": 1500.0, "tokens_per_s_per_rank": 750.0,
                               "efficiency": 0.75, "max_loss_difference": 2e-7}],
               "memory": [scaling.memory(launch_result(1, [1.0], [1.0], 2.0), 1, "one process"),
                          scaling.memory(launch_result(2, [1.0], [1.0], 2.0), 2, "DDP"),
                          scaling.memory(launch_result(2, [1.0], [1.0], 1.2), 2, "FSDP")]}
    result = {"benchmark": "scaling", "date": "2026-01-01 00:00 UTC", "command": "python benchmarks/scaling.py",
              "machine": common.machine_info("cpu"), "load_average": {"before": 0.1, "after": 2.0}, "runtime_s": 300.0,
              "throughput_preset": "tiny", "memory_preset": "gpt2-125m", "steps": 30, "memory_steps": 2,
              "batch_size": 1, "grad_accum": 4, "skip_steps": 3, "sections": [section]}
    text = scaling.docs_section(result)
    assert text.startswith(scaling.SECTION + "\n")
    assert "| 2 | 1,500 | 750 | 75% | 2.0e-07 |" in text
    assert "| FSDP | 2 | 1.70 GiB | 1.20 GiB | 1.20 / 1.20 GiB | 0.60x |" in text
    assert "memory rose 1.20 GiB during training against 2.00 GiB for one process, 0.60x" in text
    assert "are a correctness check (the loss column), not a speed claim" in text
