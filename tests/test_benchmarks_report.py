"""The benchmarks' report writer: targets judged as data, one section replaced, the rest kept."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import _common as common  # benchmarks/ is on sys.path (conftest.py)

SCRIPTS = {"batching": "## Batching", "generate": "## Generation", "memory": "## Memory",
           "low_memory_quality": "## Low-memory quality", "throughput": "## Throughput",
           "cpu_kernels": "## CPU kernels"}


def fake_result() -> dict:
    return {"benchmark": "fake", "date": "2026-01-01 00:00 UTC", "command": "python benchmarks/fake.py",
            "machine": common.machine_info("cpu"), "load_average": {"before": 0.5, "after": 0.7}, "runtime_s": 3.0,
            "targets": common.judge({"speed": common.Target("fast", 2.0)}, {"speed": 2.5})}


def test_targets_are_judged_both_ways_and_missing_values_are_not_measured() -> None:
    targets = {"most": common.Target("small", 1.5, at_most=True), "least": common.Target("big", 2.0),
               "absent": common.Target("later", 1.0)}
    judged = common.judge(targets, {"most": 1.5, "least": 1.9})
    assert judged["most"]["met"] is True and judged["least"]["met"] is False
    assert judged["absent"] == {"goal": "later", "bound": 1.0, "at_most": False, "value": None, "met": None,
                                "shown": "n/a"}


def test_update_docs_replaces_only_its_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    before = "# Benchmarks\n\nIntro.\n\n## Batching\n\nkept\n\n"
    after = "## Generation\n\n```\n## code\n```\nkept too\n"
    docs.write_text(before + "## Throughput\n\nold numbers\n\n" + after, encoding="utf-8")
    section = common.render_section(fake_result(), "## Throughput", "Summary.",
                                    [common.Table(["row", "tokens/s"], [["a", "1,234"]])], ["A note."], "How.")
    common.update_docs(section, "## Throughput", docs)
    text = docs.read_text(encoding="utf-8")
    assert text.startswith(before + "## Throughput\n") and text.endswith("\n\n" + after)
    assert "old numbers" not in text and text.count("## Throughput") == 1
    common.update_docs(section, "## Throughput", docs)  # idempotent
    assert docs.read_text(encoding="utf-8") == text


def test_update_docs_appends_a_missing_section_and_creates_the_page(tmp_path: Path) -> None:
    docs = tmp_path / "new" / "benchmarks.md"
    common.update_docs("## Memory\n\nx\n", "## Memory", docs)
    assert docs.read_text(encoding="utf-8") == common.DOCS_INTRO + "\n## Memory\n\nx\n"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_topic_script_owns_its_section_and_shares_the_output_options(name: str) -> None:
    script = importlib.import_module(name)
    assert script.SECTION == SCRIPTS[name] and script.SECTION in common.DOCS.read_text(encoding="utf-8")
    args = script.parse_args(["--json-out", "out.json", "--docs", "page.md"])
    assert args.json_out == Path("out.json") and args.docs == Path("page.md") and not args.update_docs
    assert callable(script.main) and callable(script.docs_section)
