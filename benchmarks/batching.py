"""The batch schedules ``bucket``, ``random`` and ``pack``: padding and CPU training throughput.

For each model preset (``tiny`` with a 128-token context, ``gpt2-125m`` with 512):

* the padding fraction of a whole epoch of each schedule (exact: pure arithmetic on the example
  lengths, micro-batches of ``--batch-size`` sequences, 4 as in the default recipe);
* training throughput: a model per schedule, built as the trainer builds it
  (``workloads.pocketlm_trainer``, not compiled: bucket's many shapes would recompile), from the
  same seed, runs ``--warmup`` untimed optimizer steps on the first micro-batches of epoch 0 (so
  bucket's first micro-batch, its longest, is never timed), then ``--steps`` timed ones. Each step
  is ``collate`` + ``train_step`` over ``--grad-accum`` micro-batches. The schedules take turns
  step by step (``--no-interleave``: one after another, one model in memory at a time), so
  outside load falls on all alike. ``real_tokens_per_s`` counts only non-padding tokens,
  ``tokens_per_s`` every computed position; the median-step rate is robust to one slow step.
  ``pack`` rows holding several documents get a block-diagonal attention mask.

The data is the whole of ``wiki.valid.raw`` (no hold-out), cut into examples as ``load_dataset``
cuts a split.

    python benchmarks/batching.py --threads 1 --update-docs   # both presets, ~3 minutes on 2 cores
    python benchmarks/batching.py --presets tiny               # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import (WIKI_VALID, Stopwatch, Table, Target, add_common_options, judge, render_section, entry_point,
                     steps_in_turns)
from workloads import pocketlm_trainer, train_config

from pocketlm.batching import Batch, PaddingStats, collate, epoch_batches
from pocketlm.config import PRESETS
from pocketlm.device import resolve_precision
from pocketlm.data import ExampleSet, make_examples, read_text, split_documents, tokenize_documents
from pocketlm.tokenizer import gpt2_tokenizer

SECTION = "## Batching"
SCHEDULES = ("bucket", "random", "pack")
DEFAULT_STEPS = {"tiny": 20, "gpt2-125m": 3}  # gpt2-125m takes seconds per step on a CPU, tiny hundredths
DEFAULT_WARMUP = {"tiny": 3, "gpt2-125m": 1}
TARGETS = {"bucket_padding": Target("`bucket` pads under 5% of its tokens", 0.05, at_most=True, fmt="{:.2%}"),
           "bucket_vs_random": Target("`bucket` pads at most half as much as `random`", 0.5, at_most=True,
                                      fmt="{:.2f}x")}


def padding_row(examples: ExampleSet, kind: str, batch_size: int, block_size: int, seed: int) -> dict[str, Any]:
    batches = epoch_batches(kind, examples.lengths, batch_size, block_size, seed, 0)
    stats = PaddingStats.of(batches)
    return {"block_size": block_size, "examples": len(examples), "padding_fraction": stats.padding_fraction,
            "real_tokens": stats.real_tokens, "padded_tokens": stats.padded_tokens, "micro_batches": len(batches),
            "distinct_shapes": len({(len(b.rows), b.seq_len) for b in batches}),
            "rows_per_batch_max": max(len(b.rows) for b in batches), "seq_len_first_batch": batches[0].seq_len,
            "full_context_examples": float(np.mean(examples.lengths == block_size))}


class ScheduleRun:
    """One schedule's training run from the start of epoch 0, counting the tokens of its timed steps."""

    def __init__(self, examples: ExampleSet, preset: str, kind: str, args: argparse.Namespace, pad_id: int,
                 warmup: int) -> None:
        block_size = PRESETS[preset].block_size
        cfg = train_config(preset, batch_size=args.batch_size, seq_len=block_size, grad_accum=args.grad_accum,
                           device="cpu", precision=args.precision, compile=False, seed=args.seed, batching=kind)
        self.trainer = pocketlm_trainer(cfg)
        self.examples, self.pad_id, self.grad_accum, self.warmup = examples, pad_id, args.grad_accum, warmup
        self.batches = self._stream(kind, args.batch_size, block_size, args.seed)
        self.real: list[int] = []
        self.computed: list[int] = []

    def _stream(self, kind: str, batch_size: int, block_size: int, seed: int) -> Iterator[Batch]:
        epoch = 0
        while True:  # into later epochs if the steps outlast one
            yield from epoch_batches(kind, self.examples.lengths, batch_size, block_size, seed, epoch)
            epoch += 1

    def step(self, round_index: int) -> float:
        """One optimizer step as the trainer takes it: collate the micro-batches, then train_step."""
        group = [next(self.batches) for _ in range(self.grad_accum)]
        loss = self.trainer.step([collate(self.examples, b, self.pad_id) for b in group])
        if round_index >= self.warmup:
            self.real.append(sum(b.real_tokens for b in group))
            self.computed.append(sum(len(b.rows) * b.seq_len for b in group))
        return loss

    def summary(self, log: dict[str, list]) -> dict[str, Any]:
        seconds = log["step_s"]
        return {"steps_timed": len(seconds), "warmup_steps": self.warmup, "timed_real_tokens": sum(self.real),
                "timed_tokens": sum(self.computed), "timed_padding_fraction": 1 - sum(self.real) / sum(self.computed),
                "seconds": sum(seconds), "real_tokens_per_s": sum(self.real) / sum(seconds),
                "tokens_per_s": sum(self.computed) / sum(seconds),
                "median_step_real_tokens_per_s": statistics.median(r / s for r, s in zip(self.real, seconds)),
                "cpu_share": sum(log["cpu_s"]) / (sum(seconds) * torch.get_num_threads()),
                "step_s": seconds, "step_tokens": self.computed, "losses": [round(x, 5) for x in log["outputs"]]}


def time_schedules(examples: ExampleSet, preset: str, args: argparse.Namespace, pad_id: int, clock: Stopwatch,
                   warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    groups = [args.schedules] if args.interleave else [[kind] for kind in args.schedules]
    out = {}
    for kinds in groups:  # one model per schedule in memory, only the group's
        runs = {kind: ScheduleRun(examples, preset, kind, args, pad_id, warmup) for kind in kinds}
        log = steps_in_turns({kind: run.step for kind, run in runs.items()}, rounds=warmup + steps, warmup=warmup,
                             seed=args.seed, say=lambda msg: clock.say(f"[{preset}] {msg}"))
        out.update({kind: run.summary(log[kind]) for kind, run in runs.items()})
    return out


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    if not args.data.is_file():
        raise SystemExit(f"data file not found: {args.data} (pass --data PATH)")
    clock = Stopwatch("batching")
    tokenizer = gpt2_tokenizer()
    docs = split_documents(read_text(args.data))
    stream = tokenize_documents(docs, tokenizer)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    values: dict[str, float] = {}
    for preset in args.presets:
        examples = make_examples(stream, PRESETS[preset].block_size)
        rows = {kind: padding_row(examples, kind, args.batch_size, PRESETS[preset].block_size, args.seed)
                for kind in args.schedules}
        if not args.no_throughput:
            warmup = DEFAULT_WARMUP.get(preset, 1) if args.warmup is None else args.warmup
            steps = DEFAULT_STEPS.get(preset, 3) if args.steps is None else args.steps
            clock.say(f"[{preset}] {warmup} warm-up + {steps} timed steps per schedule")
            for kind, row in time_schedules(examples, preset, args, tokenizer.eot_id, clock, warmup, steps).items():
                rows[kind].update(row)
        if {"bucket", "random"} <= set(rows):
            bucket, rand = rows["bucket"]["padding_fraction"], rows["random"]["padding_fraction"]
            values[f"{preset}: bucket_padding"] = bucket
            values[f"{preset}: bucket_vs_random"] = bucket / rand if rand else None
        results[preset] = rows
    targets = {f"{preset}: {key}": Target(f"{preset}: {t.goal}", t.bound, t.at_most, t.fmt)
               for preset in args.presets for key, t in TARGETS.items()}
    data = {"path": str(args.data), "documents": len(docs), "stream_tokens": int(len(stream.tokens)),
            "train_tokens": int(np.diff(stream.doc_starts).sum())}  # every stream token but the first EOT
    settings = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "seed": args.seed,
                "precision": resolve_precision(args.precision, torch.device("cpu")),
                "throughput": not args.no_throughput, "interleaved": args.interleave}
    return clock.envelope(__file__, argv, "cpu", settings=settings, data=data, results=results,
                          targets=judge(targets, values))


def docs_section(r: dict[str, Any]) -> str:
    timed = r["settings"]["throughput"]
    header = ["preset", "schedule", "padding (epoch)", "real tokens", "padded tokens", "micro-batches"]
    header += ["real tok/s", "total tok/s", "real tok/s, median step", "timed steps", "CPU share"] if timed else []
    rows = []
    for preset, schedules in r["results"].items():
        for kind, row in schedules.items():
            rows.append([preset, kind, f"{row['padding_fraction']:.2%}", f"{row['real_tokens']:,}",
                         f"{row['padded_tokens']:,}", row["micro_batches"]]
                        + ([f"{row['real_tokens_per_s']:,.0f}", f"{row['tokens_per_s']:,.0f}",
                            f"{row['median_step_real_tokens_per_s']:,.0f}",
                            f"{row['steps_timed']} (+{row['warmup_steps']} warm-up)", f"{row['cpu_share']:.0%}"]
                           if timed else []))
    d, s = r["data"], r["settings"]
    summary = (f"Padding and CPU training throughput of the batch schedules on `{Path(d['path']).name}` (the whole "
               f"file as training text: {d['documents']} documents, {d['train_tokens']:,} predicted tokens), "
               f"micro-batches of {s['batch_size']} sequences at each preset's context length, {s['precision']}.")
    method = ("padding is exact, over epoch 0 (seed {}). Throughput: a fresh model per schedule (same seed), "
              "warm-up steps first, then `collate` + `train_step` per timed step, {}; real tok/s counts only "
              "non-padding tokens. Few steps are timed, so small tokens/s differences are noise; the padding "
              "columns do not depend on the machine. See `benchmarks/batching.py`.").format(
        s["seed"], "the schedules taking turns" if s["interleaved"] else "one schedule after another")
    return render_section(r, SECTION, summary, [Table(header, rows)], method=method)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=WIKI_VALID, help="text file to batch (default: wiki.valid.raw)")
    p.add_argument("--presets", default="tiny,gpt2-125m", help="comma-separated model presets")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated schedules")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed optimizer steps per schedule (default: {DEFAULT_STEPS})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed optimizer steps first (default: {DEFAULT_WARMUP})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size in sequences")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 where the CPU has native bf16, else fp32")
    p.add_argument("--seed", type=int, default=1337, help="schedule order, init and dropout seed")
    p.add_argument("--no-throughput", action="store_true", help="padding fractions only (no training)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time the schedules one after another instead of taking turns step by step")
    add_common_options(p, SECTION)
    args = p.parse_args(argv)
    args.presets = [s for s in args.presets.split(",") if s]
    args.schedules = [s for s in args.schedules.split(",") if s]
    if set(args.presets) - set(PRESETS) or set(args.schedules) - set(SCHEDULES):
        p.error(f"presets come from {', '.join(PRESETS)}; schedules from {', '.join(SCHEDULES)}")
    if any(v is not None and v <= 0 for v in (args.steps, args.threads, args.grad_accum, args.batch_size)) \
            or (args.warmup or 0) < 0:
        p.error("--steps, --threads, --grad-accum and --batch-size must be positive, --warmup not negative")
    return args


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
