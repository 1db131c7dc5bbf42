"""Several processes through torchrun: tokens/s per rank, scaling efficiency, and per-rank memory.

Each run is the real trainer, ``torchrun --standalone --nproc-per-node N benchmarks/_rank_probe.py
... train ...`` (the probe records each rank's memory), on the shared WikiText-2 validation text,
with the same global batch whatever N is.

* **Throughput** (``--throughput-preset``, default ``tiny``): 1 process, then N processes, each
  with one torch thread on a CPU (torchrun's default) or one GPU each. Tokens/s are the median of
  the step lines in ``metrics.jsonl`` (every rank's tokens; the first ``--skip-steps`` left out),
  per rank that figure over N, and the scaling efficiency N-rank tokens/s / (N x 1-process tokens/s).
  The per-step losses of the runs are compared too (the same global batch gives the same losses).
  On this 2-core CPU, 1 against 2 processes is a **correctness check, not a speed claim**: two
  processes share two cores and gloo's loopback, nothing like GPUs on NVLink.
* **Memory** (``--memory-preset``, default ``gpt2-125m``, a few steps): each rank's resident
  memory at its peak, and how far it rose above the process's size before the model existed
  (torch and its libraries loaded), for 1 process, N ranks with DDP (every rank a whole copy) and
  N ranks with ``--fsdp`` (weights, gradients and AdamW moments split across ranks). On CUDA also
  the allocator's peak per rank.
* With GPUs present, the same on 1..all GPUs (powers of two) in bf16.

    python benchmarks/scaling.py --update-docs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import GIB, WIKI_VALID, Stopwatch, Table, add_common_options, render_section, entry_point

import torch

SECTION = "## Scaling out: torchrun, DDP and FSDP"
PROBE = Path(__file__).with_name("_rank_probe.py")


def launch(nproc: int, out: Path, train_args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One torchrun launch of the trainer; its step lines and each rank's memory record."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(PROBE), str(out / "ranks"), "train", *train_args, "--out-dir", str(out / "run")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(nproc)]
    return {"steps": [r for r in records if r.get("event") == "step"], "ranks": ranks}


def throughput(result: dict[str, Any], nproc: int, skip: int) -> dict[str, Any]:
    speeds = [r["tokens_per_s"] for r in result["steps"][skip:]]
    tokens_per_s = statistics.median(speeds)
    return {"nproc": nproc, "tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / nproc,
            "losses": [r["loss"] for r in result["steps"]]}


def memory(result: dict[str, Any], nproc: int, how: str) -> dict[str, Any]:
    """The largest rank's figures (rank 0's, which also gathers the whole state to save, and the
    largest of the others' are kept apart as well)."""
    ranks = result["ranks"]
    rise = [r["peak_rss_bytes"] - r["rss_before_bytes"] for r in ranks]
    cuda = [r["cuda_peak_allocated_bytes"] for r in ranks if r["cuda_peak_allocated_bytes"] is not None]
    return {"nproc": nproc, "how": how, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
            "rss_rise_bytes": max(rise), "rank0_rss_rise_bytes": rise[0],
            "other_ranks_rss_rise_bytes": max(rise[1:]) if len(rise) > 1 else None,
            "cuda_peak_allocated_bytes": max(cuda) if cuda else None}


def common_args(args: argparse.Namespace, preset: str, steps: int, device: str, precision: str) -> list[str]:
    return ["--preset", preset, "--data", str(args.data), "--device", device, "--precision", precision,
            "--no-compile", "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
            "--max-steps", str(steps), "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", str(steps),
            "--eval-batches", "1", "--save-interval", str(steps), "--keep-checkpoints", "1"]


def measure(args: argparse.Namespace, device: str, precision: str, counts: list[int], root: Path,
            env: dict[str, str], clock: Stopwatch) -> dict[str, Any]:
    """The throughput runs for each process count, then the memory runs at the largest count."""
    speed = []
    for n in counts:
        clock.say(f"{device}: {args.throughput_preset}, {n} process(es), {args.steps} steps")
        result = launch(n, root / f"{device}-speed-{n}", common_args(args, args.throughput_preset, args.steps, device,
                                                                      precision), env)
        speed.append(throughput(result, n, args.skip_steps))
    base = speed[0]
    for row in speed:
        row["efficiency"] = row["tokens_per_s"] / (row["nproc"] * base["tokens_per_s"])
        row["max_loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"]))
    mem = []
    n = counts[-1]
    if n > 1:
        for how, extra in (("one process", None), ("DDP", []), ("FSDP", ["--fsdp"])):
            nproc = 1 if extra is None else n
            clock.say(f"{device}: memory, {args.memory_preset}, {how} ({nproc} process(es))")
            result = launch(nproc, root / f"{device}-memory-{how}", common_args(
                args, args.memory_preset, args.memory_steps, device, precision) + (extra or []), env)
            mem.append(memory(result, nproc, how))
    return {"device": device, "precision": precision, "throughput": speed, "memory": mem}


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("scaling")
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "POCKETLM_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
        sections.append(measure(args, "cpu", "fp32", [1, args.cpu_processes], root, env, clock))
        gpus = torch.cuda.device_count()
        if gpus >= 1:
            counts = [n for n in (1, 2, 4, 8) if n <= gpus]
            sections.append(measure(args, "cuda", "bf16", counts, root, env, clock))
    return clock.envelope(__file__, argv, "cpu", throughput_preset=args.throughput_preset,
                          memory_preset=args.memory_preset, steps=args.steps, memory_steps=args.memory_steps,
                          batch_size=args.batch_size, grad_accum=args.grad_accum, skip_steps=args.skip_steps,
                          sections=sections)


def docs_section(r: dict[str, Any]) -> str:
    tables = []
    notes = []
    for s in r["sections"]:
        on = "CPU processes, one torch thread each, gloo" if s["device"] == "cpu" else "GPUs, NCCL"
        tables.append(Table(
            ["processes", "tokens/s (all ranks)", "tokens/s per rank", "scaling efficiency",
             "largest per-step loss difference from 1 process"],
            [[str(x["nproc"]), f"{x['tokens_per_s']:,.0f}", f"{x['tokens_per_s_per_rank']:,.0f}",
              f"{x['efficiency']:.0%}", f"{x['max_loss_difference']:.1e}"] for x in s["throughput"]],
            caption=f"Throughput, `{r['throughput_preset']}` in {s['precision']} on {on} (global batch "
                    f"{r['batch_size']} x {r['grad_accum']} sequences, {r['steps']} steps, median of the step "
                    f"lines after the first {r['skip_steps']}):"))
        if s["memory"]:
            one = s["memory"][0]
            rows = []
            for x in s["memory"]:
                ratio = x["rss_rise_bytes"] / one["rss_rise_bytes"]
                others = x.get("other_ranks_rss_rise_bytes")
                rows.append([x["how"], str(x["nproc"]), f"{x['peak_rss_bytes'] / GIB:.2f} GiB",
                             f"{x['rss_rise_bytes'] / GIB:.2f} GiB",
                             f"{x['rank0_rss_rise_bytes'] / GIB:.2f} / {others / GIB:.2f} GiB" if others else "",
                             f"{ratio:.2f}x"]
                            + ([f"{x['cuda_peak_allocated_bytes'] / GIB:.2f} GiB"]
                               if x["cuda_peak_allocated_bytes"] is not None else []))
            header = ["run", "processes", "peak resident memory (largest rank)", "rise during training (largest rank)",
                      "rise: rank 0 / largest other", "rise against one process"]
            header += ["CUDA peak allocated per rank"] if s["memory"][0]["cuda_peak_allocated_bytes"] is not None else []
            tables.append(Table(header, rows, caption=f"Memory per rank, `{r['memory_preset']}` in {s['precision']}, "
                                                      f"{r['memory_steps']} steps ({s['device']}):"))
        fsdp = next((x for x in s["memory"] if x["how"] == "FSDP"), None)
        if fsdp is not None:
            one = s["memory"][0]
            notes.append(f"Memory ({s['device']}): with `--fsdp` on {fsdp['nproc']} ranks the largest rank's memory "
                         f"rose {fsdp['rss_rise_bytes'] / GIB:.2f} GiB during training against "
                         f"{one['rss_rise_bytes'] / GIB:.2f} GiB for one process, "
                         f"{fsdp['rss_rise_bytes'] / one['rss_rise_bytes']:.2f}x; its peak resident memory was "
                         f"{fsdp['peak_rss_bytes'] / one['peak_rss_bytes']:.2f}x one process's (which includes the "
                         "libraries every process loads). Rank 0 peaks while it saves: it gathers the whole weights "
                         "and AdamW state on its CPU to write the one-folder checkpoint; the other ranks never hold "
                         "them whole. DDP saves no memory: every rank holds a whole copy of the weights, gradients "
                         "and moments, and the communication buffers besides.")
        if s["device"] == "cpu":
            notes.append("On this CPU the 1-against-2-process rows are a correctness check (the loss column), "
                         "not a speed claim: both processes share the machine's cores and talk over loopback.")
    notes.append("What `--fsdp` shards: each transformer block and then the whole model are wrapped with FSDP2's "
                 "`fully_shard`, so every rank keeps 1/N of the fp32 weights, their gradients and AdamW's two "
                 "moments; a block's whole weights exist only while it runs (and the embeddings, tied output layer "
                 "and final LayerNorm from the start of the forward pass to the end of backward). Activations are "
                 "not sharded: each rank keeps those of its own micro-batches.")
    summary = ("The trainer under `torchrun`, one process against several, on the shared WikiText-2 validation "
               "text; each rank's memory is measured by `benchmarks/_rank_probe.py` (resident memory before the "
               "model exists and at its peak).")
    return render_section(r, SECTION, summary, tables, notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--throughput-preset", default="tiny")
    p.add_argument("--memory-preset", default="gpt2-125m")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each throughput run (default 30)")
    p.add_argument("--memory-steps", type=int, default=2, help="optimizer steps of each memory run (default 2)")
    p.add_argument("--skip-steps", type=int, default=3, help="first step lines left out of the median (default 3)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--cpu-processes", type=int, default=2)
    p.add_argument("--data", type=Path, default=WIKI_VALID)
    add_common_options(p, SECTION, threads="one per process")
    return p.parse_args(argv)


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
