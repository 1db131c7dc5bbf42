"""The whole trainer of two source trees side by side: did a change move speed, memory or results?

Each run is a fresh process that imports `pocketlm` from one tree's `src/` and calls its
public `train(build_train_config(None, **settings))`, the API every revision has, on the same
settings: by default `gpt2-125m` on the shared WikiText-2 validation text, packed micro-batches
of 4 x 512 tokens, one per step, `--steps` optimizer steps, evaluation only at the start and the
end (one micro-batch), eager unless `--compile`, in the precision the trainer picks on this
device. Runs of the trees alternate (A B, B A, A B...), so outside load falls on both alike. Per
run: the median tokens/s of the step lines in `metrics.jsonl` (evaluation and saving excluded, as
the trainer counts them; the first step is left out: it builds oneDNN's kernels and compiles), the
process's peak resident memory, and the SHA-256 of the final weights with the per-step losses: an
unchanged trainer gives the same bytes and losses. A revision ending in `-dirty` is that commit
with uncommitted changes on top (here: the change being measured).

    git worktree add /tmp/before HEAD
    python benchmarks/revisions.py /tmp/before . --update-docs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import GIB, WIKI_VALID, Stopwatch, Table, add_common_options, render_section, script_main

SECTION = "## Trainer before and after a change"


def section_heading(compiled: bool) -> str:
    return f"{SECTION}, {'compiled' if compiled else 'eager'}"

# Runs inside the child process: ``sys.argv[1]`` is the settings as JSON, the tree's src/ is on PYTHONPATH.
CHILD = """
import json, resource, sys
import pocketlm
from pocketlm.config import build_train_config
from pocketlm.train import train
result = train(build_train_config(None, **json.loads(sys.argv[1])), show_progress=False)
print(json.dumps({"package": pocketlm.__file__, "checkpoint": str(result.final_checkpoint),
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def tree_revision(tree: Path) -> str:
    """The tree's git commit, ``-dirty`` when it has uncommitted changes; ``unknown`` outside git."""
    proc = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty", "--abbrev=10"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def run_tree(tree: Path, settings: dict[str, Any], workdir: Path, threads: int | None) -> dict[str, Any]:
    out_dir = workdir / "run"
    env = dict(os.environ, PYTHONPATH=str(tree.resolve() / "src"), POCKETLM_CACHE=str(workdir.parent / "cache"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**settings, "out_dir": str(out_dir)})],
                          env=env, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: the run failed:\n{proc.stderr[-3000:]}")
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    weights = Path(done["checkpoint"]) / "model.safetensors"
    return {"package": done["package"], "tokens_per_s": [r["tokens_per_s"] for r in steps[1:]],
            "losses": [r["loss"] for r in steps], "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "peak_rss_gib": round(done["peak_rss_kib"] * 1024 / GIB, 3),
            "compiled": next(r for r in records if r["event"] == "start")["compiled"]}


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    watch = Stopwatch("revisions")
    settings = {"preset": args.preset, "data": str(args.data), "batching": "pack", "batch_size": args.batch_size,
                "grad_accum": args.grad_accum, "max_steps": args.steps, "eval_interval": 10 ** 6,
                "eval_batches": 1, "save_interval": 10 ** 6, "log_interval": 1, "compile": args.compile,
                "seed": 1337}
    trees = {"before": args.before, "after": args.after}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    order = [name for r in range(args.rounds) for name in (["before", "after"] if r % 2 == 0 else ["after", "before"])]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order):
            workdir = Path(tmp) / f"{i}-{name}"
            workdir.mkdir()
            watch.say(f"run {i + 1}/{len(order)}: {name} ({trees[name]})")
            runs[name].append(run_tree(trees[name], settings, workdir, args.threads))
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"tree": str(trees[name]), "revision": tree_revision(trees[name]), "package": rs[0]["package"], "compiled": rs[0]["compiled"],
                         "tokens_per_s_median": round(statistics.median(t for r in rs for t in r["tokens_per_s"]), 1),
                         "tokens_per_s_per_run": [round(statistics.median(r["tokens_per_s"]), 1) for r in rs],
                         "tokens_per_s_steps": [[round(t, 1) for t in r["tokens_per_s"]] for r in rs],
                         "peak_rss_gib": max(r["peak_rss_gib"] for r in rs), "losses": rs[0]["losses"],
                         "weights_sha256": sorted({r["weights_sha256"] for r in rs})}
    before, after = summary["before"], summary["after"]
    return watch.envelope(__file__, argv, settings=settings, rounds=args.rounds, trees=summary, comparison={
        "tokens_per_s_after_over_before": round(after["tokens_per_s_median"] / before["tokens_per_s_median"], 3),
        "same_losses": before["losses"] == after["losses"],
        "same_weights": before["weights_sha256"] == after["weights_sha256"] and len(after["weights_sha256"]) == 1,
        "peak_rss_after_over_before": round(after["peak_rss_gib"] / before["peak_rss_gib"], 3)})


def docs_section(r: dict[str, Any], heading: str) -> str:
    s, c = r["settings"], r["comparison"]
    rows = [[name, f"`{t['tree']}` ({t['revision']})", f"{t['tokens_per_s_median']:,.1f}", ", ".join(f"{x:,.1f}" for x in t["tokens_per_s_per_run"]),
             f"{t['peak_rss_gib']:.2f} GiB", t["weights_sha256"][0][:12]]
            for name, t in r["trees"].items()]
    summary = (f"`train()` of two source trees on the same settings ({s['preset']}, {s['grad_accum']} packed "
               f"micro-batch(es) of {s['batch_size']} sequences per step of WikiText-2 validation text, "
               f"{s['max_steps']} steps, {'compiled' if s['compile'] else 'eager'}), {r['rounds']} runs each, "
               "alternating: after/before tokens/s "
               f"{c['tokens_per_s_after_over_before']:.3f}x, peak RSS {c['peak_rss_after_over_before']}x; "
               f"same per-step losses: {c['same_losses']}; same final weights: {c['same_weights']}.")
    table = Table(["tree", "source", "tokens/s (median step)", "per run", "peak RSS", "weights SHA-256"], rows)
    return render_section(r, heading, summary, [table], method=__doc__.split("\n\n")[1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="the source tree before the change (e.g. a git worktree of HEAD)")
    p.add_argument("after", type=Path, help="the source tree after it")
    p.add_argument("--preset", default="gpt2-125m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="runs of each tree")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--data", type=Path, default=WIKI_VALID)
    add_common_options(p, SECTION)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    heading = section_heading(parse_args(argv).compile)
    return script_main(argv, parse_args, run, heading, lambda r: docs_section(r, heading))


if __name__ == "__main__":
    sys.exit(main())
