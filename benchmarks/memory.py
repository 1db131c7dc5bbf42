"""Peak live tensor memory of training steps: pocketlm's trainer against Hugging Face GPT-2,
what pocketlm's memory savers cost in throughput, and the memory planner against measured peaks.

Peak live tensor memory is the largest total size of PyTorch storages alive at once during
one steady-state optimizer step (forward and backward of each micro-batch, clipping, AdamW
update), parameters, gradients, optimizer state and the batch included. On a CPU it is counted
by ``pocketlm.memtrack.PeakMemoryTracker`` (a ``TorchDispatchMode``); on a CUDA device it is
``torch.cuda.max_memory_allocated`` (``--method tracker`` forces the tracker there too).

Measured:

* the seed workload: ``gpt2-125m`` (12 layers, 12 heads, 768 wide, vocab 50257), micro-batches
  of 4 x 512 tokens, AdamW (pocketlm's ``build_optimizer``), bf16 autocast, run through the
  real ``pocketlm.train.train_step`` (gradient clipping included). The headline is the default
  recipe as it trains, ``grad_accum=4`` micro-batches per optimizer step: from the second one
  on, the fp32 gradients of the earlier ones are alive during forward and backward. A step of
  one micro-batch is the secondary row. The same with the memory savers off
  (``checkpointing="none"``, ``full_checkpoint_blocks=0``, ``model.fused_loss=False``), (full
  run) with the fused loss only, and with ``--low-memory`` where ``TrainConfig`` has ``low_memory``;
* Hugging Face ``GPT2LMHeadModel`` on the same workload (``n_positions=512``, same sizes, its
  default attention implementation, ``labels=input_ids`` with its own shift), AdamW with the
  same parameter groups, the same clipping, with 4 micro-batches and with one, with pocketlm's
  dropouts and with stock GPT-2's;
* throughput (``--no-throughput`` skips it): tokens/s of untracked seed-workload steps with the
  defaults, the fused loss only, the savers off (and ``--low-memory``), taking turns step by step
  (the issue's target: the defaults within 15% of the savers-off tokens/s);
* the planner check: ``planner.predict_peak`` beside every measured step whose peak it models
  (a micro-step with gradients alive, fused loss): the seed rows and a grid of ``tiny`` and
  ``gpt2-125m`` x micro-batch x sequence length x checkpointing none/selective/default/full and
  low-memory, each a step of 2 micro-batches (``tiny``'s context widened to 512 where needed);
* checks of the tracker: PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``
  run on the very same step (nested), and (``--rss-check``) the rise of the process's peak
  resident memory (``VmHWM``) over one step in a child process whose malloc returns large
  blocks to the OS at once; RSS also holds what the tracker cannot see (kernel scratch memory).

"Steady state": a warm-up optimizer step on a tiny 1 x 8 micro-batch first builds the AdamW
state (memory does not depend on that batch), then the measured step runs with the state in
place and no gradients (``zero_grad(set_to_none=True)``), as every later step of training does.
Ratios are against the Hugging Face figure of the same accumulation measured here and the
issue's nanoGPT reference (3.61 GiB on this CPU). GiB = 1024**3 bytes. The result is one JSON
object on stdout; ``--update-docs`` rewrites the ``## Memory`` section of ``docs/benchmarks.md``.

    python benchmarks/memory.py --quick                     # seed rows, checks, a small grid: ~5 minutes
    python benchmarks/memory.py --threads 2 --update-docs   # everything: ~8 minutes on 2 idle CPU cores

``measure_training_step(preset_or_config, batch_size, seq_len, low_memory=..., precision=...,
grad_accum=...)`` and ``measure_throughput(preset, batch_size, seq_len)`` are importable for
tests (``sys.path`` must hold ``benchmarks/``, or load the file by path).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import exact_command, hf_dropouts, machine_info, update_docs
from pocketlm import train as train_mod
from pocketlm.batching import MicroBatch
from pocketlm.config import PRESETS, ModelConfig, TrainConfig
from pocketlm.memtrack import GIB, PeakMemoryTracker, measure_peak
from pocketlm.model import GPT, decay_groups

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Memory"
SEED = {"preset": "gpt2-125m", "batch_size": 4, "seq_len": 512, "precision": "bf16"}
NANOGPT_REFERENCE_GIB = 3.61  # the issue author's nanoGPT-style implementation, this CPU
HF_REFERENCE_GIB = 5.97  # the issue author's GPT2LMHeadModel measurement, this CPU
SEED_GRAD_ACCUM = 4  # the default recipe's TrainConfig.grad_accum: the headline is a step of 4 micro-batches
GRID_GRAD_ACCUM = 2  # enough for a micro-step with gradients alive, which is what the planner predicts
# The planner check: (preset, micro-batch, sequence length) x checkpointing mode, each a steady-state
# optimizer step of GRID_GRAD_ACCUM micro-batches. The seed workload itself (selective, and none with
# the fused loss) comes from the seed rows, measured with 4 micro-batches.
GRID_SHAPES = (("tiny", 1, 128), ("tiny", 4, 512), ("tiny", 8, 128),
               ("gpt2-125m", 1, 128), ("gpt2-125m", 4, 256), ("gpt2-125m", 8, 512))
QUICK_GRID_SHAPES = (("tiny", 1, 128), ("tiny", 4, 512), ("tiny", 8, 128), ("gpt2-125m", 1, 128))
# checkpointing mode -> TrainConfig overrides. A mode that comes to the same as an earlier one on a
# preset is skipped there (tiny has 2 blocks: the default's 2 full blocks are full checkpointing).
# "low memory" is measured only where TrainConfig has the field (the planner models it too).
GRID_MODES = {"none": {"checkpointing": "none", "full_checkpoint_blocks": 0},
              "selective": {"checkpointing": "selective", "full_checkpoint_blocks": 0},
              "selective + 2 full blocks (default)": {},
              "full": {"checkpointing": "full"},
              "low memory": {"low_memory": True}}


def effective_checkpointing(preset: str, overrides: dict[str, Any]) -> tuple[str, int, bool]:
    """(mode, fully recomputed blocks, low memory) that ``overrides`` come to on ``preset``'s
    model (``--low-memory`` implies full checkpointing)."""
    defaults = TrainConfig()
    low = bool(overrides.get("low_memory", False))
    mode = "full" if low else overrides.get("checkpointing", defaults.checkpointing)
    n_layer = PRESETS[preset].n_layer
    full = min(overrides.get("full_checkpoint_blocks", defaults.full_checkpoint_blocks), n_layer)
    if mode == "none":
        return "none", 0, low
    if mode == "full" or full == n_layer:
        return "full", n_layer, low
    return mode, full, low
PLANNER_TOLERANCE = 0.10  # the issue: the prediction within 10% of the measured peak
PEAK_TARGET_GIB = 2.5  # the issue: default settings, seed workload
LOW_MEMORY_TARGET_GIB = 1.5  # the issue: --low-memory, seed workload
THROUGHPUT_TOLERANCE = 0.15  # the issue: default throughput within 15% of the savers-off run
WARMUP_SHAPE = (1, 8)  # the warm-up step only has to create the optimizer state


# ---------------------------------------------------------------------------------------------
# Building the workload


def low_memory_support() -> tuple[bool, str]:
    """Whether ``TrainConfig`` has a ``low_memory`` switch (the hook for a one-flag saver mode)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if "low_memory" in names:
        return True, "TrainConfig.low_memory"
    return False, "TrainConfig has no low_memory field"


# The memory savers switched off, as far as this pocketlm has them: TrainConfig fields and GPT
# attributes (only those that exist are applied). The optimizer stays build_optimizer's.
NO_SAVERS_TRAIN = {"checkpointing": "none", "full_checkpoint_blocks": 0}
NO_SAVERS_MODEL = {"fused_loss": False}
# Only the fused loss on (no checkpointing): shows each saver's share of memory and time.
FUSED_ONLY_TRAIN = NO_SAVERS_TRAIN
FUSED_ONLY_MODEL = {"fused_loss": True}


def _train_config(preset_or_config: str | ModelConfig, seq_len: int, batch_size: int, low_memory: bool,
                  precision: str, grad_accum: int, train_overrides: dict[str, Any] | None
                  ) -> tuple[TrainConfig, ModelConfig, str]:
    """A TrainConfig with the default recipe (plus ``train_overrides``); the model's context
    widened to ``seq_len`` if needed. Returns it, the model config and a label for the model."""
    overrides: dict[str, Any] = {}
    if isinstance(preset_or_config, ModelConfig):
        preset, label = "gpt2-125m", "custom"
        overrides = {f.name: getattr(preset_or_config, f.name) for f in dataclasses.fields(ModelConfig)}
    else:
        preset = label = preset_or_config
    base = dataclasses.replace(PRESETS[preset], **overrides)
    if seq_len > base.block_size:
        overrides["block_size"] = seq_len
    kwargs: dict[str, Any] = dict(preset=preset, model=overrides, batch_size=batch_size, grad_accum=grad_accum,
                                  precision=precision, device="cpu")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs.update({k: v for k, v in (train_overrides or {}).items() if k in known})
    if low_memory:
        ok, why = low_memory_support()
        if not ok:
            raise NotImplementedError(f"low_memory requested but {why}")
        kwargs["low_memory"] = True
    cfg = TrainConfig(**kwargs)
    return cfg, cfg.model_config(), label


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """The model as ``pocketlm.train.train`` sets it up (``train.build_model`` if the trainer has
    one; otherwise ``GPT`` plus ``set_checkpointing`` from the config, as ``train()`` does now).
    HOOK: if ``train()`` grows more model set-up for the memory savers, mirror it here."""
    builder = getattr(train_mod, "build_model", None)
    if builder is not None:
        return builder(cfg, device) if len(inspect.signature(builder).parameters) >= 2 else builder(cfg).to(device)
    model = GPT(model_cfg).to(device)
    if hasattr(model, "set_checkpointing") and hasattr(cfg, "checkpointing"):
        model.set_checkpointing(cfg.checkpointing, getattr(cfg, "full_checkpoint_blocks", 0))
    return model


def _train_step_extras(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of ``train_step`` that are also ``TrainConfig`` fields (e.g. a future
    ``low_memory``), taken from ``cfg``: the other hook for the memory savers."""
    fixed = {"lr", "device", "precision", "scaler", "grad_clip"}
    cfg_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    params = inspect.signature(train_mod.train_step).parameters
    return {name: getattr(cfg, name) for name, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in fixed and name in cfg_fields}


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
    return MicroBatch(tokens[:, :-1].clone(), tokens[:, 1:].clone(), None, None, batch_size * seq_len)


def _nbytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Hand count: parameters (tied ones once), gradients, optimizer state. Gradients are the
    parameters' size, or bf16 where the optimizer keeps its own bf16 gradient buffers
    (``--low-memory``'s ``LowMemoryAdamW.grad_buffers``)."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    trained = list({id(q): q for q in params if q.requires_grad}.values())
    p, o = _nbytes(params), _nbytes(state)
    if isinstance(getattr(optimizer, "grad_buffers", None), dict):
        g = sum(2 * q.numel() for q in trained)
    else:
        g = _nbytes(trained)
    return {"params": p, "grads": g, "optimizer_state": o, "total": p + g + o}


def savers_of(cfg: TrainConfig, model: torch.nn.Module) -> dict[str, Any]:
    """The memory savers in effect: the model's own checkpointing (``train.build_model`` may
    override the config's, as ``--low-memory`` does), the loss path, and ``low_memory``."""
    out: dict[str, Any] = {"checkpointing": getattr(model, "checkpointing", getattr(cfg, "checkpointing", None)),
                           "full_checkpoint_blocks": getattr(model, "full_checkpoint_blocks",
                                                             getattr(cfg, "full_checkpoint_blocks", None))}
    if hasattr(model, "fused_loss"):
        out["fused_loss"] = model.fused_loss
    if hasattr(cfg, "low_memory"):
        out["low_memory"] = cfg.low_memory
    return out


def _result(report: Any, static: dict[str, int], wall_s: float) -> dict[str, Any]:
    d = report.to_dict()
    out = {"peak_bytes": d["peak_bytes"], "peak_gib": round(d["peak_bytes"] / GIB, 3),
           "method": d["method"], "start_bytes": d["start_bytes"], "static_bytes": static,
           "static_gib": round(static["total"] / GIB, 3),
           "above_static_gib": round((d["peak_bytes"] - static["total"]) / GIB, 3)}
    if d["method"] == "dispatch-tracker":
        out.update({"peak_phase": d["peak_phase"], "peak_op": d["peak_op"],
                    "peak_autograd_node": d["peak_autograd_node"],
                    "peak_breakdown_gib": {k: round(v / GIB, 3) for k, v in d["peak_breakdown"].items()},
                    "phase_peaks_gib": {k: round(v / GIB, 3) for k, v in d["phase_peaks"].items()},
                    "unregistered_bytes": d["unregistered_bytes"], "ops": d["n_ops"]})
    out["measured_step_s"] = round(wall_s, 1)
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclasses.dataclass
class Workload:
    """A pocketlm model and optimizer after the warm-up step, and the measured step's batches."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    label: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[MicroBatch]
    step: Callable[[], None]
    extras: dict[str, Any]
    model_attrs: dict[str, Any]


def setup_workload(preset_or_config: str | ModelConfig, batch_size: int, seq_len: int, *, low_memory: bool = False,
                   precision: str = "bf16", grad_accum: int = 1, device: torch.device,
                   train_overrides: dict[str, Any] | None = None, model_attrs: dict[str, Any] | None = None,
                   seed: int = 0) -> Workload:
    cfg, model_cfg, label = _train_config(preset_or_config, seq_len, batch_size, low_memory, precision,
                                          grad_accum, train_overrides)
    cfg.device = device.type
    torch.manual_seed(seed)
    model = build_model(cfg, model_cfg, device)
    applied = {k: v for k, v in (model_attrs or {}).items() if hasattr(model, k)}
    for k, v in applied.items():
        setattr(model, k, v)
    model.train()
    optimizer = train_mod.build_optimizer(model, cfg, device)
    extras = _train_step_extras(cfg)

    def run(batches: list[MicroBatch]) -> None:
        train_mod.train_step(model, optimizer, batches, lr=cfg.lr, device=device, precision=precision,
                             scaler=None, grad_clip=cfg.grad_clip, **extras)

    run([random_batch(*WARMUP_SHAPE, model_cfg.vocab_size, seed + 1).to(device)])  # builds the AdamW state
    batches = [random_batch(batch_size, seq_len, model_cfg.vocab_size, seed + 2 + i).to(device)
               for i in range(grad_accum)]
    return Workload(cfg, model_cfg, label, model, optimizer, batches, lambda: run(batches), extras, applied)


def measure_training_step(preset_or_config: str | ModelConfig, batch_size: int, seq_len: int, *,
                          low_memory: bool = False, precision: str = "bf16", grad_accum: int = 1,
                          device: str | torch.device | None = None, method: str = "auto", seed: int = 0,
                          train_overrides: dict[str, Any] | None = None, model_attrs: dict[str, Any] | None = None,
                          cross_check: bool = False) -> dict[str, Any]:
    """Peak live tensor memory of one steady-state pocketlm training step, as a dict.

    ``grad_accum`` micro-batches of ``batch_size`` x ``seq_len`` random tokens go through
    ``pocketlm.train.train_step`` with ``build_optimizer``'s AdamW, on a model set up as
    ``train()`` sets it up, after a warm-up step that creates the optimizer state.
    ``train_overrides`` changes ``TrainConfig`` fields (e.g. ``{"checkpointing": "none"}``) and
    ``model_attrs`` sets model attributes (e.g. ``{"fused_loss": False}``); names this version
    lacks are ignored, and the ones applied are listed in the result. ``low_memory=True`` needs
    ``TrainConfig.low_memory`` (``NotImplementedError`` otherwise). Keys: ``peak_bytes``,
    ``peak_gib``, ``static_bytes`` (params/grads/optimizer state by hand),
    ``peak_breakdown_gib``, ``peak_phase``, ``peak_op``, ``phase_peaks_gib``...
    ``cross_check`` also runs PyTorch's ``MemTracker`` on the same step (tracker method only).
    """
    dev = _resolve_device(device)
    w = setup_workload(preset_or_config, batch_size, seq_len, low_memory=low_memory, precision=precision,
                       grad_accum=grad_accum, device=dev, train_overrides=train_overrides,
                       model_attrs=model_attrs, seed=seed)
    static = static_bytes(w.model, w.optimizer)
    batch_tensors = [t for mb in w.batches for t in (mb.input_ids, mb.targets)]
    gc.collect()
    began = time.perf_counter()
    memtracker = None
    if cross_check:
        report, memtracker = _cross_checked(w.step, w.model, w.optimizer, batch_tensors)
    else:
        report = measure_peak(w.step, device=dev, model=w.model, optimizer=w.optimizer,
                              tensors=batch_tensors, method=method)
    wall = time.perf_counter() - began
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {"model": "pocketlm", "preset": w.label, "batch_size": batch_size, "seq_len": seq_len,
           "block_size": w.model_cfg.block_size, "grad_accum": grad_accum, "low_memory": low_memory,
           "precision": precision, "device": str(dev),
           "n_params": sum(p.numel() for p in w.model.parameters()),
           "savers": savers_of(w.cfg, w.model),
           "train_overrides": {k: v for k, v in (train_overrides or {}).items() if k in known},
           "model_attrs": w.model_attrs, "train_step_extras": sorted(w.extras)}
    out.update(_result(report, static, wall))
    out["dtypes"] = {"params": sorted({str(p.dtype) for p in w.model.parameters()}),
                     "optimizer_state": sorted({str(v.dtype) for s in w.optimizer.state.values() for k, v in s.items()
                                                if isinstance(v, torch.Tensor) and k != "step"})}
    out["gradients_alive"] = grad_accum >= 2  # micro-steps 2.. run with the earlier ones' gradients
    if getattr(w.model, "fused_loss", True):  # the planner models the fused loss
        out.update(planner_prediction(w, batch_size, seq_len, precision, dev))
        if "planner_predicted_bytes" in out and out["gradients_alive"]:  # what the planner predicts
            out["planner_rel_error"] = round(out["planner_predicted_bytes"] / out["peak_bytes"] - 1, 4)
    if memtracker is not None:
        out["memtracker_peak_bytes"] = memtracker
        out["memtracker_agrees"] = memtracker == report.peak_bytes
    return out


def planner_prediction(w: Workload, batch_size: int, seq_len: int, precision: str,
                       device: torch.device) -> dict[str, Any]:
    """``pocketlm.planner.predict_peak`` for the same settings, if this pocketlm has it (its
    model is a micro-step after the first of an accumulation window, gradients allocated)."""
    try:
        from pocketlm.planner import predict_peak
    except ImportError:
        return {}
    try:
        wanted = {"precision": precision, "checkpointing": getattr(w.cfg, "checkpointing", None),
                  "full_blocks": getattr(w.cfg, "full_checkpoint_blocks", None), "device": device.type,
                  "low_memory": getattr(w.cfg, "low_memory", None)}
        accepted = inspect.signature(predict_peak).parameters
        kwargs = {k: v for k, v in wanted.items() if k in accepted and v is not None}
        plan = predict_peak(w.model_cfg, batch_size, seq_len, **kwargs)
        total = plan.total() if callable(plan.total) else plan.total
        return {"planner_predicted_bytes": int(total), "planner_predicted_gib": round(total / GIB, 3)}
    except Exception as exc:  # the planner is someone else's moving target: never fail the benchmark
        return {"planner_error": f"{type(exc).__name__}: {exc}"[:200]}


def _cross_checked(fn: Callable[[], None], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   tensors: list[torch.Tensor]) -> tuple[Any, int | None]:
    """Run ``fn`` under both this project's tracker and PyTorch's MemTracker (nested: both see
    every op); returns our report and MemTracker's peak total (None if it does not run)."""
    tracker = PeakMemoryTracker()
    tracker.track_module(model)
    tracker.track_optimizer(optimizer)
    tracker.track_existing(tensors)
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception:  # pragma: no cover - builds without distributed
        with tracker:
            fn()
        return tracker.report(), None
    mt = MemTracker()
    mt.track_external(model, optimizer, *tensors)
    with mt, tracker:
        fn()
    peak = mt.get_tracker_snapshot("peak")
    total = sum(snap["Total"] for snap in peak.values())
    report = tracker.report()
    tracker.release()
    return report, total


def measure_hf_step(preset: str, batch_size: int, seq_len: int, *, precision: str = "bf16",
                    device: str | torch.device | None = None, method: str = "auto", seed: int = 0,
                    dropouts: str = "pocketlm", grad_accum: int = 1) -> dict[str, Any]:
    """The same workload on Hugging Face ``GPT2LMHeadModel``: AdamW with pocketlm's groups and
    hyperparameters, loss from ``labels=input_ids``, clipping, ``zero_grad(set_to_none=True)``.
    ``dropouts`` picks pocketlm's dropout settings or stock GPT-2's (see ``hf_dropouts``)."""
    import transformers

    from pocketlm.device import autocast
    from pocketlm.hf import hf_config

    dev = _resolve_device(device)
    cfg = TrainConfig(preset=preset, batch_size=batch_size, grad_accum=1, precision=precision, device="cpu")
    model_cfg = cfg.model_config()
    if seq_len > model_cfg.block_size:
        model_cfg = dataclasses.replace(model_cfg, block_size=seq_len)
    torch.manual_seed(seed)
    drop = hf_dropouts(model_cfg, dropouts)
    model = transformers.GPT2LMHeadModel(hf_config(model_cfg, **drop)).to(dev)
    model.train()
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  **({"fused": True} if dev.type == "cuda" else {}))

    def step(micro_batches: list[torch.Tensor]) -> None:
        for input_ids in micro_batches:  # each micro-batch's mean loss, averaged over the window
            with autocast(dev, precision):
                loss = model(input_ids=input_ids, labels=input_ids).loss / len(micro_batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step([random_batch(*WARMUP_SHAPE, model_cfg.vocab_size, seed + 1).input_ids.to(dev)])
    ids = [random_batch(batch_size, seq_len, model_cfg.vocab_size, seed + 2 + i).input_ids.to(dev)
           for i in range(grad_accum)]
    static = static_bytes(model, optimizer)
    gc.collect()
    began = time.perf_counter()
    report = measure_peak(lambda: step(ids), device=dev, model=model, optimizer=optimizer, tensors=ids,
                          method=method)
    out = {"model": "transformers.GPT2LMHeadModel", "preset": preset, "batch_size": batch_size, "seq_len": seq_len,
           "grad_accum": grad_accum,
           "precision": precision, "device": str(dev), "attn_implementation": model.config._attn_implementation,
           "dropouts": dropouts, **drop,
           "transformers": transformers.__version__, "n_params": sum(p.numel() for p in model.parameters())}
    out.update(_result(report, static, time.perf_counter() - began))
    return out


# ---------------------------------------------------------------------------------------------
# Peak resident memory in a child process (an independent, looser check)


def rss_child(preset: str, batch_size: int, seq_len: int, precision: str) -> dict[str, Any]:
    """In this (child) process: set up as ``measure_training_step`` does, run one more step
    (it warms oneDNN's caches), reset the kernel's peak-RSS mark, run the measured step
    untracked, and report how far the peak RSS rose above the RSS before it. Run with
    MALLOC_MMAP_THRESHOLD_ set so that freed blocks leave the RSS at once."""
    w = setup_workload(preset, batch_size, seq_len, precision=precision, device=torch.device("cpu"))
    w.step()
    gc.collect()

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    w.step()
    peak = status("VmHWM")
    return {"rss_before_step": before, "peak_rss": peak, "rise_bytes": peak - before,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "static_bytes": static_bytes(w.model, w.optimizer)}


def rss_check(preset: str, batch_size: int, seq_len: int, precision: str, threads: int | None) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", f"{preset},{batch_size},{seq_len},{precision}"]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


# ---------------------------------------------------------------------------------------------
# Throughput: what the memory savers cost in time (untracked steps)

# name -> (what, TrainConfig overrides, model attributes); "no_savers" is the baseline.
THROUGHPUT_CONFIGS = {
    "default": ("defaults", {}, {}),
    "fused_loss_only": ("fused loss only", FUSED_ONLY_TRAIN, FUSED_ONLY_MODEL),
    "no_savers": ("memory savers off", NO_SAVERS_TRAIN, NO_SAVERS_MODEL),
}


def measure_throughput(preset: str, batch_size: int, seq_len: int, *, precision: str = "bf16",
                       device: str | torch.device | None = None, steps: int = 4, warmup: int = 1,
                       grad_accum: int = 1, seed: int = 0,
                       configs: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] | None = None
                       ) -> dict[str, Any]:
    """Tokens/s of untracked optimizer steps (``train_step``, ``build_optimizer``'s fused AdamW)
    for each of ``configs`` (default ``THROUGHPUT_CONFIGS``), all on the same model initialisation,
    batches and dropout masks. The configurations take turns step by step, the order rotating each
    round, so outside load falls on all alike; ``warmup`` rounds first are not timed. Reports the
    median step time, tokens/s from it, the CPU share (process CPU time over wall time x torch
    threads) and each step's loss, so the settings can be seen to train alike."""
    dev = _resolve_device(device)
    if configs is None:
        configs = dict(THROUGHPUT_CONFIGS)
        if low_memory_support()[0]:
            configs["low_memory"] = ("`--low-memory`", {"low_memory": True}, {})
    workloads = {name: setup_workload(preset, batch_size, seq_len, precision=precision, grad_accum=grad_accum,
                                      device=dev, train_overrides=train, model_attrs=attrs, seed=seed)
                 for name, (_, train, attrs) in configs.items()}
    vocab = next(iter(workloads.values())).model_cfg.vocab_size
    rounds = warmup + steps
    batches = [[random_batch(batch_size, seq_len, vocab, seed + 100 + r * grad_accum + i).to(dev)
                for i in range(grad_accum)] for r in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in workloads}
    cpu: dict[str, list[float]] = {name: [] for name in workloads}
    losses: dict[str, list[float]] = {name: [] for name in workloads}
    names = list(workloads)
    threads = torch.get_num_threads()
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            w = workloads[name]
            torch.manual_seed(seed + 1000 + r)  # the same dropout masks for every configuration
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            c0, t0 = time.process_time(), time.perf_counter()
            loss, _ = train_mod.train_step(w.model, w.optimizer, batches[r], lr=w.cfg.lr, device=dev,
                                           precision=precision, scaler=None, grad_clip=w.cfg.grad_clip, **w.extras)
            loss = float(loss)  # waits for the step on a GPU
            wall, used = time.perf_counter() - t0, time.process_time() - c0
            losses[name].append(loss)
            if r >= warmup:
                times[name].append(wall)
                cpu[name].append(used)
    tokens = batch_size * seq_len * grad_accum
    rows: dict[str, Any] = {}
    for name, (what, _, _) in configs.items():
        w = workloads[name]
        med = statistics.median(times[name])
        rows[name] = {"what": what, "savers": savers_of(w.cfg, w.model),
                      "step_s": [round(t, 3) for t in times[name]], "median_step_s": round(med, 3),
                      "tokens_per_s": round(tokens / med, 1),
                      "cpu_share": round(sum(cpu[name]) / (sum(times[name]) * threads), 3),
                      "losses": [round(x, 5) for x in losses[name]]}
    base = rows.get("no_savers")
    if base:
        for name, row in rows.items():
            row["vs_no_savers"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            row["max_abs_loss_diff_vs_no_savers"] = round(max(abs(a - b) for a, b in
                                                              zip(row["losses"], base["losses"])), 5)
    out: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum,
                           "precision": precision, "device": str(dev), "torch_threads": threads,
                           "warmup_steps": warmup, "timed_steps": steps, "tokens_per_step": tokens, "rows": rows}
    if base and "default" in rows:
        ratio = rows["default"]["vs_no_savers"]
        out["default_vs_no_savers"] = ratio
        out["target_within_15pct"] = ratio >= 1 - THROUGHPUT_TOLERANCE
    return out


# ---------------------------------------------------------------------------------------------
# The docs section

# Seed-workload rows: name -> (what, accumulated micro-batches or None for the default).
POCKETLM_ROWS = ("pocketlm", "pocketlm_low_memory", "pocketlm_no_checkpointing", "pocketlm_no_savers",
                 "pocketlm_single", "pocketlm_low_memory_single", "pocketlm_no_savers_single")
HF_ROWS = ("hf_accum", "hf_gpt2_dropouts_accum", "hf", "hf_gpt2_dropouts")
# pocketlm and HF rows in the order of the table: accumulated steps first (the headline), then single ones
TABLE_ROWS = ("pocketlm", "pocketlm_low_memory", "pocketlm_no_checkpointing", "pocketlm_no_savers", "hf_accum",
              "hf_gpt2_dropouts_accum", "pocketlm_single", "pocketlm_low_memory_single", "pocketlm_no_savers_single",
              "hf", "hf_gpt2_dropouts")


def _savers_text(row: dict[str, Any]) -> str:
    sv = row.get("savers") or {}
    parts = []
    if "checkpointing" in sv:
        ck = sv["checkpointing"]
        if ck == "selective" and sv.get("full_checkpoint_blocks"):
            ck += f" + {sv['full_checkpoint_blocks']} full blocks"
        parts.append(f"checkpointing {ck}")
    if "fused_loss" in sv:
        parts.append("chunked fused loss" if sv["fused_loss"] else "plain loss with full logits")
    if sv.get("low_memory"):
        parts.append("bf16 gradients and AdamW moments")
    return ", ".join(parts)


def _row_name(name: str, row: dict[str, Any]) -> str:
    what = {"pocketlm": "**pocketlm `train_step`, defaults**", "pocketlm_single": "pocketlm `train_step`, defaults",
            "pocketlm_low_memory": "pocketlm, `--low-memory`",
            "pocketlm_low_memory_single": "pocketlm, `--low-memory`",
            "pocketlm_no_checkpointing": "pocketlm, fused loss only",
            "pocketlm_no_savers": "pocketlm, memory savers off",
            "pocketlm_no_savers_single": "pocketlm, memory savers off"}[name]
    savers = _savers_text(row)
    return f"{what} ({savers})" if savers else what


def _hf_name(row: dict[str, Any]) -> str:
    what = "pocketlm's dropouts" if row.get("dropouts") == "pocketlm" else "stock GPT-2 dropouts"
    return (f"Hugging Face `GPT2LMHeadModel`, {what} (`{row.get('attn_implementation', '?')}` attention, "
            f"attn_pdrop {row.get('attn_pdrop', '?')})")


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _breakdown_text(row: dict[str, Any]) -> str:
    b = row.get("peak_breakdown_gib")
    if not b:
        return "n/a"
    return ", ".join(f"{k} {v:.2f}" for k, v in b.items() if v >= 0.005)


def _where(row: dict[str, Any]) -> str:
    where = row.get("peak_phase") or "n/a"
    if row.get("peak_op"):
        where += (f" (`{row['peak_op']}`" + (f" in `{row['peak_autograd_node']}`" if row.get("peak_autograd_node")
                                              else "") + ")")
    return where


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def hf_for(results: dict[str, Any], row: dict[str, Any], dropouts: str) -> dict[str, Any]:
    """The Hugging Face row with the given dropouts and the same accumulation as ``row``."""
    accum = (row.get("grad_accum") or 1) >= 2
    name = ("hf" if dropouts == "pocketlm" else "hf_gpt2_dropouts") + ("_accum" if accum else "")
    return results.get(name) or {}


def planner_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured pocketlm row whose planner error counts: gradients alive, fused loss."""
    rows = [result["results"].get(n) or {} for n in POCKETLM_ROWS] + list(result.get("grid", []))
    return [r for r in rows if "planner_rel_error" in r]


def planner_summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = planner_rows(result)
    if not rows:
        return {}
    errs = [r["planner_rel_error"] for r in rows]
    large = [r for r in rows if r.get("preset") == "gpt2-125m"]
    return {"configurations": len(rows), "within_10pct": sum(abs(e) <= PLANNER_TOLERANCE for e in errs),
            "gpt2_125m_configurations": len(large),
            "gpt2_125m_within_10pct": sum(abs(r["planner_rel_error"]) <= PLANNER_TOLERANCE for r in large),
            "max_abs_rel_error": round(max(abs(e) for e in errs), 4),
            "min_rel_error": round(min(errs), 4), "max_rel_error": round(max(errs), 4)}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    r = result["results"]
    out: dict[str, Any] = {}
    head = r.get("pocketlm") or {}
    if "peak_bytes" in head:
        fp32 = head.get("dtypes", {}).get("params") == ["torch.float32"] and \
            head.get("dtypes", {}).get("optimizer_state") == ["torch.float32"]
        out["default_peak_gib"] = head["peak_gib"]
        out["default_peak_at_most_2_5_gib"] = head["peak_bytes"] <= PEAK_TARGET_GIB * GIB
        out["fp32_weights_and_adamw_state"] = fp32
    single = r.get("pocketlm_single") or {}
    if "peak_bytes" in single:
        out["default_single_micro_batch_peak_gib"] = single["peak_gib"]
    tp = result.get("throughput") or {}
    if "default_vs_no_savers" in tp:
        out["default_throughput_vs_no_savers"] = tp["default_vs_no_savers"]
        out["throughput_within_15pct"] = tp["target_within_15pct"]
    low = r.get("pocketlm_low_memory") or {}
    out["low_memory_peak_at_most_1_5_gib"] = (low["peak_bytes"] <= LOW_MEMORY_TARGET_GIB * GIB
                                              if "peak_bytes" in low else "not implemented")
    ps = planner_summary(result)
    if ps:
        out["planner_within_10pct"] = f"{ps['within_10pct']}/{ps['configurations']}"
        out["planner_within_10pct_gpt2_125m"] = f"{ps['gpt2_125m_within_10pct']}/{ps['gpt2_125m_configurations']}"
    return out


def _dtypes_text(row: dict[str, Any], what: str) -> str:
    short = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    return "/".join(short.get(d, d) for d in row.get("dtypes", {}).get(what, [])) or "?"


def _held(ok: Any) -> str:
    return "**held**" if ok is True else "**not met**"


def docs_section(result: dict[str, Any]) -> str:
    m, seed, r = result["machine"], result["seed_workload"], result["results"]
    head, single = r["pocketlm"], r.get("pocketlm_single") or {}
    ga = head.get("grad_accum", 1)
    tg = result.get("targets") or targets(result)
    lines = [SECTION, "",
             "Peak live tensor memory of one steady-state optimizer step (forward and backward of every "
             "micro-batch, gradient clipping, AdamW update): the largest total size of PyTorch storages alive at "
             "once, parameters, gradients, optimizer state and the batch included. Seed workload: "
             f"`{seed['preset']}` ({head['n_params']:,} parameters), micro-batches of {seed['batch_size']} x "
             f"{seed['seq_len']} tokens, AdamW (`build_optimizer`: fused, fp32 state), {seed['precision']} "
             "autocast over fp32 weights. The headline is the default recipe as it trains: "
             f"`grad_accum={ga}` micro-batches per optimizer step, so from the second micro-batch on the fp32 "
             "gradients of the earlier ones are alive during forward and backward. A step of one micro-batch, "
             "whose gradients only appear during its backward, is the secondary figure. Counted by "
             "`pocketlm.memtrack.PeakMemoryTracker` on the CPU (`torch.cuda.max_memory_allocated` on a GPU). "
             "GiB = 1024^3 bytes.", "",
             f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} ({m['torch_threads']} "
             f"thread(s)), transformers {m['transformers']}, Python {m['python']}; device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + ".",
             f"- Date: {result['date']}.",
             f"- Command: `{result['command']}` ({result['runtime_s']:.0f} s in all).", ""]

    # targets first
    tp = result.get("throughput") or {}
    ps = planner_summary(result)
    exact = [n for n in ("default", "fused_loss_only") if "max_abs_loss_diff_vs_no_savers" in tp.get("rows", {}).get(n, {})]
    bullets = []
    if "default_peak_gib" in tg:
        bullets.append(
            f"- Default settings peak at most {PEAK_TARGET_GIB} GiB on the seed workload, fp32 master weights and "
            f"fp32 AdamW state: {_held(tg['default_peak_at_most_2_5_gib'] and tg['fp32_weights_and_adamw_state'])}, "
            f"{head['peak_gib']:.2f} GiB with {ga} micro-batches accumulated (the headline)"
            + (f", {single['peak_gib']:.2f} GiB for a single micro-batch" if "peak_gib" in single else "")
            + ". Weights " + ("and AdamW moments are fp32 (checked on the tensors)" if tg["fp32_weights_and_adamw_state"]
                              else f"/state dtypes: {head.get('dtypes')}")
            + "; the savers (activation checkpointing, the chunked fused loss) recompute or reorder exact "
            "computations and change no hyperparameter: the timed steps below give the same losses as with the "
            "savers off" + (f" to within {max(tp['rows'][n]['max_abs_loss_diff_vs_no_savers'] for n in exact):.4f}"
                            if exact else "") + ".")
    if "default_vs_no_savers" in tp:
        bullets.append(f"- Throughput within {THROUGHPUT_TOLERANCE:.0%} of the same run with the memory savers off: "
                       f"{_held(tp['target_within_15pct'])}, the defaults run at "
                       f"{tp['default_vs_no_savers']:.2f}x the savers-off tokens/s (at least "
                       f"{1 - THROUGHPUT_TOLERANCE:.2f}x needed).")
    low, low1 = r.get("pocketlm_low_memory") or {}, r.get("pocketlm_low_memory_single") or {}
    if "peak_bytes" in low:
        lt = (tp.get("rows") or {}).get("low_memory", {})
        bullets.append(f"- `--low-memory` at most {LOW_MEMORY_TARGET_GIB} GiB on the seed workload: "
                       f"{_held(low['peak_bytes'] <= LOW_MEMORY_TARGET_GIB * GIB)}, {low['peak_gib']:.2f} GiB with "
                       f"{low.get('grad_accum', 1)} micro-batches accumulated"
                       + (f", {low1['peak_gib']:.2f} GiB for a single micro-batch" if "peak_gib" in low1 else "")
                       + f" ({_savers_text(low)}; weights {_dtypes_text(low, 'params')}, "
                       f"AdamW moments {_dtypes_text(low, 'optimizer_state')})"
                       + (f"; it runs at {lt['vs_no_savers']:.2f}x the savers-off tokens/s" if "vs_no_savers" in lt
                          else "")
                       + ". It trades precision of gradients and moments for memory; its effect on training "
                       "quality is measured by benchmarks/low_memory_quality.py (section Low-memory quality).")
    elif "error" in low:
        bullets.append(f"- `--low-memory` (target: at most {LOW_MEMORY_TARGET_GIB} GiB on the seed workload): "
                       f"**failed to run** ({low['error']}).")
    else:
        bullets.append(f"- `--low-memory` (target: at most {LOW_MEMORY_TARGET_GIB} GiB on the seed workload) is "
                       f"**not implemented yet** ({low.get('reason') or low.get('error') or 'n/a'}): no row, "
                       "nothing measured.")
    if ps:
        verdict = (_held(ps["within_10pct"] == ps["configurations"]) if ps["configurations"] >= 6
                   else "too few configurations to judge (at least 6 needed)")
        bullets.append(f"- Planner (`planner.predict_peak`) within {PLANNER_TOLERANCE:.0%} of the measured peak: "
                       f"{verdict} on "
                       f"{ps['within_10pct']} of {ps['configurations']} configurations measured with gradients "
                       f"alive ({ps['gpt2_125m_within_10pct']} of {ps['gpt2_125m_configurations']} on gpt2-125m); "
                       f"errors from {_pct(ps['min_rel_error'])} to {_pct(ps['max_rel_error'])}.")
    lines += ["Targets from the issue:", ""] + bullets + [""]

    lines += ["| workload | micro-batches per step | peak (GiB) | vs HF, same dropouts | vs HF, GPT-2 dropouts | "
              "vs nanoGPT 3.61 GiB | params+grads+AdamW state (GiB) | peak reached in | live at the peak (GiB) | "
              "planner (GiB) | planner error |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]

    def ratio(row: dict[str, Any], ref: dict[str, Any]) -> str:
        return f"{row['peak_bytes'] / ref['peak_bytes']:.2f}x" if "peak_bytes" in ref else "n/a"

    for name in TABLE_ROWS:
        row = r.get(name)
        if not row or name.startswith("pocketlm_low_memory") and "peak_bytes" not in row:
            continue
        label = _hf_name(row) if name.startswith("hf") else _row_name(name, row)
        if "peak_bytes" not in row:
            lines.append(f"| {label} | | failed: {row.get('error') or row.get('reason')} | | | | | | | | |")
            continue
        if "planner_rel_error" in row:
            plan = f"{row['planner_predicted_gib']:.2f} | {_pct(row['planner_rel_error'])}"
        elif "planner_predicted_gib" in row:
            plan = f"({row['planner_predicted_gib']:.2f}) | n/a, no gradients alive"
        elif name.startswith("pocketlm"):
            plan = "n/a | n/a, plain loss not modelled"
        else:
            plan = " | "
        peak = f"**{row['peak_gib']:.2f}**" if name == "pocketlm" else f"{row['peak_gib']:.2f}"
        lines.append(f"| {label} | {row.get('grad_accum', 1)} | {peak} | {ratio(row, hf_for(r, row, 'pocketlm'))} | "
                     f"{ratio(row, hf_for(r, row, 'gpt2'))} | {row['peak_gib'] / NANOGPT_REFERENCE_GIB:.2f}x | "
                     f"{row['static_gib']:.2f} | {_where(row)} | {_breakdown_text(row)} | {plan} |")
    stock = [f"{r[n]['peak_gib']:.2f} GiB with {r[n].get('grad_accum', 1)} micro-batch"
             + ("es" if r[n].get("grad_accum", 1) > 1 else "") + " per step"
             for n in ("hf_gpt2_dropouts", "hf_gpt2_dropouts_accum") if "peak_gib" in (r.get(n) or {})]
    lines += ["", "The \"vs HF\" columns compare with the Hugging Face row of the same accumulation. Reference "
              f"figures from the issue, same CPU: nanoGPT-style {NANOGPT_REFERENCE_GIB} GiB, Hugging Face "
              f"`GPT2LMHeadModel` {HF_REFERENCE_GIB} GiB. The issue does not say whether its figures include "
              "gradient accumulation"
              + (f"; its Hugging Face figure lies near this run's stock-dropouts rows ({', '.join(stock)})"
                 if stock else "")
              + ". The planner's figure is for a micro-step after the first of an accumulation window; on a "
              "single-micro-batch row it is shown in brackets and not scored."]
    phases = head.get("phase_peaks_gib")
    if phases:
        order = ["forward", "backward", "other", "optimizer"]
        names = {"other": "between backward and the update (clipping)", "optimizer": "AdamW update"}
        lines += ["", "pocketlm's largest live total in each phase of the headline step: "
                  + ", ".join(f"{names.get(k, k)} {phases[k]:.2f} GiB"
                              for k in sorted(phases, key=lambda k: order.index(k) if k in order else 9)) + "."]
        if head.get("peak_phase") == "forward" and head.get("peak_op") == "aten._to_copy.default":
            lines[-1] += ((" With accumulation the peak moves from backward to forward:"
                           if single.get("peak_phase") == "backward" else " The peak is in forward:")
                          + " in this version it is the "
                          "fused loss (`losses.py`) of a later micro-batch casting one chunk's logit gradients to "
                          "bf16, while every activation saved for backward, the loss's bf16 output-weight copy and "
                          "gradient buffers, and the earlier micro-batches' fp32 gradients are alive.")

    if tp.get("rows"):
        rows = tp["rows"]
        lines += ["", f"Throughput, same run: untracked optimizer steps of {tp['batch_size']} x {tp['seq_len']} tokens "
                  f"({tp['grad_accum']} micro-batch per step), {tp['precision']}, {tp['torch_threads']} torch "
                  f"thread(s); {tp['warmup_steps']} warm-up step then {tp['timed_steps']} timed steps per setting, the "
                  "settings taking turns step by step (order rotating), all from the same initialisation on the "
                  "same batches and dropout masks.", "",
                  "| settings | median step (s) | tokens/s | vs savers off | CPU share | steps (s) | "
                  "largest loss difference vs savers off |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        for name, row in rows.items():
            label = f"{row['what']} ({_savers_text(row)})"
            lines.append(f"| {label} | {row['median_step_s']:.2f} | {row['tokens_per_s']:,.0f} | "
                         f"{row.get('vs_no_savers', float('nan')):.2f}x | {row['cpu_share']:.0%} | "
                         f"{', '.join(f'{t:.2f}' for t in row['step_s'])} | "
                         f"{row.get('max_abs_loss_diff_vs_no_savers', float('nan')):.4f} |")
        d, f = rows.get("default", {}), rows.get("fused_loss_only", {})
        if "vs_no_savers" in d and "vs_no_savers" in f:
            ck = d["tokens_per_s"] / f["tokens_per_s"]
            spread = max((max(x["step_s"]) - min(x["step_s"])) / x["median_step_s"] for x in (d, f))
            lines += ["", f"Each saver's share: the chunked fused loss alone runs at {f['vs_no_savers']:.2f}x the "
                      "savers-off tokens/s (the plain loss materialises the bf16 logits of every token, their "
                      "fp32 copy and the log-softmax); adding the default checkpointing (selective + 2 full "
                      f"blocks) changes tokens/s by {ck:.2f}x"
                      + (f", inside the {spread:.0%} spread of single step times, so not measurable here"
                         if abs(ck - 1) <= spread else "") + "."]
        load = result.get("load_average") or {}
        lines += ["", "Tokens/s is the step's tokens over the median step time. CPU share is the process's CPU time "
                  "over wall time x torch threads while timed: with more than one thread it is also below 100% "
                  "wherever an operator or Python runs on one thread only, so it bounds rather than measures "
                  "interference from other work"
                  + (f"; the 1-minute load average was {load['start']:.1f} before the run (this run's own threads "
                     f"raise it to about {tp['torch_threads']} while it works)" if "start" in load else "")
                  + ". Losses are each step's mean token NLL (random tokens, so about ln 50257 = 10.8); the "
                  "settings take the same steps from the same weights, so matching losses show that the savers "
                  "leave the training itself unchanged."]

    checks = result.get("checks", {})
    notes = []
    for name, row in checks.get("memtracker", {}).items():
        if row.get("memtracker_peak_bytes") is not None:
            notes.append(f"{name}: this tracker {row['peak_bytes']:,} B, PyTorch's `MemTracker` "
                         f"{row['memtracker_peak_bytes']:,} B ({'identical' if row['memtracker_agrees'] else 'different'})")
    rss = checks.get("rss")
    if rss and "rise_bytes" in rss and "peak_bytes" in single:
        notes.append(f"the peak RSS of a separate process rose {rss['rise_bytes'] / GIB:.3f} GiB during one untracked "
                     "single-micro-batch step of the seed workload, against the tracker's "
                     f"{(single['peak_bytes'] - single['start_bytes']) / GIB:.3f} GiB above that step's starting state "
                     "(RSS also holds kernel scratch memory and allocator slack the tracker does not count)")
    if notes:
        lines += ["", "Checks of the tracker: " + "; ".join(notes) + "."]

    grid = result.get("grid", [])
    if grid:
        lines += ["", f"Planner check on other configurations: pocketlm `train_step`, steady-state optimizer steps of "
                  f"{GRID_GRAD_ACCUM} micro-batches (the second runs with the first one's gradients alive, the "
                  f"micro-step the planner predicts), {seed['precision']} autocast, fused loss; `tiny`'s context "
                  "widened to 512 where the sequence needs it. \"selective\" keeps matmul and attention outputs in "
                  "every block; the default also recomputes the first 2 blocks fully, which on `tiny` (2 blocks) "
                  "is full checkpointing, so one `tiny` row stands for both. The seed-workload rows above with "
                  "gradients alive count too, so the check covers "
                  + (f"{ps['configurations']} configurations, {ps['gpt2_125m_configurations']} of them gpt2-125m"
                     if ps else "them") + ".", "",
                  "| preset | micro-batch | seq len | checkpointing | peak (GiB) | params+grads+AdamW (GiB) | "
                  "above that (GiB) | peak in | planner (GiB) | planner error |",
                  "|---|---:|---:|---|---:|---:|---:|---|---:|---:|"]
        for row in grid:
            ck = row.get("checkpointing_mode", "?")
            if "peak_bytes" not in row:
                lines.append(f"| {row['preset']} | {row['batch_size']} | {row['seq_len']} | {ck} | "
                             f"error: {row.get('error')} | | | | | |")
                continue
            plan = (f"{row['planner_predicted_gib']:.3f} | {_pct(row['planner_rel_error'])}"
                    if "planner_rel_error" in row else "n/a | n/a")
            lines.append(f"| {row['preset']} | {row['batch_size']} | {row['seq_len']} | {ck} | {row['peak_gib']:.3f} | "
                         f"{row['static_gib']:.3f} | {row['above_static_gib']:.3f} | {row.get('peak_phase', 'n/a')} | "
                         f"{plan} |")
    lines += ["", "Method: a warm-up optimizer step on a 1 x 8 micro-batch builds the AdamW state, then the measured "
              "step runs through the real `pocketlm.train.train_step` with the state in place and no gradients, as "
              "every later training step begins. The tracker registers parameters, optimizer state and the batch "
              "before the step and counts every storage an operator returns until it is freed; it cannot see "
              "scratch memory a kernel frees before it returns. \"Memory savers off\" is `checkpointing=\"none\"`, "
              "`full_checkpoint_blocks=0` and `model.fused_loss=False` (the full logits are materialised); \"fused "
              "loss only\" keeps the fused loss and turns checkpointing off. Model and optimizer come from "
              "`pocketlm.train` as `train()` sets them up (`build_model` where it exists, `build_optimizer`), so "
              "`--low-memory` rows (`TrainConfig.low_memory=True`) get full checkpointing and the optimizer's bf16 "
              "gradient buffers, which the tracker counts under the phase that creates them (backward), not as "
              "grads. Hugging Face runs with AdamW over the same parameter groups, `labels=input_ids` "
              "(its own shift), the mean loss of each micro-batch divided by the number of micro-batches, the same "
              "clipping and `zero_grad(set_to_none=True)`. Each memory figure is one step on random tokens: it does "
              "not depend on the data or on the machine's load; the throughput figures do."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the seed-workload rows, the checks, a small planner grid and 2 timed throughput steps")
    p.add_argument("--no-grid", action="store_true", help="skip the planner check on other configurations")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face")
    p.add_argument("--no-throughput", action="store_true", help="skip the tokens/s comparison of the memory savers")
    p.add_argument("--throughput-steps", type=int, default=None,
                   help="timed optimizer steps per setting (default 6, 2 with --quick)")
    p.add_argument("--rss-check", dest="rss_check", action="store_true", default=None,
                   help="peak-RSS check in a child process (default: on for CPU)")
    p.add_argument("--no-rss-check", dest="rss_check", action="store_false")
    p.add_argument("--precision", default=SEED["precision"], choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--method", default="auto", choices=("auto", "tracker", "cuda"),
                   help="auto: CUDA allocator statistics on a GPU, the dispatch tracker elsewhere")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the '{SECTION}' section of docs/benchmarks.md")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _safe(fn: Callable[[], dict[str, Any]], **ident: Any) -> dict[str, Any]:
    try:
        return fn()
    except NotImplementedError as exc:
        return {**ident, "reason": str(exc)}
    except Exception as exc:  # one failed configuration must not lose the others
        return {**ident, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers worth a glance, for the JSON's top."""
    r, tp = result["results"], result.get("throughput") or {}
    out = {name: r[name]["peak_gib"] for name in TABLE_ROWS if "peak_gib" in (r.get(name) or {})}
    for name in ("default", "fused_loss_only", "no_savers"):
        if name in tp.get("rows", {}):
            out[f"tokens_per_s_{name}"] = tp["rows"][name]["tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        preset, b, t, precision = args.rss_child.split(",")
        print(json.dumps(rss_child(preset, int(b), int(t), precision)))
        return 0
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    dev = _resolve_device(args.device)
    say = lambda msg: print(f"[memory {time.perf_counter() - began:5.0f}s] {msg}", file=sys.stderr, flush=True)
    seed = dict(SEED, precision=args.precision)
    shape = (seed["preset"], seed["batch_size"], seed["seq_len"])
    common = dict(precision=args.precision, device=dev, method=args.method)
    results: dict[str, Any] = {}
    checks: dict[str, Any] = {"memtracker": {}}
    cross = dev.type == "cpu" and args.method != "cuda"

    say(f"pocketlm, seed workload, defaults, {SEED_GRAD_ACCUM} micro-batches accumulated")
    results["pocketlm"] = measure_training_step(*shape, grad_accum=SEED_GRAD_ACCUM, **common)
    ok, why = low_memory_support()
    if ok:
        say("pocketlm, seed workload, low_memory=True")
        results["pocketlm_low_memory"] = _safe(lambda: measure_training_step(
            *shape, low_memory=True, grad_accum=SEED_GRAD_ACCUM, **common))
        say("pocketlm, seed workload, low_memory=True, one micro-batch")
        results["pocketlm_low_memory_single"] = _safe(lambda: measure_training_step(*shape, low_memory=True, **common))
    else:
        results["pocketlm_low_memory"] = {"reason": why}
    if not args.quick:
        say("pocketlm, seed workload, fused loss only (checkpointing off), accumulated")
        results["pocketlm_no_checkpointing"] = _safe(lambda: measure_training_step(
            *shape, grad_accum=SEED_GRAD_ACCUM, train_overrides=FUSED_ONLY_TRAIN, model_attrs=FUSED_ONLY_MODEL,
            **common))
    say("pocketlm, seed workload, memory savers off, accumulated")
    results["pocketlm_no_savers"] = _safe(lambda: measure_training_step(
        *shape, grad_accum=SEED_GRAD_ACCUM, train_overrides=NO_SAVERS_TRAIN, model_attrs=NO_SAVERS_MODEL, **common))
    # PyTorch's MemTracker refuses a module called twice in one region, so it checks one-micro-batch steps
    say("pocketlm, seed workload, defaults, one micro-batch" + (" (with PyTorch's MemTracker alongside)"
                                                                 if cross else ""))
    results["pocketlm_single"] = _safe(lambda: measure_training_step(*shape, cross_check=cross, **common))
    if cross:
        checks["memtracker"][f"{shape[0]} {shape[1]}x{shape[2]}, one micro-batch"] = {
            k: results["pocketlm_single"].get(k) for k in ("peak_bytes", "memtracker_peak_bytes", "memtracker_agrees")}
    say("pocketlm, seed workload, memory savers off, one micro-batch")
    results["pocketlm_no_savers_single"] = _safe(lambda: measure_training_step(
        *shape, train_overrides=NO_SAVERS_TRAIN, model_attrs=NO_SAVERS_MODEL, **common))
    if not args.no_hf:
        for name, dropouts, accum in (("hf_accum", "pocketlm", SEED_GRAD_ACCUM),
                                      ("hf_gpt2_dropouts_accum", "gpt2", SEED_GRAD_ACCUM),
                                      ("hf", "pocketlm", 1), ("hf_gpt2_dropouts", "gpt2", 1)):
            say(f"Hugging Face GPT2LMHeadModel, seed workload, {dropouts} dropouts, {accum} micro-batch"
                + ("es" if accum > 1 else ""))
            results[name] = _safe(lambda dropouts=dropouts, accum=accum: measure_hf_step(
                *shape, dropouts=dropouts, grad_accum=accum, **common))
    if cross:
        say("tiny 4x128 with MemTracker alongside")
        row = measure_training_step("tiny", 4, 128, cross_check=True, **common)
        checks["memtracker"]["tiny 4x128, one micro-batch"] = {
            k: row.get(k) for k in ("peak_bytes", "memtracker_peak_bytes", "memtracker_agrees")}
    if args.rss_check is None:
        args.rss_check = dev.type == "cpu" and sys.platform.startswith("linux")
    if args.rss_check:
        say("peak-RSS check in a child process")
        checks["rss"] = rss_check(seed["preset"], seed["batch_size"], seed["seq_len"], args.precision, args.threads)

    throughput: dict[str, Any] = {}
    if not args.no_throughput:
        steps = args.throughput_steps or (2 if args.quick else 6)
        say(f"throughput: defaults, fused loss only, savers off; 1 warm-up + {steps} timed steps each, interleaved")
        throughput = _safe(lambda: measure_throughput(*shape, precision=args.precision, device=dev, steps=steps))

    grid: list[dict[str, Any]] = []
    if not args.no_grid:
        shapes = QUICK_GRID_SHAPES if args.quick else GRID_SHAPES
        for preset, b, t in shapes:
            seen: set[tuple[str, int]] = set()
            for mode, overrides in GRID_MODES.items():
                if "low_memory" in overrides and not low_memory_support()[0]:
                    continue
                key = effective_checkpointing(preset, overrides)
                if key in seen:
                    continue  # the same settings as a mode already measured on this preset
                seen.add(key)
                if key[0] == "full" and mode != "full" and not key[2]:  # tiny: the default's 2 full blocks are all
                    mode = f"full (= the default on {key[1]} blocks)"
                say(f"planner check: {preset} {b}x{t}, checkpointing {mode}, {GRID_GRAD_ACCUM} micro-batches")
                row = _safe(lambda preset=preset, b=b, t=t, overrides=overrides: measure_training_step(
                    preset, b, t, grad_accum=GRID_GRAD_ACCUM, train_overrides=overrides, **common),
                    preset=preset, batch_size=b, seq_len=t)
                row["checkpointing_mode"] = mode
                grid.append(row)

    ratios: dict[str, Any] = {}
    for name in HF_ROWS:
        row = results.get(name) or {}
        if "peak_bytes" in row:
            ratios[f"{name}_vs_issue_hf_reference"] = round(row["peak_gib"] / HF_REFERENCE_GIB, 3)
    for name in POCKETLM_ROWS:
        row = results.get(name) or {}
        if "peak_bytes" not in row:
            continue
        ratios[f"{name}_vs_nanogpt_reference"] = round(row["peak_gib"] / NANOGPT_REFERENCE_GIB, 3)
        for dropouts, label in (("pocketlm", "hf"), ("gpt2", "hf_gpt2_dropouts")):
            ref = hf_for(results, row, dropouts)
            if "peak_bytes" in ref:  # the Hugging Face row of the same accumulation
                ratios[f"{name}_vs_{label}"] = round(row["peak_bytes"] / ref["peak_bytes"], 3)

    result = {
        "benchmark": "memory",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": exact_command(),
        "machine": machine_info(dev),
        "seed_workload": dict(seed, grad_accum=SEED_GRAD_ACCUM),
        "reference_gib": {"nanogpt": NANOGPT_REFERENCE_GIB, "hf": HF_REFERENCE_GIB},
        "results": results,
        "ratios": ratios,
        "throughput": throughput,
        "checks": checks,
        "grid": grid,
        "quick": args.quick,
    }
    result["planner"] = planner_summary(result)
    result["targets"] = targets(result)
    result["headline_gib"] = _headline(result)
    result["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["runtime_s"] = round(time.perf_counter() - began, 1)
    if args.update_docs:
        update_docs(docs_section(result), SECTION)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
