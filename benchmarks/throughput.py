"""Training throughput: pocketlm against Hugging Face ``GPT2LMHeadModel`` on the seed workload.

Every row trains the same model shape (``--preset``, default gpt2-125m) from the same seed on
the same real batches: WikiText-2 validation articles tokenized with GPT-2's BPE and packed
(``pack`` batching) into full micro-batches of ``--batch-size`` x ``--seq-len`` tokens,
``--grad-accum`` micro-batches per AdamW step. Rows take turns step by step (the order rotating
each round) so outside load falls on all alike; ``--warmup`` rounds first are not timed (the
compiled graphs and oneDNN kernels are built there). Rows (``workloads.py`` builds them):

* ``pocketlm``: the trainer's defaults on this device (precision auto, selective checkpointing,
  fused loss, compiled where ``plan.should_compile`` says a long run would be);
* ``pocketlm_eager_bf16``: the same in bf16, not compiled; ``pocketlm_fp32``: fp32, not compiled;
* ``hf_fp32``, ``hf_bf16``: ``GPT2LMHeadModel`` with pocketlm's dropouts; ``hf_bf16_gpt2_dropouts``
  with GPT-2's stock 0.1 everywhere (attention-probability dropout sends CPU SDPA to its slow
  math kernel); on CUDA also ``pocketlm_mb16`` and ``hf_bf16_mb16``: each step's micro-batches
  as one micro-batch (16 x seq_len on the seed workload, the same tokens per step).

Tokens/s is tokens per optimizer step over the median step time (batches collated beforehand).
MFU is model FLOPs (``perf.flops_per_token``: 6 per matmul weight per token plus attention, none
for checkpointing's recomputation) per second over the matrix-product peak, measured at start, of
the precision pocketlm trains in here (bf16 where the device has it), for every row. pocketlm
masks attention per document in a packed row; Hugging Face gets the same ``input_ids`` and targets
but attends across document boundaries (the same FLOPs). The kernel floor times the step's GEMMs
and attention alone at their real shapes in that precision: no trainer using these kernels beats
it. The data part times tokenizing wiki.valid.raw x ``--data-repeat`` (10: 11 MB, WikiText-2
train's size) into a fresh token cache and reloading it. The whole process runs with
``perf.keep_freed_memory_for_reuse()`` set, as the trainer does (it helps the Hugging Face rows too).

    python benchmarks/throughput.py --update-docs          # gpt2-125m seed workload
    python benchmarks/throughput.py --preset tiny --steps 1 --warmup 1   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import (WIKI_VALID, Stopwatch, Table, Target, add_common_options, best_seconds, judge,
                     render_section, entry_point, step_summary, steps_in_turns, usable_cores)
from workloads import Trainer, hf_trainer, pocketlm_trainer, train_config

from pocketlm import perf
from pocketlm.batching import Batch, MicroBatch, collate, epoch_batches
from pocketlm.config import ModelConfig
from pocketlm.cpu_kernels import BandedAttention
from pocketlm.data import cached_token_stream, make_examples, read_text, split_wikitext_articles, tokenize_documents
from pocketlm.device import resolve_device, resolve_precision
from pocketlm.plan import COMPILE_MIN_PEAK_SECONDS, should_compile, work_seconds_at_peak
from pocketlm.tokenizer import Tokenizer, get_tokenizer

SECTION = "## Throughput"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class RowSpec:
    hf: bool
    precision: str
    compile: bool | None = False
    """None: as ``plan.should_compile`` decides for a long run."""
    dropouts: str = "pocketlm"
    one_micro_batch: bool = False


ROWS = {"pocketlm": RowSpec(False, "auto", None), "pocketlm_eager_bf16": RowSpec(False, "bf16"),
        "pocketlm_fp32": RowSpec(False, "fp32"), "hf_fp32": RowSpec(True, "fp32"), "hf_bf16": RowSpec(True, "bf16"),
        "hf_bf16_gpt2_dropouts": RowSpec(True, "bf16", dropouts="gpt2")}
GPU_ROWS = {"pocketlm_mb16": RowSpec(False, "auto", None, one_micro_batch=True),
            "hf_bf16_mb16": RowSpec(True, "bf16", one_micro_batch=True)}  # CUDA only by default
RATIOS = {"pocketlm_vs_hf_bf16": ("pocketlm", "hf_bf16"), "pocketlm_vs_hf_fp32": ("pocketlm", "hf_fp32"),
          "pocketlm_vs_hf_bf16_gpt2_dropouts": ("pocketlm", "hf_bf16_gpt2_dropouts"),
          "eager_bf16_vs_hf_bf16": ("pocketlm_eager_bf16", "hf_bf16"),
          "pocketlm_vs_eager_bf16": ("pocketlm", "pocketlm_eager_bf16"),
          "pocketlm_fp32_vs_hf_fp32": ("pocketlm_fp32", "hf_fp32"),
          "pocketlm_mb16_vs_hf_bf16_mb16": ("pocketlm_mb16", "hf_bf16_mb16")}
TARGETS = {
    "pocketlm_vs_hf_bf16_gpt2_dropouts": Target("pocketlm at least 2x HF bf16 with GPT-2's stock dropouts (CPU)", 2.0,
                                                fmt="{:.2f}x"),
    "pocketlm_vs_hf_bf16": Target("pocketlm at least 2x HF bf16 with pocketlm's dropouts (CPU)", 2.0, fmt="{:.2f}x"),
    "mfu": Target("pocketlm's MFU at least 50% of the measured peak of its precision", 0.5, fmt="{:.1%}"),
    "tokenize_s": Target("tokenizing 11 MB into a fresh cache within 5 s", 5.0, at_most=True, fmt="{:.2f} s"),
    "reload_s": Target("reloading the token cache within 0.5 s", 0.5, at_most=True, fmt="{:.4f} s"),
}


def build_row(spec: RowSpec, args: argparse.Namespace, device: torch.device) -> Trainer:
    accum = {"batch_size": args.batch_size * args.grad_accum, "grad_accum": 1} if spec.one_micro_batch else \
        {"batch_size": args.batch_size, "grad_accum": args.grad_accum}
    cfg = train_config(args.preset, seq_len=args.seq_len, device=device.type, precision=spec.precision,
                       batching="pack", **accum)
    if spec.hf:
        return hf_trainer(cfg, dropouts=spec.dropouts)
    compiled = should_compile(None, device.type, math.inf) if spec.compile is None else spec.compile
    return pocketlm_trainer(cfg, compile=compiled)


def real_batches(tokenizer: Tokenizer, data: Path, batch_size: int, seq_len: int, grad_accum: int, rounds: int,
                 seed: int) -> tuple[list[list[MicroBatch]], list[list[MicroBatch]], int]:
    """Each round's micro-batches: the first full ``pack`` micro-batches of epoch 0 (cycled if too
    few), and the same rows collated as one micro-batch; and how many distinct ones there were."""
    examples = make_examples(tokenize_documents(split_wikitext_articles(read_text(data)), tokenizer), seq_len)
    full = [b for b in epoch_batches("pack", examples.lengths, batch_size, seq_len, seed, 0)
            if len(b.rows) == batch_size and b.seq_len == seq_len][:rounds * grad_accum]
    if not full:
        raise SystemExit(f"{data} is too short for one {batch_size} x {seq_len} micro-batch")
    steps = [[full[(r * grad_accum + i) % len(full)] for i in range(grad_accum)] for r in range(rounds)]
    split = [[collate(examples, b, tokenizer.eot_id) for b in step] for step in steps]
    whole = [[collate(examples, Batch(sum((b.rows for b in step), ()), seq_len), tokenizer.eot_id)] for step in steps]
    return split, whole, len(full)


def kernel_floor(model_cfg: ModelConfig, batch_size: int, seq_len: int, grad_accum: int, device: torch.device,
                 dtype: torch.dtype, repeats: int = 3) -> dict[str, Any]:
    """Seconds per optimizer step in the step's matrix products and attention alone, at their
    real shapes in the compute dtype: every Linear's forward, input-gradient and weight-gradient GEMM (the
    output layer included) and attention forward + backward (SDPA, or on a CPU pocketlm's compiled
    banded attention where that is faster)."""
    n, c, h = batch_size * seq_len, model_cfg.n_embd, model_cfg.n_head
    like = dict(device=device, dtype=dtype)

    def gemms(d_in: int, d_out: int) -> Callable[[], Any]:
        x, w, dy = torch.randn(n, d_in, **like), torch.randn(d_out, d_in, **like), torch.randn(n, d_out, **like)
        return lambda: (x @ w.t(), dy @ w, dy.t() @ x)  # forward, input gradient, weight gradient

    q, k, v = (torch.randn(batch_size, h, seq_len, c // h, **like, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(batch_size, h, seq_len, c // h, **like)
    candidates = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True).backward(grad_out)}
    if device.type == "cpu":
        banded = torch.compile(BandedAttention(0.0).train())
        candidates["pocketlm_cpu_attention"] = lambda: banded(q, k, v, None, True).backward(grad_out)
    candidate_s = {name: best_seconds(fn, repeats=repeats, device=device) for name, fn in candidates.items()}
    attention = min(candidate_s, key=candidate_s.__getitem__)
    per_micro = {"block_gemms": model_cfg.n_layer * best_seconds(
                     *(gemms(i, o) for i, o in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c))),
                     repeats=repeats, device=device),
                 "output_layer_gemms": best_seconds(gemms(c, model_cfg.vocab_size), repeats=repeats, device=device),
                 "attention": candidate_s[attention] * model_cfg.n_layer}
    seconds = {name: round(t * grad_accum, 3) for name, t in per_micro.items()}
    return {"seconds_per_step": seconds, "total_s": round(sum(seconds.values()), 3), "attention_kernel": attention,
            "attention_candidates_s_per_layer": {name: round(t, 4) for name, t in candidate_s.items()}}


def time_data(tokenizer: Tokenizer, data: Path, repeat: int) -> dict[str, Any]:
    """Tokenize ``repeat`` copies of the file into a fresh token cache, then reload the cache."""
    text = read_text(data) * repeat
    t0 = time.perf_counter()
    docs = split_wikitext_articles(text)
    split_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="pocketlm-throughput-") as tmp:
        t0 = time.perf_counter()
        stream = cached_token_stream(docs, tokenizer, Path(tmp))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = cached_token_stream(docs, tokenizer, Path(tmp))
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        checksum = int(again.tokens[::2048].astype("int64").sum())  # touch every memory-mapped page
        touch = time.perf_counter() - t0
        same = len(again.tokens) == len(stream.tokens) and checksum == int(stream.tokens[::2048].astype("int64").sum())
    return {"source": str(data), "repeat": repeat, "bytes": len(text.encode("utf-8")), "documents": len(docs),
            "tokens": int(len(stream.tokens)), "split_s": round(split_s, 3), "tokenize_and_cache_s": round(cold, 3),
            "cache_reload_s": round(warm, 4), "reload_touch_s": round(touch, 4), "reload_matches": same,
            # tokenizers' Rust thread pool (rayon) takes every logical core unless told otherwise
            "tokenizer_threads": int(os.environ.get("RAYON_NUM_THREADS") or os.environ.get("RAYON_RS_NUM_CPUS")
                                     or os.cpu_count() or 1),
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}


@contextlib.contextmanager
def fresh_compile_cache(enabled: bool) -> Iterator[None]:
    """Point torch.compile's on-disk cache at an empty directory, so compiling costs what a first run pays."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="pocketlm-inductor-") as tmp:
        if enabled:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def compile_cost(rows: dict[str, dict[str, Any]], tokens_per_step: int, fpt: float, peak: float) -> dict[str, Any]:
    """What compiling cost in the warm-up steps against the eager row of the same precision, what it
    saved per step, and when it pays off."""
    comp = rows.get("pocketlm")
    eager_name = next((name for name in ("pocketlm_eager_bf16", "pocketlm_fp32") if name in rows and comp
                       and comp["compiled"] and rows[name]["precision"] == comp["precision"]), None)
    if eager_name is None:
        return {}
    eager = rows[eager_name]
    extra = comp["first_steps_extra_s"] - eager["first_steps_extra_s"]
    saved = eager["median_step_s"] - comp["median_step_s"]
    step_at_peak = work_seconds_at_peak(1, tokens_per_step, fpt, peak)
    return {"eager_row": eager_name, "compile_cost_s": round(extra, 2), "saved_per_step_s": round(saved, 4),
            "break_even_steps": round(extra / saved, 1) if saved > 0 else None,
            "auto_compile_min_peak_s": COMPILE_MIN_PEAK_SECONDS,
            "auto_compile_min_steps": math.ceil(COMPILE_MIN_PEAK_SECONDS / step_at_peak)}


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("throughput")
    torch.set_num_threads(args.threads or usable_cores())
    kept = perf.keep_freed_memory_for_reuse()
    device = resolve_device(args.device)
    specs = {**ROWS, **(GPU_ROWS if device.type == "cuda" else {})}
    if args.rows:
        unknown = set(args.rows.split(",")) - set(ROWS) - set(GPU_ROWS)
        if unknown:
            raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
        specs = {name: {**ROWS, **GPU_ROWS}[name] for name in args.rows.split(",")}
    tokenizer = get_tokenizer()
    data = None
    if not args.skip_data_timing:
        clock.say(f"data: tokenizing {args.data.name} x {args.data_repeat} into a fresh cache, then reloading it")
        data = time_data(tokenizer, args.data, args.data_repeat)
    # MFU is judged against the peak of the precision pocketlm trains in here (bf16 where the device
    # has it); fp32's is shown beside it. Not bf16's where it is emulated: minutes, and meaningless.
    compute = resolve_precision("auto", device)
    measured = sorted({compute, "fp32"})
    clock.say(f"measuring the matrix-product peaks of {' and '.join(measured)}")
    peaks: dict[str, Any] = {f"{p}_flops": perf.measure_matmul_peak(device, DTYPES[p]) for p in measured}
    peaks.update(compute_precision=compute, datasheet_bf16_flops=perf.known_peak_flops(device))
    peak = peaks[f"{compute}_flops"]
    model_cfg = train_config(args.preset, batch_size=args.batch_size, seq_len=args.seq_len).model_config()
    clock.say("timing the step's matrix products and attention alone (the kernel floor)")
    floor = kernel_floor(model_cfg, args.batch_size, args.seq_len, args.grad_accum, device, DTYPES[compute])
    rounds, seed = args.warmup + args.steps, 1337
    split, whole, distinct = real_batches(tokenizer, args.data, args.batch_size, args.seq_len, args.grad_accum, rounds,
                                          seed)
    split, whole = ([[mb.to(device) for mb in step] for step in steps] for steps in (split, whole))
    trainers = {}
    for name, spec in specs.items():
        clock.say(f"setting up {name}")
        trainers[name] = build_row(spec, args, device)

    def stepper(name: str) -> Callable[[int], float]:
        steps = whole if specs[name].one_micro_batch else split
        return lambda r: trainers[name].step(steps[r])

    clock.say(f"{len(trainers)} rows x ({args.warmup} warm-up + {args.steps} timed) steps, taking turns")
    with fresh_compile_cache(not args.warm_compile_cache):
        log = steps_in_turns({name: stepper(name) for name in trainers}, rounds=rounds, warmup=args.warmup,
                             seed=10_000, device=device, say=clock.say)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    fpt = perf.flops_per_token(model_cfg, args.seq_len)
    rows = {}
    for name, trainer in trainers.items():
        row = {**trainer.info, **step_summary(log[name], tokens_per_step), "tokens_per_step": tokens_per_step,
               "micro_batch": args.batch_size * (args.grad_accum if specs[name].one_micro_batch else 1),
               "grad_accum": 1 if specs[name].one_micro_batch else args.grad_accum}
        row["mfu"] = round(row["tokens_per_s"] * fpt / peak, 4)
        if peaks["datasheet_bf16_flops"]:
            row["mfu_vs_datasheet"] = round(row["tokens_per_s"] * fpt / peaks["datasheet_bf16_flops"], 4)
        rows[name] = row
    ratios = {key: round(rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"], 3) if a in rows and b in rows else None
              for key, (a, b) in RATIOS.items()}
    floor["mfu_ceiling"] = round(tokens_per_step * fpt / floor["total_s"] / peak, 4)
    floor["tokens_per_s_ceiling"] = round(tokens_per_step / floor["total_s"], 1)
    full_data = data is not None and data["bytes"] >= 10_000_000  # the tokenize target is about 11 MB
    on_cpu = device.type == "cpu"  # the 2x targets are about the CPU
    values = {"pocketlm_vs_hf_bf16_gpt2_dropouts": ratios["pocketlm_vs_hf_bf16_gpt2_dropouts"] if on_cpu else None,
              "pocketlm_vs_hf_bf16": ratios["pocketlm_vs_hf_bf16"] if on_cpu else None,
              "mfu": rows["pocketlm"]["mfu"] if "pocketlm" in rows else None,
              "tokenize_s": data["tokenize_and_cache_s"] if full_data else None,
              "reload_s": data["cache_reload_s"] if full_data else None}
    workload = {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "grad_accum": args.grad_accum, "tokens_per_step": tokens_per_step, "batching": "pack",
                "data": str(args.data), "distinct_micro_batches": distinct,
                "warmup_steps": args.warmup, "timed_steps": args.steps, "seed": seed, "flops_per_token": fpt,
                "compile_cache": "warm (reused)" if args.warm_compile_cache else "cold (fresh directory)",
                "keep_freed_memory_for_reuse": kept}
    return clock.envelope(__file__, argv, device, workload=workload, peaks=peaks, kernel_floor=floor, rows=rows,
                          ratios=ratios, compile=compile_cost(rows, tokens_per_step, fpt, peak),
                          data=data, targets=judge(TARGETS, values))


def docs_section(r: dict[str, Any]) -> str:
    w, p, rows = r["workload"], r["peaks"], r["rows"]

    def vs(row: dict[str, Any], other: str) -> str:
        return f"{row['tokens_per_s'] / rows[other]['tokens_per_s']:.2f}x" if other in rows else "n/a"

    table = Table(["row", "implementation", "precision", "compiled", "micro-batch x accum", "tokens/s", "MFU",
                   "vs HF bf16", "vs HF bf16, GPT-2 dropouts"],
                  [[f"`{name}`", "pocketlm" if row["implementation"] == "pocketlm" else "HF `GPT2LMHeadModel`"
                    + (", GPT-2's dropouts" if row.get("dropouts") == "gpt2" else ""),
                    row["precision"], "yes" if row["compiled"] else "no", f"{row['micro_batch']} x {row['grad_accum']}",
                    f"{row['tokens_per_s']:,.0f}", f"{row['mfu']:.1%}",
                    vs(row, "hf_bf16_mb16" if name.endswith("_mb16") else "hf_bf16"),
                    "n/a" if name.endswith("_mb16") else vs(row, "hf_bf16_gpt2_dropouts")]
                   for name, row in rows.items()])
    measured = ", ".join(f"{k[:-6]} {v / 1e12:.2f} TFLOP/s" for k, v in p.items() if k.endswith("_flops") and v
                         and k != "datasheet_bf16_flops")
    notes = [f"Matrix-product peaks measured at start (2048 x 2048 `torch.mm`): {measured}"
             + (f"; datasheet bf16 {p['datasheet_bf16_flops'] / 1e12:.0f} TFLOP/s" if p["datasheet_bf16_flops"] else "")
             + f". MFU is against the {p['compute_precision']} peak, the precision pocketlm trains in here. "
             f"Model FLOPs: {w['flops_per_token'] / 1e9:.3f} GFLOP per token."]
    f = r["kernel_floor"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in f["seconds_per_step"].items())
    notes.append(f"Kernel floor: the step's matrix products and attention (`{f['attention_kernel']}`) alone, in "
                 f"{p['compute_precision']} at their real shapes ({parts}), take {f['total_s']:.2f} s per step: "
                 f"at most {f['tokens_per_s_ceiling']:,.0f} tokens/s or {f['mfu_ceiling']:.0%} MFU for any trainer "
                 "using these kernels.")
    d = r["data"]
    if d:
        notes.append(f"Data: tokenizing {d['bytes'] / 1e6:.1f} MB (wiki.valid.raw x {d['repeat']}, {d['tokens']:,} "
                     f"tokens) into a fresh token cache took {d['tokenize_and_cache_s']:.2f} s "
                     f"({d['tokenizer_threads']} tokenizer threads); reloading it took "
                     f"{d['cache_reload_s'] * 1000:.1f} ms (memory-mapped; touching every page "
                     f"{d['reload_touch_s'] * 1000:.1f} ms more).")
    c = r["compile"]
    if c:
        notes.append(f"Compile cost: {c['compile_cost_s']:.1f} s in the first {w['warmup_steps']} steps against "
                     f"`{c['eager_row']}` (compile cache {w['compile_cache']}), saving {c['saved_per_step_s']:.2f} s per step: "
                     + (f"it pays for itself after {c['break_even_steps']:.0f} steps" if c["break_even_steps"]
                        else "it saved no time per step here")
                     + f"; auto-compile starts at {c['auto_compile_min_steps']} steps of this workload "
                     f"({c['auto_compile_min_peak_s']:.0f} s of model FLOPs at the measured peak).")
    summary = (f"Training throughput on `{w['preset']}`: real WikiText-2 tokens packed into micro-batches of "
               f"{w['batch_size']} x {w['seq_len']}, {w['grad_accum']} per AdamW step ({w['tokens_per_step']:,} "
               f"tokens); {w['timed_steps']} timed step(s) after {w['warmup_steps']} warm-up step(s), the rows "
               "taking turns step by step.")
    method = ("tokens/s is tokens per step over the median step time. Both implementations use fused AdamW over "
              "the same parameter groups and the same clipping; more in `benchmarks/throughput.py`'s docstring.")
    return render_section(r, SECTION, summary, [table], notes, method)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2-125m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--rows", default=None, help=f"comma list from {', '.join([*ROWS, *GPU_ROWS])}")
    p.add_argument("--data", type=Path, default=WIKI_VALID, help="wiki.valid.raw")
    p.add_argument("--data-repeat", type=int, default=10, help="copies of --data to tokenize (10: 11 MB)")
    p.add_argument("--skip-data-timing", action="store_true")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="let torch.compile reuse its on-disk cache (default: a fresh one)")
    add_common_options(p, SECTION, threads="every usable core")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.seq_len, args.grad_accum) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size, --seq-len and --grad-accum must be positive, --warmup not negative")
    return args


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
