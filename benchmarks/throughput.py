"""Training throughput: pocketlm against Hugging Face ``GPT2LMHeadModel`` on the seed workload.

Every row trains the same model shape (``--preset``, default gpt2-125m) from the same seed on
the same real batches: WikiText-2 validation articles tokenized with GPT-2's BPE and packed
(``--batching pack``) into full micro-batches of ``--batch-size`` x ``--seq-len`` tokens,
``--grad-accum`` micro-batches per AdamW step. Rows take turns step by step (the order rotating
each round) so outside load falls on all alike; ``--warmup`` rounds first are not timed (the
compiled graphs and oneDNN kernels are built there). Rows:

* ``pocketlm``: the trainer's defaults on this device (precision auto, selective checkpointing,
  fused loss, compiled where ``train.should_compile`` says a long run would be);
* ``pocketlm_eager_bf16``: the same in bf16, not compiled; ``pocketlm_fp32``: fp32, not compiled;
* ``hf_fp32``, ``hf_bf16``: ``GPT2LMHeadModel`` with pocketlm's dropouts, fused AdamW over the
  same parameter groups, clipping, the mean loss of each micro-batch / grad_accum, bf16 via
  ``pocketlm.device.autocast``; on CUDA also ``pocketlm_mb16`` and ``hf_bf16_mb16``: one
  micro-batch of 16 x seq_len per step (the same tokens per step as 4 x 4).

The bf16 and fp32 matrix-product peaks are measured at start; MFU is model FLOPs
(``perf.flops_per_token``) per second over the *bf16* peak for every row. The data part times
tokenizing wiki.valid.raw repeated ``--data-repeat`` times (10: 11 MB, WikiText-2 train's size)
into a fresh token cache and reloading it. One JSON object goes to stdout, progress to stderr;
``--update-docs`` rewrites the ``## Throughput`` section of docs/benchmarks.md.

    python benchmarks/throughput.py --update-docs          # gpt2-125m seed workload
    python benchmarks/throughput.py --preset tiny --steps 1 --warmup 1   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import DOCS, best_seconds, exact_command, hf_dropouts, machine_info, machine_line, update_docs
from pocketlm import perf
from pocketlm import train as train_mod
from pocketlm.batching import MicroBatch, collate, epoch_batches
from pocketlm.config import ModelConfig, TrainConfig
from pocketlm.cpu_kernels import CpuAttention
from pocketlm.data import cached_token_stream, make_examples, read_text, split_wikitext_articles, tokenize_documents
from pocketlm.device import autocast, resolve_device, resolve_precision
from pocketlm.hf import hf_config
from pocketlm.model import IGNORE_INDEX, decay_groups
from pocketlm.tokenizer import Tokenizer, get_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
SECTION = "## Throughput"
ROWS = ("pocketlm", "pocketlm_eager_bf16", "pocketlm_fp32", "hf_fp32", "hf_bf16", "hf_bf16_gpt2_dropouts")
GPU_ROWS = ("pocketlm_mb16", "hf_bf16_mb16")  # CUDA only by default
TARGET_VS_HF, TARGET_MFU, TARGET_TOKENIZE_S, TARGET_RELOAD_S = 2.0, 0.5, 5.0, 0.5


@dataclasses.dataclass
class Row:
    """One configuration: ``step(micro_batches)`` runs an optimizer step and returns its loss."""

    name: str
    impl: str
    precision: str
    compiled: bool
    micro_batch: int
    step: Callable[[list[MicroBatch]], float]
    info: dict[str, Any]


def workload_config(args: argparse.Namespace, device: torch.device, **overrides: Any) -> TrainConfig:
    """``TrainConfig(batching="pack")`` defaults with the workload's shape; the context widened to
    ``--seq-len`` where the preset's is shorter."""
    cfg = TrainConfig(preset=args.preset, batching="pack", device=device.type, batch_size=args.batch_size,
                      grad_accum=args.grad_accum)
    model = {"block_size": args.seq_len} if args.seq_len > cfg.model_config().block_size else {}
    return dataclasses.replace(cfg, model=model, **overrides)


def pocketlm_row(name: str, cfg: TrainConfig, device: torch.device, compiled: bool) -> Row:
    """The model and optimizer exactly as ``pocketlm.train`` builds them, stepped by ``train_step``."""
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = train_mod.build_model(cfg, device, compiled=compiled)
    model.train()
    optimizer = train_mod.build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(micro: list[MicroBatch]) -> float:
        loss, _ = train_mod.train_step(model, optimizer, micro, lr=cfg.lr, device=device, precision=precision,
                                       scaler=scaler, grad_clip=cfg.grad_clip)
        return float(loss)  # waits for the step on a GPU

    info = {"checkpointing": model.checkpointing, "full_checkpoint_blocks": model.full_checkpoint_blocks,
            "fused_loss": model.fused_loss, "optimizer": type(optimizer).__name__,
            "n_params": model.num_parameters(),
            "fused_adamw": bool(optimizer.defaults.get("fused"))}
    return Row(name, "pocketlm", precision, compiled, cfg.batch_size, step, info)


def hf_row(name: str, cfg: TrainConfig, device: torch.device, precision: str, dropouts: str = "pocketlm") -> Row:
    """``GPT2LMHeadModel`` of the same shape and dropouts, trained the way a Hugging Face user would."""
    import transformers

    model_cfg = cfg.model_config()
    torch.manual_seed(cfg.seed)
    model = transformers.GPT2LMHeadModel(hf_config(model_cfg, **hf_dropouts(model_cfg, dropouts))).to(device)
    model.train()
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  **({"fused": True} if fused else {}))
    # pocketlm's targets are already shifted; transformers takes them as shift_labels where it can
    loss_fn = getattr(model, "loss_function", None)
    own_shift = loss_fn is not None and "shift_labels" in inspect.signature(loss_fn).parameters

    def step(micro: list[MicroBatch]) -> float:
        total = torch.zeros((), device=device)
        for mb in micro:
            mb = mb.to(device, non_blocking=True)
            if own_shift:
                extra = {"labels": mb.targets, "shift_labels": mb.targets}
            else:  # its own shift: the last position of each row goes unpredicted
                labels = torch.full_like(mb.targets, IGNORE_INDEX)
                labels[:, 1:] = mb.targets[:, :-1]
                extra = {"labels": labels}
            with autocast(device, precision):
                loss = model(input_ids=mb.input_ids, **extra).loss / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    info = {"attn_implementation": model.config._attn_implementation, "fused_adamw": fused,
            "n_params": sum(p.numel() for p in model.parameters()),
            "targets_as": "shift_labels" if own_shift else "labels (own shift)", "dropouts": dropouts,
            **hf_dropouts(model_cfg, dropouts)}
    return Row(name, "transformers.GPT2LMHeadModel", precision, False, cfg.batch_size, step, info)


def make_row(name: str, args: argparse.Namespace, device: torch.device) -> Row:
    # a "_mb16" row takes each step's micro-batches as one (16 x seq_len on the seed workload)
    shape = {"batch_size": args.batch_size * args.grad_accum, "grad_accum": 1} if name.endswith("_mb16") else {}
    if name.startswith("hf_"):
        return hf_row(name, workload_config(args, device, **shape), device, "fp32" if "fp32" in name else "bf16",
                      "gpt2" if name.endswith("_gpt2_dropouts") else "pocketlm")
    precision = {"pocketlm_eager_bf16": "bf16", "pocketlm_fp32": "fp32"}.get(name, "auto")
    cfg = workload_config(args, device, precision=precision, **shape)
    compiled = name in ("pocketlm", "pocketlm_mb16") and train_mod.should_compile(cfg, device, float("inf"))
    return pocketlm_row(name, cfg, device, compiled)


def kernel_floor(model_cfg: ModelConfig, batch_size: int, seq_len: int, grad_accum: int, device: torch.device,
                 repeats: int = 3) -> dict[str, Any]:
    """Seconds per optimizer step spent in the step's matrix products and attention alone, at
    their real shapes in bf16: every Linear's forward, input-gradient and weight-gradient GEMM
    (the output layer included) and attention forward + backward (SDPA, or on a CPU pocketlm's
    compiled banded attention where that is faster), best of ``repeats``. No trainer can beat
    this with these kernels, so it bounds the MFU reachable on this machine."""
    n, c, h = batch_size * seq_len, model_cfg.n_embd, model_cfg.n_head
    bf16 = dict(device=device, dtype=torch.bfloat16)
    shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]  # (in, out) of each block's Linears

    def gemms(d_in: int, d_out: int) -> Callable[[], None]:
        x, w, dy = torch.randn(n, d_in, **bf16), torch.randn(d_out, d_in, **bf16), torch.randn(n, d_out, **bf16)
        return lambda: (x @ w.t(), dy @ w, dy.t() @ x)  # forward, input gradient, weight gradient

    q, k, v = (torch.randn(batch_size, h, seq_len, c // h, **bf16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(batch_size, h, seq_len, c // h, **bf16)

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad_out)

    candidates = {"sdpa": sdpa}
    if device.type == "cpu":
        banded = torch.compile(CpuAttention.apply)
        candidates["pocketlm_cpu_attention"] = lambda: banded(q, k, v, None).backward(grad_out)
    candidate_s = {name: best_seconds(fn, repeats=repeats, device=device) for name, fn in candidates.items()}
    attention_kernel = min(candidate_s, key=candidate_s.__getitem__)

    per_step = {"block_gemms": best_seconds(*(gemms(i, o) for i, o in shapes), repeats=repeats, device=device)
                * model_cfg.n_layer,
                "output_layer_gemms": best_seconds(gemms(c, model_cfg.vocab_size), repeats=repeats, device=device),
                "attention": candidate_s[attention_kernel] * model_cfg.n_layer}
    seconds = {name: t * grad_accum for name, t in per_step.items()}
    return {"seconds_per_step": {k: round(v, 3) for k, v in seconds.items()},
            "total_s": round(sum(seconds.values()), 3), "attention_kernel": attention_kernel,
            "attention_candidates_s_per_layer": {name: round(t, 4) for name, t in candidate_s.items()}}


def real_batches(tokenizer: Tokenizer, data: Path, batch_size: int, seq_len: int, n: int,
                 seed: int) -> tuple[list[MicroBatch], int]:
    """The first ``n`` full ``pack`` micro-batches of epoch 0 (cycled if there are fewer), and how
    many distinct ones there were."""
    examples = make_examples(tokenize_documents(split_wikitext_articles(read_text(data)), tokenizer), seq_len)
    batches = [b for b in epoch_batches("pack", examples.lengths, batch_size, seq_len, seed, 0)
               if len(b.rows) == batch_size and b.seq_len == seq_len]
    if not batches:
        raise SystemExit(f"{data} is too short for one {batch_size} x {seq_len} micro-batch")
    distinct = [collate(examples, b, tokenizer.eot_id) for b in batches[:n]]
    return [distinct[i % len(distinct)] for i in range(n)], len(distinct)


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


def run_rows(rows: list[Row], batches: list[MicroBatch], args: argparse.Namespace, device: torch.device,
             say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Round-robin timing; each row steps through the same batches, ``grad_accum`` (or, for a
    micro-batch-16 row, all of that step's rows in one micro-batch) per step."""
    rounds, accum, threads = args.warmup + args.steps, args.grad_accum, torch.get_num_threads()
    log = {r.name: {"times": [], "cpu": [], "losses": []} for r in rows}
    for i in range(rounds):
        for k in range(len(rows)):
            row = rows[(k + i) % len(rows)]
            micro = batches[i * accum:(i + 1) * accum]
            if row.micro_batch != args.batch_size:  # one micro-batch holding the step's rows
                micro = [merge(micro)]
            torch.manual_seed(10_000 + i)  # the same dropout masks for each pocketlm row
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            loss = row.step(micro)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            for key, value in (("times", wall), ("cpu", cpu), ("losses", loss)):
                log[row.name][key].append(value)
            say(f"round {i + 1}/{rounds} {'(warm-up) ' if i < args.warmup else ''}{row.name}: {wall:.2f} s, "
                f"loss {loss:.4f}")
    out = {}
    tokens = args.batch_size * args.seq_len * accum
    for row in rows:
        times, cpu = log[row.name]["times"][args.warmup:], log[row.name]["cpu"][args.warmup:]
        med = statistics.median(times)
        warm = log[row.name]["times"][:args.warmup]
        out[row.name] = {"implementation": row.impl, "precision": row.precision, "compiled": row.compiled,
                         "micro_batch": row.micro_batch, "grad_accum": accum * args.batch_size // row.micro_batch,
                         "tokens_per_step": tokens, "warmup_step_s": [round(t, 3) for t in warm],
                         "step_s": [round(t, 3) for t in times], "median_step_s": round(med, 4),
                         "tokens_per_s": round(tokens / med, 1),
                         "first_steps_extra_s": round(sum(warm) - len(warm) * med, 2),
                         "cpu_share": round(sum(cpu) / (sum(times) * threads), 3) if device.type == "cpu" else None,
                         "losses": [round(x, 5) for x in log[row.name]["losses"]], **row.info}
    return out


@contextlib.contextmanager
def fresh_compile_cache(enabled: bool) -> Iterator[None]:
    """Point torch.compile's on-disk cache (read when it first compiles) at an empty directory."""
    if not enabled:
        yield
        return
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="pocketlm-inductor-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def merge(micro: list[MicroBatch]) -> MicroBatch:
    """Micro-batches of one step as one micro-batch (segment and position ids filled where absent)."""
    if len(micro) == 1:
        return micro[0]
    packed = any(m.segment_ids is not None for m in micro)

    def ids(m: MicroBatch, what: str) -> torch.Tensor:
        t = getattr(m, what)
        if t is not None:
            return t
        (B, T), dev = m.input_ids.shape, m.input_ids.device
        if what == "position_ids":
            return torch.arange(T, device=dev).expand(B, T)
        return torch.zeros(B, T, dtype=torch.long, device=dev)

    cat = lambda what: torch.cat([ids(m, what) for m in micro]) if packed else None
    return MicroBatch(torch.cat([m.input_ids for m in micro]), torch.cat([m.targets for m in micro]),
                      cat("position_ids"), cat("segment_ids"), sum(m.real_tokens for m in micro))


def summarise(rows: dict[str, dict[str, Any]], fpt: float, peaks: dict[str, Any],
              tokens_per_step: int) -> dict[str, Any]:
    """MFU of each row, the ratios, compile cost and break-even (and where auto-compile starts)."""
    for row in rows.values():
        row["mfu"] = round(row["tokens_per_s"] * fpt / peaks["bf16_flops"], 4)
        if peaks.get("datasheet_bf16_flops"):
            row["mfu_vs_datasheet"] = round(row["tokens_per_s"] * fpt / peaks["datasheet_bf16_flops"], 4)
    tps = {name: row["tokens_per_s"] for name, row in rows.items()}
    ratio = lambda a, b: round(tps[a] / tps[b], 3) if a in tps and b in tps else None
    ratios = {"pocketlm_vs_hf_bf16": ratio("pocketlm", "hf_bf16"), "pocketlm_vs_hf_fp32": ratio("pocketlm", "hf_fp32"),
              "pocketlm_vs_hf_bf16_gpt2_dropouts": ratio("pocketlm", "hf_bf16_gpt2_dropouts"),
              "eager_bf16_vs_hf_bf16": ratio("pocketlm_eager_bf16", "hf_bf16"),
              "pocketlm_vs_eager_bf16": ratio("pocketlm", "pocketlm_eager_bf16"),
              "pocketlm_fp32_vs_hf_fp32": ratio("pocketlm_fp32", "hf_fp32"),
              "pocketlm_mb16_vs_hf_bf16_mb16": ratio("pocketlm_mb16", "hf_bf16_mb16")}
    compile_cost: dict[str, Any] = {}
    comp, eager = rows.get("pocketlm"), rows.get("pocketlm_eager_bf16")
    if comp and eager and comp["compiled"] and comp["precision"] == eager["precision"]:
        extra = comp["first_steps_extra_s"] - eager["first_steps_extra_s"]
        saved = eager["median_step_s"] - comp["median_step_s"]
        step_at_peak = train_mod.work_seconds_at_peak(1, tokens_per_step, fpt, peaks["bf16_flops"])
        auto_compile_min_steps = math.ceil(train_mod.COMPILE_MIN_PEAK_SECONDS / step_at_peak)
        compile_cost = {"compiled_first_steps_extra_s": comp["first_steps_extra_s"],
                        "eager_first_steps_extra_s": eager["first_steps_extra_s"],
                        "compile_cost_s": round(extra, 2), "saved_per_step_s": round(saved, 4),
                        "break_even_steps": round(extra / saved, 1) if saved > 0 else None,
                        "auto_compile_min_peak_s": train_mod.COMPILE_MIN_PEAK_SECONDS,
                        "auto_compile_min_steps": auto_compile_min_steps}
    return {"ratios": ratios, "compile": compile_cost}


def targets(device: torch.device, rows: dict[str, Any], ratios: dict[str, Any], data: dict[str, Any] | None
            ) -> dict[str, bool | None]:
    full = bool(data) and data["bytes"] >= 10_000_000
    def at_least_2x(key: str) -> bool | None:
        return None if ratios[key] is None or device.type != "cpu" else ratios[key] >= TARGET_VS_HF

    return {"vs_hf_bf16_at_least_2x": at_least_2x("pocketlm_vs_hf_bf16"),
            "vs_hf_bf16_gpt2_dropouts_at_least_2x": at_least_2x("pocketlm_vs_hf_bf16_gpt2_dropouts"),
            "mfu_at_least_50pct": rows["pocketlm"]["mfu"] >= TARGET_MFU if "pocketlm" in rows else None,
            "tokenize_11mb_within_5s": data["tokenize_and_cache_s"] <= TARGET_TOKENIZE_S if full else None,
            "cache_reload_within_0_5s": data["cache_reload_s"] <= TARGET_RELOAD_S if full else None}


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def docs_section(r: dict[str, Any]) -> str:
    w, p, m = r["workload"], r["peaks"], r["machine"]
    state = lambda ok: "not measured" if ok is None else ("**met**" if ok else "**not met**")
    machine = machine_line(m["torch_threads"]) + (f", GPU {m['gpu']}" if m.get("gpu") else "")
    lines = [SECTION, "",
             f"Training throughput on `{w['preset']}`, real WikiText-2 tokens packed into micro-batches of "
             f"{w['batch_size']} x {w['seq_len']} (every token real), {w['grad_accum']} micro-batches per AdamW step "
             f"({w['tokens_per_step']:,} tokens), AdamW; {w['timed_steps']} timed step(s) after {w['warmup_steps']} warm-up "
             "step(s), the rows taking turns step by step (the order rotating). Rows marked 16 x 1 (CUDA) take each "
             "step's micro-batches as one.", "",
             f"- Machine: {machine}; torch {m['torch']}, transformers {m['transformers']}, device {m['device']}.",
             f"- Date: {r['date']}.", f"- Command: `{r['command']}` ({r['runtime_s']:.0f} s in all).", "",
             "| implementation | precision | compiled | micro-batch x accum | tokens/s | MFU | vs HF bf16 "
             "| vs HF bf16, GPT-2 dropouts |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        ref = r["rows"].get("hf_bf16_mb16" if name.endswith("_mb16") else "hf_bf16")
        stock = None if name.endswith("_mb16") else r["rows"].get("hf_bf16_gpt2_dropouts")
        vs = lambda other: f"{row['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other else "n/a"
        impl = "pocketlm" if row["implementation"] == "pocketlm" else "HF `GPT2LMHeadModel`"
        impl = f"**{impl}** (defaults)" if name in ("pocketlm", "pocketlm_mb16") else impl
        if row.get("dropouts") == "gpt2":
            impl += ", GPT-2's dropouts (0.1 incl. attention)"
        lines.append(f"| {impl} | {row['precision']} | {'yes' if row['compiled'] else 'no'} | "
                     f"{row['micro_batch']} x {row['grad_accum']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['mfu']:.1%} | {vs(ref)} | {vs(stock)} |")
    lines += ["", f"Matrix-product peak measured at start (2048 x 2048 `torch.mm`): bf16 "
              f"{p['bf16_flops'] / 1e12:.2f} TFLOP/s, fp32 {p['fp32_flops'] / 1e12:.2f} TFLOP/s"
              + (f"; datasheet bf16 {p['datasheet_bf16_flops'] / 1e12:.0f} TFLOP/s" if p.get("datasheet_bf16_flops")
                 else "") + f". Model FLOPs: {w['flops_per_token'] / 1e9:.3f} GFLOP per token."]
    f = r.get("kernel_floor")
    if f:
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in f["seconds_per_step"].items())
        kernel = {"sdpa": "SDPA", "pocketlm_cpu_attention": "pocketlm's compiled banded CPU attention, faster "
                  "than SDPA's flash backward"}.get(f.get("attention_kernel", "sdpa"), f.get("attention_kernel"))
        lines += ["", f"Kernel floor: the step's matrix products and attention ({kernel}) alone, at their real "
                  f"shapes in bf16 ({parts}), take {f['total_s']:.2f} s per step: at most {f['tokens_per_s_ceiling']:,.0f} tokens/s "
                  f"or **{f['mfu_ceiling']:.0%} MFU** for any trainer using these kernels (oneDNN's GEMMs run "
                  "below the square-matrix peak at these shapes, the weight-gradient ones most)."]
    d = r.get("data")
    if d:
        lines += ["", f"Data: tokenizing {d['bytes'] / 1e6:.1f} MB (wiki.valid.raw x {d['repeat']}, {d['documents']} "
                  f"articles, {d['tokens']:,} tokens) into a fresh token cache took {d['tokenize_and_cache_s']:.2f} s "
                  f"(the tokenizer's Rust thread pool: {d['tokenizer_threads']} threads); reloading the cache took "
                  f"{d['cache_reload_s'] * 1000:.1f} ms (memory-mapped; touching every page after that "
                  f"{d['reload_touch_s'] * 1000:.1f} ms)."]
    c = r["compile"]
    if c:
        be = (f"it pays for itself after {c['break_even_steps']:.0f} steps" if c["break_even_steps"]
              else "it saved no time per step here")
        lines += ["", f"Compile cost: the compiled rows' first {w['warmup_steps']} steps took "
                  f"{c['compiled_first_steps_extra_s']:.1f} s more than as many steady steps (eager: "
                  f"{c['eager_first_steps_extra_s']:.1f} s), so compiling cost {c['compile_cost_s']:.1f} s and "
                  f"saved {c['saved_per_step_s']:.2f} s per step: {be} (auto-compile starts at "
                  f"{c['auto_compile_min_steps']} steps of this workload: "
                  f"{c['auto_compile_min_peak_s']:.0f} s of model FLOPs at the measured peak). The compile cache "
                  f"was {w['compile_cache']}; compiled and eager steps draw different dropout masks, so their losses differ slightly."]
    t = r["targets"]
    lines += ["", f"Targets: pocketlm at least {TARGET_VS_HF:.0f}x HF under bf16 autocast on a CPU, same run: "
              f"against HF with GPT-2's stock dropouts ({_x(r['ratios']['pocketlm_vs_hf_bf16_gpt2_dropouts'])}) "
              f"{state(t['vs_hf_bf16_gpt2_dropouts_at_least_2x'])}; against HF with pocketlm's dropouts "
              f"({_x(r['ratios']['pocketlm_vs_hf_bf16'])}) {state(t['vs_hf_bf16_at_least_2x'])}; MFU at least "
              f"{TARGET_MFU:.0%} of the measured bf16 peak: {state(t['mfu_at_least_50pct'])}; tokenizing 11 MB within "
              f"{TARGET_TOKENIZE_S:.0f} s: {state(t['tokenize_11mb_within_5s'])}; reloading the cache within "
              f"{TARGET_RELOAD_S} s: {state(t['cache_reload_within_0_5s'])}.", "",
              "Notes: tokens/s is tokens per optimizer step over the median step time (collation excluded: the "
              "batches are built beforehand). MFU is model FLOPs per second over the measured *bf16* peak for every "
              "row, fp32 rows included; `perf.flops_per_token` counts 6 FLOPs per matmul weight per token (forward, "
              "input and weight gradients; output layer included) plus 12 x layers x seq_len x width for attention, "
              "none for checkpointing's recomputation. pocketlm masks attention per document inside a packed row; "
              "Hugging Face gets the same `input_ids` and targets (`shift_labels`) but attends across the document "
              "boundaries (the same FLOPs). Both use fused AdamW over the same parameter groups and clipping at 1.0; "
              "the HF rows use pocketlm's dropouts (0.1 on embeddings and residuals, none on attention "
              "probabilities) except the one marked GPT-2's dropouts, which is `GPT2Config`'s stock 0.1 everywhere: "
              "attention-probability dropout sends CPU SDPA to its slow math kernel. pocketlm runs with "
              "`perf.keep_freed_memory_for_reuse()` set for the whole process (it affects the Hugging Face rows "
              "too)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2-125m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--rows", default=None, help=f"comma list from {', '.join(ROWS + GPU_ROWS)}")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="wiki.valid.raw")
    p.add_argument("--data-repeat", type=int, default=10, help="copies of --data to tokenize (10: 11 MB)")
    p.add_argument("--skip-data-timing", action="store_true")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the '{SECTION}' section")
    p.add_argument("--docs", type=Path, default=DOCS, help="the benchmarks page (default docs/benchmarks.md)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="let torch.compile reuse its on-disk cache (default: a fresh one, so the compile cost "
                        "is what a first run pays)")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.seq_len, args.grad_accum) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size, --seq-len and --grad-accum must be positive, --warmup not negative")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    say = lambda msg: print(f"[throughput {time.perf_counter() - began:5.0f}s] {msg}", file=sys.stderr, flush=True)
    load_start = os.getloadavg()[0]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads or usable)
    kept = perf.keep_freed_memory_for_reuse()
    device = resolve_device(args.device)
    names = args.rows.split(",") if args.rows else list(ROWS) + (list(GPU_ROWS) if device.type == "cuda" else [])
    unknown = set(names) - set(ROWS + GPU_ROWS)
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
    tokenizer = get_tokenizer()
    data = None
    if not args.skip_data_timing:
        say(f"data: tokenizing {args.data.name} x {args.data_repeat} into a fresh cache, then reloading it")
        data = time_data(tokenizer, args.data, args.data_repeat)
    say("measuring the bf16 and fp32 matrix-product peaks")
    peaks = {"bf16_flops": perf.measure_matmul_peak(device, torch.bfloat16),
             "fp32_flops": perf.measure_matmul_peak(device, torch.float32),
             "datasheet_bf16_flops": perf.known_peak_flops(device)}
    cfg = workload_config(args, device)
    say("timing the step's matrix products and attention alone (the kernel floor)")
    floor = kernel_floor(cfg.model_config(), args.batch_size, args.seq_len, args.grad_accum, device)
    n_micro = (args.warmup + args.steps) * args.grad_accum
    batches, distinct = real_batches(tokenizer, args.data, args.batch_size, args.seq_len, n_micro, cfg.seed)
    batches = [mb.to(device) for mb in batches]
    rows = []
    for name in names:
        say(f"setting up {name}")
        rows.append(make_row(name, args, device))
    say(f"{len(rows)} rows x ({args.warmup} warm-up + {args.steps} timed) steps, taking turns")
    with fresh_compile_cache(not args.warm_compile_cache):
        measured = run_rows(rows, batches, args, device, say)
    model_cfg: ModelConfig = cfg.model_config()
    fpt = perf.flops_per_token(model_cfg, args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    summary = summarise(measured, fpt, peaks, tokens_per_step)
    floor["mfu_ceiling"] = round(tokens_per_step * fpt / floor["total_s"] / peaks["bf16_flops"], 4)
    floor["tokens_per_s_ceiling"] = round(tokens_per_step / floor["total_s"], 1)
    result = {
        "benchmark": "throughput",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": exact_command(),
        "machine": dict(machine_info(device), keep_freed_memory_for_reuse=kept,
                        load_average={"start": load_start, "end": os.getloadavg()[0]}),
        "workload": {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "grad_accum": args.grad_accum, "tokens_per_step": args.batch_size * args.seq_len * args.grad_accum,
                     "batching": "pack", "data": str(args.data), "distinct_micro_batches": distinct,
                     "micro_batches_used": n_micro, "warmup_steps": args.warmup, "timed_steps": args.steps,
                     "seed": cfg.seed, "lr": cfg.lr, "flops_per_token": fpt,
                     "compile_cache": "warm (reused)" if args.warm_compile_cache else "cold (fresh directory)"},
        "peaks": peaks, "kernel_floor": floor, "rows": measured, **summary, "data": data,
    }
    result["targets"] = targets(device, measured, summary["ratios"], data)
    result["runtime_s"] = round(time.perf_counter() - began, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    if args.update_docs:
        update_docs(docs_section(result), SECTION, args.docs)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
