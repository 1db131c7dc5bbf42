"""Peak live tensor memory of training steps: pocketlm against Hugging Face GPT-2, what the memory
savers cost in throughput, and the memory planner against measured peaks.

Peak live tensor memory: the largest total size of PyTorch storages alive at once during one
steady-state optimizer step (forward and backward of each micro-batch, clipping, AdamW update),
parameters, gradients, optimizer state and batch included; counted on a CPU by
``memtrack.PeakMemoryTracker``, on CUDA by ``torch.cuda.max_memory_allocated`` (``--method``).
"Steady state": a warm-up step on a 1 x 8 micro-batch builds the AdamW state; the measured step
then starts with it in place and no gradients, as every later step does. GiB = 1024**3 bytes.

* Seed workload (``--preset``/``--batch-size``/``--seq-len``: gpt2-125m, 4 x 512 random tokens,
  bf16): pocketlm built and stepped as the trainer does (``workloads.pocketlm_trainer``, eager,
  which the planner models) with the defaults, ``--low-memory``, the fused loss only and the
  savers off (``workloads.SAVERS_OFF``); Hugging Face ``GPT2LMHeadModel`` with pocketlm's and with
  GPT-2's dropouts. Each with 4 micro-batches per step (the headline: from the second on, the
  earlier ones' fp32 gradients are alive) and with one. Ratios: against the Hugging Face row of
  the same accumulation and the issue's figures (nanoGPT 3.61 GiB, HF 5.97 GiB, the author's CPU).
* Throughput of the savers: untracked steps of each setting, taking turns step by step.
* Planner check: ``planner.predict_peak`` beside every measured step it models (fused loss,
  gradients alive): the seed rows and a grid of shapes x checkpointing modes, 2 micro-batches each.
* Checks of the tracker: PyTorch's ``MemTracker`` on the very same one-micro-batch step (it
  refuses a module called twice in one region), and (``--rss-check``) the rise of the peak
  resident memory (``VmHWM``) over one untracked step in a child process whose malloc unmaps
  freed blocks at once (RSS also holds kernel scratch memory the tracker cannot see).

    python benchmarks/memory.py --quick                     # seed rows, checks, a small grid
    python benchmarks/memory.py --threads 2 --update-docs   # everything: ~8 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import (GIB, Stopwatch, Table, Target, add_common_options, judge, render_section, script_main,
                     step_summary, steps_in_turns)
from memtrack import measure_peak
from workloads import NO_CHECKPOINTING, SAVERS_OFF, Trainer, hf_trainer, pocketlm_trainer, random_batch, train_config

from pocketlm.config import PRESETS, ModelConfig
from pocketlm.planner import predict_peak

SECTION = "## Memory"
NANOGPT_REFERENCE_GIB = 3.61  # the issue author's nanoGPT-style implementation, on their CPU
HF_REFERENCE_GIB = 5.97  # the issue author's GPT2LMHeadModel measurement, on their CPU
WARMUP_SHAPE = (1, 8)  # the warm-up step only has to create the optimizer state
GRID_GRAD_ACCUM = 2  # a micro-step with gradients alive: what the planner predicts
GRID_SHAPES = "tiny:1:128,tiny:4:512,tiny:8:128,gpt2-125m:1:128,gpt2-125m:4:256,gpt2-125m:8:512"
QUICK_GRID_SHAPES = "tiny:1:128,tiny:4:512,tiny:8:128,gpt2-125m:1:128"
GRID_MODES = {"none": NO_CHECKPOINTING, "selective": {"checkpointing": "selective", "full_checkpoint_blocks": 0},
              "selective + 2 full blocks (default)": {}, "full": {"checkpointing": "full"},
              "low memory": {"low_memory": True}}
PLANNER_TOLERANCE, PLANNER_MIN_CONFIGURATIONS = 0.10, 6


@dataclass(frozen=True)
class SeedRow:
    what: str
    grad_accum: int
    settings: dict[str, Any] | None = None
    """pocketlm's ``TrainConfig`` settings (and ``fused_loss``); None for Hugging Face."""
    dropouts: str = "pocketlm"
    full_run_only: bool = False


# The seed-workload rows in the order of the table: accumulated steps (the headline) first.
SEED_ROWS = {
    "pocketlm": SeedRow("**pocketlm, defaults**", 4, {}),
    "pocketlm_low_memory": SeedRow("pocketlm, `--low-memory`", 4, {"low_memory": True}),
    "pocketlm_no_checkpointing": SeedRow("pocketlm, fused loss only", 4, NO_CHECKPOINTING, full_run_only=True),
    "pocketlm_no_savers": SeedRow("pocketlm, memory savers off", 4, SAVERS_OFF),
    "hf_accum": SeedRow("HF `GPT2LMHeadModel`, pocketlm's dropouts", 4),
    "hf_gpt2_dropouts_accum": SeedRow("HF `GPT2LMHeadModel`, GPT-2's dropouts", 4, dropouts="gpt2"),
    "pocketlm_single": SeedRow("pocketlm, defaults", 1, {}),
    "pocketlm_low_memory_single": SeedRow("pocketlm, `--low-memory`", 1, {"low_memory": True}),
    "pocketlm_no_savers_single": SeedRow("pocketlm, memory savers off", 1, SAVERS_OFF),
    "hf": SeedRow("HF `GPT2LMHeadModel`, pocketlm's dropouts", 1),
    "hf_gpt2_dropouts": SeedRow("HF `GPT2LMHeadModel`, GPT-2's dropouts", 1, dropouts="gpt2"),
}
THROUGHPUT_SETTINGS = {"default": ("defaults", {}), "fused_loss_only": ("fused loss only", NO_CHECKPOINTING),
                       "no_savers": ("memory savers off", SAVERS_OFF), "low_memory": ("`--low-memory`",
                                                                                       {"low_memory": True})}
TARGETS = {
    "default_peak_gib": Target("default settings peak at most 2.5 GiB on the seed workload", 2.5, at_most=True,
                               fmt="{:.2f} GiB"),
    "fp32_weights_and_state": Target("with fp32 weights and fp32 AdamW moments (checked on the tensors)", True,
                                     fmt="{}"),
    "default_vs_no_savers": Target("default settings at least 0.85x the tokens/s of the savers-off run", 0.85,
                                   fmt="{:.2f}x"),
    "low_memory_peak_gib": Target("`--low-memory` peak at most 1.5 GiB on the seed workload", 1.5, at_most=True,
                                  fmt="{:.2f} GiB"),
    "planner_within_10pct": Target(f"planner within 10% of the measured peak on every configuration (at least "
                                   f"{PLANNER_MIN_CONFIGURATIONS} measured with gradients alive)", 1.0, fmt="{:.0%}"),
}


def _storage_bytes(tensors: Any) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """By hand: parameters (tied ones once), gradients (bf16 where the optimizer keeps its own
    bf16 gradient buffers, as ``--low-memory`` does) and optimizer state."""
    params = list(model.parameters())
    trained = list({id(p): p for p in params if p.requires_grad}.values())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    grads = sum(2 * p.numel() for p in trained) if hasattr(optimizer, "grad_buffers") else _storage_bytes(trained)
    p, o = _storage_bytes(params), _storage_bytes(state)
    return {"params": p, "grads": grads, "optimizer_state": o, "total": p + grads + o}


def measure_step(trainer: Trainer, vocab: int, batch_size: int, seq_len: int, grad_accum: int, *,
                 device: torch.device, method: str = "auto", seed: int = 0, cross_check: bool = False
                 ) -> dict[str, Any]:
    """Peak of one steady-state step of ``grad_accum`` random micro-batches, after a warm-up step.
    ``cross_check`` runs PyTorch's MemTracker inside the tracker: both see every op."""
    trainer.step([random_batch(*WARMUP_SHAPE, vocab, seed + 1).to(device)])  # builds the optimizer state
    batches = [random_batch(batch_size, seq_len, vocab, seed + 2 + i).to(device) for i in range(grad_accum)]
    tensors = [t for mb in batches for t in (mb.input_ids, mb.targets)]
    static = static_bytes(trainer.model, trainer.optimizer)
    theirs = None
    if cross_check:
        from torch.distributed._tools.mem_tracker import MemTracker
        theirs = MemTracker()
        theirs.track_external(trainer.model, trainer.optimizer, *tensors)

    def step() -> None:
        with warnings.catch_warnings(), theirs or contextlib.nullcontext():
            # MemTracker warns about each optimizer-state entry that is not a tensor
            warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
            trainer.step(batches)

    gc.collect()
    began = time.perf_counter()
    d = measure_peak(step, device=device, model=trainer.model, optimizer=trainer.optimizer, tensors=tensors,
                     method=method).to_dict()
    row = {"batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum, "device": str(device),
           **trainer.info, "peak_bytes": d["peak_bytes"], "peak_gib": round(d["peak_bytes"] / GIB, 3),
           "method": d["method"], "start_bytes": d["start_bytes"], "static_bytes": static,
           "static_gib": round(static["total"] / GIB, 3),
           "above_static_gib": round((d["peak_bytes"] - static["total"]) / GIB, 3),
           "measured_step_s": round(time.perf_counter() - began, 1)}
    if d["method"] == "dispatch-tracker":
        row.update(peak_phase=d["peak_phase"], peak_op=d["peak_op"], peak_autograd_node=d["peak_autograd_node"],
                   peak_breakdown_gib={k: round(v / GIB, 3) for k, v in d["peak_breakdown"].items()},
                   phase_peaks_gib={k: round(v / GIB, 3) for k, v in d["phase_peaks"].items()},
                   unregistered_bytes=d["unregistered_bytes"], ops=d["n_ops"])
    if theirs is not None:
        peak = sum(snap["Total"] for snap in theirs.get_tracker_snapshot("peak").values())
        row.update(memtracker_peak_bytes=peak, memtracker_agrees=peak == d["peak_bytes"])
    return row


def measure_training_step(model: str | ModelConfig, batch_size: int, seq_len: int, *, low_memory: bool = False,
                          precision: str = "bf16", grad_accum: int = 1, device: str | torch.device = "cpu",
                          method: str = "auto", seed: int = 0, settings: dict[str, Any] | None = None,
                          cross_check: bool = False) -> dict[str, Any]:
    """One steady-state pocketlm step (see ``measure_step``) with ``settings`` (``TrainConfig``
    fields and ``fused_loss``) on a preset or custom ``ModelConfig``, and the planner's prediction."""
    device = torch.device(device)
    cfg = train_config(model, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, device=device.type,
                       precision=precision, compile=False, seed=seed, **({"low_memory": True} if low_memory else {}))
    trainer = pocketlm_trainer(cfg, **(settings or {}))
    model_cfg, info = cfg.model_config(), trainer.info
    row = {"preset": model if isinstance(model, str) else "custom",
           **measure_step(trainer, model_cfg.vocab_size, batch_size, seq_len, grad_accum, device=device,
                          method=method, seed=seed, cross_check=cross_check)}
    row["dtypes"] = {"params": sorted({str(p.dtype) for p in trainer.model.parameters()}),
                     "optimizer_state": sorted({str(v.dtype) for s in trainer.optimizer.state.values()
                                                for k, v in s.items() if isinstance(v, torch.Tensor) and k != "step"})}
    if info["fused_loss"]:  # the planner models the fused loss, for a micro-step with gradients alive
        predicted = predict_peak(model_cfg, batch_size, seq_len, precision=info["precision"],
                                 checkpointing=info["checkpointing"], full_blocks=info["full_checkpoint_blocks"],
                                 device=device.type, low_memory=info["low_memory"]).total
        row.update(planner_predicted_bytes=predicted, planner_predicted_gib=round(predicted / GIB, 3))
        if grad_accum >= 2:
            row["planner_rel_error"] = round(predicted / row["peak_bytes"] - 1, 4)
    return row


def measure_hf_step(preset: str, batch_size: int, seq_len: int, *, precision: str = "bf16", grad_accum: int = 1,
                    device: str | torch.device = "cpu", method: str = "auto", seed: int = 0,
                    dropouts: str = "pocketlm") -> dict[str, Any]:
    """The same steady-state step on Hugging Face ``GPT2LMHeadModel`` (``workloads.hf_trainer``)."""
    device = torch.device(device)
    cfg = train_config(preset, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, device=device.type,
                       precision=precision, seed=seed)
    return {"preset": preset, **measure_step(hf_trainer(cfg, dropouts=dropouts), cfg.model_config().vocab_size,
                                             batch_size, seq_len, grad_accum, device=device, method=method, seed=seed)}


def rss_child(preset: str, batch_size: int, seq_len: int, precision: str) -> dict[str, Any]:
    """In this (child) process: a default pocketlm step twice (the first builds the optimizer state
    and warms oneDNN), then reset the peak-RSS mark and report how far one more step raises it.
    Run with MALLOC_MMAP_THRESHOLD_ set so that freed blocks leave the RSS at once."""
    cfg = train_config(preset, batch_size=batch_size, seq_len=seq_len, device="cpu", precision=precision,
                       compile=False)
    trainer = pocketlm_trainer(cfg)
    batch = [random_batch(batch_size, seq_len, cfg.model_config().vocab_size, 2)]
    for _ in range(2):
        trainer.step(batch)
    gc.collect()

    def status(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    trainer.step(batch)
    peak = status("VmHWM")
    return {"rss_before_step": before, "peak_rss": peak, "rise_bytes": peak - before,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "static_bytes": static_bytes(trainer.model, trainer.optimizer)}


def rss_check(preset: str, batch_size: int, seq_len: int, precision: str) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", f"{preset},{batch_size},{seq_len},{precision}",
           "--threads", str(torch.get_num_threads())]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def measure_throughput(preset: str, batch_size: int, seq_len: int, *, precision: str, device: torch.device,
                       steps: int, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Tokens/s of untracked one-micro-batch steps for each of ``THROUGHPUT_SETTINGS``, from the
    same initialisation on the same batches and dropout masks, taking turns step by step."""
    cfg = train_config(preset, batch_size=batch_size, seq_len=seq_len, device=device.type, precision=precision,
                       compile=False, seed=seed)
    trainers = {name: pocketlm_trainer(cfg, **settings) for name, (_, settings) in THROUGHPUT_SETTINGS.items()}
    vocab = PRESETS[preset].vocab_size
    batches = [random_batch(batch_size, seq_len, vocab, seed + 100 + r).to(device) for r in range(warmup + steps)]
    log = steps_in_turns({name: (lambda r, t=t: t.step([batches[r]])) for name, t in trainers.items()},
                         rounds=warmup + steps, warmup=warmup, seed=seed + 1000, device=device)
    rows = {name: {"what": THROUGHPUT_SETTINGS[name][0], **trainers[name].info,
                   **step_summary(log[name], batch_size * seq_len)} for name in trainers}
    base = rows["no_savers"]
    for row in rows.values():
        row["vs_no_savers"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        row["max_abs_loss_diff_vs_no_savers"] = round(max(abs(a - b) for a, b in zip(row["losses"], base["losses"])), 5)
    return {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "precision": precision,
            "torch_threads": torch.get_num_threads(), "warmup_steps": warmup, "timed_steps": steps, "rows": rows}


def effective_checkpointing(preset: str, settings: dict[str, Any]) -> tuple[str, int, bool]:
    """(mode, fully recomputed blocks, low memory) that ``settings`` come to on ``preset``."""
    n_layer = PRESETS[preset].n_layer
    if settings.get("low_memory"):
        return "full", n_layer, True
    mode = settings.get("checkpointing", "selective")
    full = min(settings.get("full_checkpoint_blocks", 2), n_layer)
    if mode == "none":
        return "none", 0, False
    return ("full", n_layer, False) if mode == "full" or full == n_layer else (mode, full, False)


def grid_rows(shapes: str, common: dict[str, Any], say: Any) -> list[dict[str, Any]]:
    """Each shape under each checkpointing mode, skipping modes that come to an earlier one's settings."""
    rows = []
    for shape in filter(None, shapes.split(",")):
        preset, b, t = shape.split(":")
        seen: set[tuple[str, int, bool]] = set()
        for mode, settings in GRID_MODES.items():
            key = effective_checkpointing(preset, settings)
            if key in seen:
                continue
            seen.add(key)
            if key[0] == "full" and mode != "full" and not key[2]:  # tiny: the default's 2 full blocks are all
                mode = f"full (= the default on {key[1]} blocks)"
            say(f"planner check: {preset} {b}x{t}, checkpointing {mode}, {GRID_GRAD_ACCUM} micro-batches")
            row = measure_training_step(preset, int(b), int(t), grad_accum=GRID_GRAD_ACCUM, settings=settings, **common)
            rows.append({**row, "checkpointing_mode": mode})
    return rows


def planner_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [(r["preset"], r["planner_rel_error"]) for r in rows if "planner_rel_error" in r]
    if not errors:
        return {}
    within = [abs(e) <= PLANNER_TOLERANCE for _, e in errors]
    large = [ok for (preset, _), ok in zip(errors, within) if preset == "gpt2-125m"]
    return {"configurations": len(errors), "within_10pct": sum(within), "gpt2_125m_configurations": len(large),
            "gpt2_125m_within_10pct": sum(large), "min_rel_error": min(e for _, e in errors),
            "max_rel_error": max(e for _, e in errors)}


def hf_for(rows: dict[str, Any], row: dict[str, Any], dropouts: str) -> dict[str, Any]:
    """The Hugging Face row with ``dropouts`` and the same accumulation as ``row``."""
    name = ("hf" if dropouts == "pocketlm" else "hf_gpt2_dropouts") + ("_accum" if row["grad_accum"] > 1 else "")
    return rows.get(name) or {}


def ratios_of(rows: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, row in rows.items():
        if name.startswith("hf"):
            out[f"{name}_vs_issue_hf_reference"] = round(row["peak_gib"] / HF_REFERENCE_GIB, 3)
            continue
        out[f"{name}_vs_nanogpt_reference"] = round(row["peak_gib"] / NANOGPT_REFERENCE_GIB, 3)
        for dropouts, label in (("pocketlm", "hf"), ("gpt2", "hf_gpt2_dropouts")):
            if hf_for(rows, row, dropouts):
                out[f"{name}_vs_{label}"] = round(row["peak_bytes"] / hf_for(rows, row, dropouts)["peak_bytes"], 3)
    return out


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("memory")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = (args.preset, args.batch_size, args.seq_len)
    common = dict(precision=args.precision, device=device, method=args.method)
    cross = device.type == "cpu" and args.method != "cuda"
    rows: dict[str, Any] = {}
    for name, spec in SEED_ROWS.items():
        if (spec.full_run_only and args.quick) or (spec.settings is None and args.no_hf):
            continue
        check = cross and name == "pocketlm_single"
        clock.say(f"seed workload: {spec.what.strip('*')}, {spec.grad_accum} micro-batch(es)"
                  + (" with MemTracker alongside" if check else ""))
        if spec.settings is None:
            rows[name] = measure_hf_step(*shape, grad_accum=spec.grad_accum, dropouts=spec.dropouts, **common)
        else:
            rows[name] = measure_training_step(*shape, grad_accum=spec.grad_accum, settings=spec.settings,
                                               cross_check=check, **common)
        rows[name]["what"] = spec.what
    checks: dict[str, Any] = {"memtracker": {}}
    if cross:
        clock.say("tiny 4x128 with MemTracker alongside")
        for label, row in ((f"{args.preset} {args.batch_size}x{args.seq_len}", rows["pocketlm_single"]),
                           ("tiny 4x128", measure_training_step("tiny", 4, 128, cross_check=True, **common))):
            checks["memtracker"][label] = {k: row[k] for k in ("peak_bytes", "memtracker_peak_bytes",
                                                               "memtracker_agrees")}
    if args.rss_check if args.rss_check is not None else device.type == "cpu" and sys.platform.startswith("linux"):
        clock.say("peak-RSS check in a child process")
        checks["rss"] = rss_check(*shape, args.precision)
    throughput = None
    if not args.no_throughput:
        steps = args.throughput_steps or (2 if args.quick else 6)
        clock.say(f"throughput of the savers: 1 warm-up + {steps} timed steps each, taking turns")
        throughput = measure_throughput(*shape, precision=args.precision, device=device, steps=steps)
    grid = [] if args.no_grid else grid_rows(args.grid or (QUICK_GRID_SHAPES if args.quick else GRID_SHAPES),
                                             common, clock.say)
    planner = planner_summary([*rows.values(), *grid])
    head = rows["pocketlm"]
    values = {"default_peak_gib": head["peak_gib"],
              "fp32_weights_and_state": head["dtypes"] == {"params": ["torch.float32"],
                                                           "optimizer_state": ["torch.float32"]},
              "default_vs_no_savers": throughput["rows"]["default"]["vs_no_savers"] if throughput else None,
              "low_memory_peak_gib": rows["pocketlm_low_memory"]["peak_gib"],
              "planner_within_10pct": (planner["within_10pct"] / planner["configurations"]
                                       if planner.get("configurations", 0) >= PLANNER_MIN_CONFIGURATIONS else None)}
    return clock.envelope(__file__, argv, device,
                          seed_workload={"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                         "precision": args.precision, "grad_accum": SEED_ROWS["pocketlm"].grad_accum},
                          reference_gib={"nanogpt": NANOGPT_REFERENCE_GIB, "hf": HF_REFERENCE_GIB},
                          results=rows, ratios=ratios_of(rows), throughput=throughput, checks=checks, grid=grid,
                          planner=planner, quick=args.quick, targets=judge(TARGETS, values))


def savers_text(row: dict[str, Any]) -> str:
    ck = row["checkpointing"] + (f" + {row['full_checkpoint_blocks']} full blocks" if row["checkpointing"] ==
                                 "selective" and row["full_checkpoint_blocks"] else "")
    return (f"checkpointing {ck}, " + ("chunked fused loss" if row["fused_loss"] else "plain loss, full logits")
            + (", bf16 gradients and AdamW moments" if row["low_memory"] else ""))


def where(row: dict[str, Any]) -> str:
    node = f" in `{row['peak_autograd_node']}`" if row.get("peak_autograd_node") else ""
    return f"{row.get('peak_phase') or 'n/a'}" + (f" (`{row['peak_op']}`{node})" if row.get("peak_op") else "")


def docs_section(r: dict[str, Any]) -> str:
    seed, rows = r["seed_workload"], r["results"]

    def ratio(row: dict[str, Any], dropouts: str) -> str:
        ref = hf_for(rows, row, dropouts)
        return f"{row['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "n/a"

    def planner(row: dict[str, Any]) -> list[str]:
        if "planner_rel_error" in row:
            return [f"{row['planner_predicted_gib']:.2f}", f"{row['planner_rel_error']:+.1%}"]
        if "planner_predicted_gib" in row:
            return [f"({row['planner_predicted_gib']:.2f})", "n/a, no gradients alive"]
        return ["", ""] if row["implementation"] != "pocketlm" else ["n/a", "n/a, plain loss not modelled"]

    seed_table = Table(
        ["workload", "micro-batches per step", "peak (GiB)", "vs HF, same dropouts", "vs HF, GPT-2 dropouts",
         f"vs nanoGPT {NANOGPT_REFERENCE_GIB} GiB", "params+grads+AdamW (GiB)", "peak reached in",
         "live at the peak (GiB)", "planner (GiB)", "planner error"],
        [[row["what"] + (f" ({savers_text(row)})" if row["implementation"] == "pocketlm" else
                         f" (`{row['attn_implementation']}` attention, attn_pdrop {row['attn_pdrop']})"),
          row["grad_accum"], f"{row['peak_gib']:.2f}", ratio(row, "pocketlm"), ratio(row, "gpt2"),
          f"{row['peak_gib'] / NANOGPT_REFERENCE_GIB:.2f}x", f"{row['static_gib']:.2f}", where(row),
          ", ".join(f"{k} {v:.2f}" for k, v in row.get("peak_breakdown_gib", {}).items() if v >= 0.005) or "n/a",
          *planner(row)] for row in rows.values()])
    tables = [seed_table]
    tp = r["throughput"]
    if tp:
        tables.append(Table(
            ["settings", "median step (s)", "tokens/s", "vs savers off", "CPU share", "largest loss difference"],
            [[f"{row['what']} ({savers_text(row)})", f"{row['median_step_s']:.2f}", f"{row['tokens_per_s']:,.0f}",
              f"{row['vs_no_savers']:.2f}x", f"{row['cpu_share']:.0%}", f"{row['max_abs_loss_diff_vs_no_savers']:.4f}"]
             for row in tp["rows"].values()],
            caption=f"Throughput of the savers: untracked steps of one {tp['batch_size']} x {tp['seq_len']} "
                    f"micro-batch, {tp['warmup_steps']} warm-up then {tp['timed_steps']} timed per setting, taking "
                    "turns, on the same weights, batches and dropout masks (matching losses: the savers change no "
                    "result)."))
    if r["grid"]:
        tables.append(Table(
            ["preset", "micro-batch", "seq len", "checkpointing", "peak (GiB)", "params+grads+AdamW (GiB)",
             "above that (GiB)", "peak in", "planner (GiB)", "planner error"],
            [[g["preset"], g["batch_size"], g["seq_len"], g["checkpointing_mode"], f"{g['peak_gib']:.3f}",
              f"{g['static_gib']:.3f}", f"{g['above_static_gib']:.3f}", g.get("peak_phase", "n/a"),
              f"{g['planner_predicted_gib']:.3f}", f"{g['planner_rel_error']:+.1%}"] for g in r["grid"]],
            caption=f"Planner check: steps of {GRID_GRAD_ACCUM} micro-batches (the second has the first one's "
                    "gradients alive, the micro-step `planner.predict_peak` models), fused loss."))
    notes = []
    phases = rows["pocketlm"].get("phase_peaks_gib")
    if phases:
        notes.append("Largest live total in each phase of the headline step: "
                     + ", ".join(f"{k} {v:.2f} GiB" for k, v in phases.items()) + ".")
    checks = [f"{label}: this tracker {c['peak_bytes']:,} B, PyTorch's `MemTracker` {c['memtracker_peak_bytes']:,} B "
              f"({'identical' if c['memtracker_agrees'] else 'different'})"
              for label, c in r["checks"]["memtracker"].items()]
    rss, single = r["checks"].get("rss") or {}, rows.get("pocketlm_single")
    if "rise_bytes" in rss and single:
        above = (single["peak_bytes"] - single["start_bytes"]) / GIB
        checks.append(f"the peak RSS of a child process rose {rss['rise_bytes'] / GIB:.3f} GiB over one untracked "
                      f"single-micro-batch step; the tracker counts {above:.3f} GiB above that step's start")
    if checks:
        notes.append("Checks of the tracker: " + "; ".join(checks) + ".")
    summary = (f"Peak live tensor memory of one steady-state optimizer step on `{seed['preset']}`, micro-batches of "
               f"{seed['batch_size']} x {seed['seq_len']} tokens, {seed['precision']} compute over fp32 weights, "
               f"AdamW; the headline is the default recipe's {seed['grad_accum']} micro-batches per step. \"vs HF\": "
               "against the Hugging Face row of the same accumulation. GiB = 1024^3 bytes.")
    method = ("a warm-up step builds the AdamW state; the measured step (`train.train_step`) starts with it in "
              "place and no gradients; `benchmarks/memtrack.py` counts every live storage. \"Memory savers off\": no "
              "checkpointing and the plain loss over the full logits. More in `benchmarks/memory.py`'s docstring.")
    return render_section(r, SECTION, summary, tables, notes, method)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seed rows, checks, a small grid, 2 timed throughput steps")
    p.add_argument("--preset", default="gpt2-125m", help="the seed workload's model")
    p.add_argument("--batch-size", type=int, default=4, help="the seed workload's micro-batch")
    p.add_argument("--seq-len", type=int, default=512, help="the seed workload's sequence length")
    p.add_argument("--grid", default=None, help=f"planner-check shapes preset:batch:seq_len,... ({GRID_SHAPES})")
    p.add_argument("--no-grid", action="store_true", help="skip the planner check on other configurations")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face")
    p.add_argument("--no-throughput", action="store_true", help="skip the tokens/s comparison of the memory savers")
    p.add_argument("--throughput-steps", type=int, default=None, help="timed steps per setting (default 6, 2 --quick)")
    p.add_argument("--rss-check", dest="rss_check", action="store_true", default=None,
                   help="peak-RSS check in a child process (default: on for CPU)")
    p.add_argument("--no-rss-check", dest="rss_check", action="store_false")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--method", default="auto", choices=("auto", "tracker", "cuda"),
                   help="auto: CUDA allocator statistics on a GPU, the dispatch tracker elsewhere")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    add_common_options(p, SECTION)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:  # the peak-RSS check's child process
        torch.set_num_threads(args.threads)
        preset, b, t, precision = args.rss_child.split(",")
        print(json.dumps(rss_child(preset, int(b), int(t), precision)))
        return 0
    return script_main(argv, parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
