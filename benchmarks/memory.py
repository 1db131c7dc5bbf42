"""Peak live tensor memory of one training step: pocketlm's trainer against Hugging Face GPT-2.

Peak live tensor memory is the largest total size of PyTorch storages alive at once during
one steady-state optimizer step (forward, backward, AdamW update), parameters, gradients,
optimizer state and the batch included. On a CPU it is counted by
``pocketlm.memtrack.PeakMemoryTracker`` (a ``TorchDispatchMode``); on a CUDA device it is
``torch.cuda.max_memory_allocated`` (``--method tracker`` forces the tracker there too).

Measured:

* the seed workload: ``gpt2-125m`` (12 layers, 12 heads, 768 wide, vocab 50257), one
  micro-batch of 4 x 512 tokens, AdamW (pocketlm's ``build_optimizer``), bf16 autocast, run
  through the real ``pocketlm.train.train_step`` (gradient clipping included); once more with
  ``low_memory=True`` when ``TrainConfig`` has that field, and (full run) with two micro-batches
  of gradient accumulation, which is what the default recipe (``grad_accum=4``) peaks at;
* Hugging Face ``GPT2LMHeadModel`` on the same workload (``n_positions=512``, same sizes and
  dropouts, its default attention implementation, ``labels=input_ids`` with its own shift),
  AdamW with the same parameter groups, the same clipping;
* a grid of other configurations: presets ``tiny`` and ``gpt2-125m`` x micro-batch {1, 4, 8}
  x sequence length {128, 512} (``tiny``'s context is widened to 512 where needed);
* checks of the tracker: PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``
  run on the very same step (nested), and (``--rss-check``) the rise of the process's peak
  resident memory (``VmHWM``) over one step in a child process whose malloc returns large
  blocks to the OS at once; RSS also holds what the tracker cannot see (kernel scratch memory).

"Steady state": a warm-up optimizer step on a tiny 1 x 8 micro-batch first builds the AdamW
state (memory does not depend on that batch), then the measured step runs with the state in
place and no gradients (``zero_grad(set_to_none=True)``), as every later step of training does.
Ratios are against the Hugging Face figure measured here and the issue's nanoGPT reference
(3.61 GiB on this CPU). GiB = 1024**3 bytes. The result is one JSON object on stdout;
``--update-docs`` rewrites the ``## Memory`` section of ``docs/benchmarks.md``.

    python benchmarks/memory.py --quick           # the seed workload and a small grid, ~2-3 minutes
    python benchmarks/memory.py --update-docs     # everything, ~5-8 minutes on 2 CPU cores

``measure_training_step(preset_or_config, batch_size, seq_len, low_memory=..., precision=...)``
is importable for tests (``sys.path`` must hold ``benchmarks/``, or load the file by path).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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
GRID_PRESETS = ("tiny", "gpt2-125m")
GRID_BATCH = (1, 4, 8)
GRID_SEQ = (128, 512)
QUICK_GRID = [("tiny", b, t) for b in GRID_BATCH for t in GRID_SEQ] + [("gpt2-125m", 1, 128)]
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
NO_SAVERS_TRAIN = {"checkpointing": "none"}
NO_SAVERS_MODEL = {"fused_loss": False}


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
    """Hand count: parameters (tied ones once), gradients of the same size, optimizer state."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    p, g, o = _nbytes(params), _nbytes([q for q in params if q.requires_grad]), _nbytes(state)
    return {"params": p, "grads": g, "optimizer_state": o, "total": p + g + o}


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
           "savers": {name: getattr(w.cfg, name) for name in ("checkpointing", "full_checkpoint_blocks", "low_memory")
                      if name in known} | {k: getattr(w.model, k) for k in ("fused_loss",) if hasattr(w.model, k)},
           "train_overrides": {k: v for k, v in (train_overrides or {}).items() if k in known},
           "model_attrs": w.model_attrs, "train_step_extras": sorted(w.extras)}
    out.update(_result(report, static, wall))
    if not w.model_attrs:  # the planner models the default model (fused loss)
        out.update(planner_prediction(w, batch_size, seq_len, precision, dev))
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
                  "full_blocks": getattr(w.cfg, "full_checkpoint_blocks", None), "device": device.type}
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


def hf_dropouts(model_cfg: ModelConfig, dropouts: str) -> dict[str, float]:
    """``pocketlm``: the model config's own dropouts (attention-probability dropout is
    ``attn_dropout`` where the config has it); ``gpt2``: ``GPT2Config``'s defaults, 0.1 everywhere."""
    if dropouts == "gpt2":
        return {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    if dropouts != "pocketlm":
        raise ValueError(f"dropouts must be pocketlm or gpt2; got {dropouts!r}")
    return {"resid_pdrop": model_cfg.dropout, "embd_pdrop": model_cfg.dropout,
            "attn_pdrop": getattr(model_cfg, "attn_dropout", model_cfg.dropout)}


def measure_hf_step(preset: str, batch_size: int, seq_len: int, *, precision: str = "bf16",
                    device: str | torch.device | None = None, method: str = "auto", seed: int = 0,
                    dropouts: str = "pocketlm") -> dict[str, Any]:
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

    def step(input_ids: torch.Tensor) -> None:
        with autocast(dev, precision):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(random_batch(*WARMUP_SHAPE, model_cfg.vocab_size, seed + 1).input_ids.to(dev))
    ids = random_batch(batch_size, seq_len, model_cfg.vocab_size, seed + 2).input_ids.to(dev)
    static = static_bytes(model, optimizer)
    gc.collect()
    began = time.perf_counter()
    report = measure_peak(lambda: step(ids), device=dev, model=model, optimizer=optimizer, tensors=[ids],
                          method=method)
    out = {"model": "transformers.GPT2LMHeadModel", "preset": preset, "batch_size": batch_size, "seq_len": seq_len,
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
# Machine, command and the docs section


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def exact_command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(script)
    return shlex.join(["python", shown, *sys.argv[1:]])


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"cpu": cpu_model(), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": str(device)}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        info["transformers"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


POCKETLM_ROWS = ("pocketlm", "pocketlm_low_memory", "pocketlm_no_checkpointing", "pocketlm_no_savers",
                 "pocketlm_grad_accum_2")


def _savers_text(row: dict[str, Any]) -> str:
    sv = row.get("savers") or {}
    parts = []
    if "checkpointing" in sv:
        ck = sv["checkpointing"]
        if ck == "selective" and sv.get("full_checkpoint_blocks"):
            ck += f" + {sv['full_checkpoint_blocks']} full blocks"
        parts.append(f"checkpointing {ck}")
    if "fused_loss" in sv:
        parts.append("chunked fused loss" if sv["fused_loss"] else "plain loss (full logits)")
    return ", ".join(parts)


def _row_name(name: str, row: dict[str, Any]) -> str:
    what = {"pocketlm": "pocketlm `train_step`, defaults", "pocketlm_low_memory": "pocketlm, `low_memory=True`",
            "pocketlm_no_checkpointing": "pocketlm, no activation checkpointing",
            "pocketlm_no_savers": "pocketlm, memory savers off",
            "pocketlm_grad_accum_2": "pocketlm defaults, 2 micro-batches accumulated"}[name]
    savers = _savers_text(row)
    return f"{what} ({savers})" if savers else what


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _breakdown_text(row: dict[str, Any]) -> str:
    b = row.get("peak_breakdown_gib")
    if not b:
        return "n/a"
    return ", ".join(f"{k} {v:.2f}" for k, v in b.items() if v >= 0.005)


def docs_section(result: dict[str, Any]) -> str:
    m, seed, r = result["machine"], result["seed_workload"], result["results"]
    lines = [SECTION, "",
             "Peak live tensor memory of one steady-state training step (forward, backward, AdamW update): the "
             "largest total size of PyTorch storages alive at once, parameters, gradients, optimizer state and "
             f"the batch included. Seed workload: `{seed['preset']}` ({r['pocketlm']['n_params']:,} parameters), "
             f"one micro-batch of {seed['batch_size']} x {seed['seq_len']} tokens, AdamW, {seed['precision']} "
             "autocast, gradient clipping. Counted by `pocketlm.memtrack.PeakMemoryTracker` on the CPU "
             "(`torch.cuda.max_memory_allocated` on a GPU). GiB = 1024^3 bytes.", "",
             f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, transformers "
             f"{m['transformers']}, Python {m['python']}; device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + ".",
             f"- Date: {result['date']}.",
             f"- Command: `{result['command']}` ({result['runtime_s']:.0f} s in all).", "",
             "| workload | peak (GiB) | vs HF, same dropouts | vs HF, GPT-2 dropouts | vs nanoGPT 3.61 GiB | "
             "params+grads+AdamW state (GiB) | peak reached in | live at the peak (GiB) |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    hf, hf2 = r.get("hf") or {}, r.get("hf_gpt2_dropouts") or {}

    def hf_name(row: dict[str, Any], what: str) -> str:
        return (f"Hugging Face `GPT2LMHeadModel`, {what} (`{row.get('attn_implementation', '?')}` attention, "
                f"attn_pdrop {row.get('attn_pdrop', '?')})")

    rows = [(_row_name(name, r[name]), r[name]) for name in POCKETLM_ROWS if name in r]
    rows += [(hf_name(hf, "pocketlm's dropouts"), r.get("hf")),
            (hf_name(hf2, "stock GPT-2 dropouts"), r.get("hf_gpt2_dropouts"))]

    def ratio(row: dict[str, Any], ref: dict[str, Any]) -> str:
        return f"{row['peak_bytes'] / ref['peak_bytes']:.2f}x" if "peak_bytes" in ref else "n/a"

    skipped: list[str] = []
    for name, row in rows:
        if not row:
            continue
        if "peak_bytes" not in row:
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error']} | | | | | | |")
            else:
                skipped.append(f"{name}: not measured, {row.get('reason', 'n/a')}")
            continue
        where = row.get("peak_phase") or "n/a"
        if row.get("peak_op"):
            where += (f" (`{row['peak_op']}`" + (f" in `{row['peak_autograd_node']}`" if row.get("peak_autograd_node")
                                                  else "") + ")")
        lines.append(f"| {name} | {row['peak_gib']:.2f} | {ratio(row, hf)} | {ratio(row, hf2)} | "
                     f"{row['peak_gib'] / NANOGPT_REFERENCE_GIB:.2f}x | {row['static_gib']:.2f} | {where} | "
                     f"{_breakdown_text(row)} |")
    lines += ["", "Reference figures from the issue, same CPU: nanoGPT-style 3.61 GiB, Hugging Face "
              f"`GPT2LMHeadModel` {HF_REFERENCE_GIB} GiB." + "".join(f" {x}." for x in skipped)]
    phases = r["pocketlm"].get("phase_peaks_gib")
    if phases:
        order = ["forward", "backward", "other", "optimizer"]
        names = {"other": "between backward and the update (clipping)", "optimizer": "AdamW update"}
        lines += ["", "pocketlm's largest live total in each phase of the step: "
                  + ", ".join(f"{names.get(k, k)} {phases[k]:.2f} GiB"
                              for k in sorted(phases, key=lambda k: order.index(k) if k in order else 9)) + "."]
    checks = result.get("checks", {})
    notes = []
    for name, row in checks.get("memtracker", {}).items():
        if row.get("memtracker_peak_bytes") is not None:
            notes.append(f"{name}: this tracker {row['peak_bytes']:,} B, PyTorch's `MemTracker` "
                         f"{row['memtracker_peak_bytes']:,} B ({'identical' if row['memtracker_agrees'] else 'different'})")
    rss = checks.get("rss")
    if rss and "rise_bytes" in rss:
        p = r["pocketlm"]
        notes.append(f"the peak RSS of a separate process rose {rss['rise_bytes'] / GIB:.3f} GiB during one untracked step "
                     f"of the seed workload, against the tracker's {(p['peak_bytes'] - p['start_bytes']) / GIB:.3f} GiB "
                     "above the step's starting state (RSS also holds kernel scratch memory and allocator slack the tracker "
                     "does not count)")
    if notes:
        lines += ["", "Checks of the tracker: " + "; ".join(notes) + "."]
    grid = result.get("grid", [])
    if grid:
        lines += ["", "Other configurations (pocketlm `train_step`, one micro-batch, "
                  f"{seed['precision']} autocast; `tiny`'s context widened to 512 where the sequence needs it):", "",
                  "| preset | micro-batch | seq len | peak (GiB) | params+grads+AdamW (GiB) | above that (GiB) | peak in "
                  "| `planner.predict_peak` (GiB) |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        for row in grid:
            if "peak_bytes" not in row:
                lines.append(f"| {row['preset']} | {row['batch_size']} | {row['seq_len']} | error: {row.get('error')} | | | | |")
                continue
            lines.append(f"| {row['preset']} | {row['batch_size']} | {row['seq_len']} | {row['peak_gib']:.3f} | "
                         f"{row['static_gib']:.3f} | {row['above_static_gib']:.3f} | {row.get('peak_phase', 'n/a')} | "
                         + (f"{row['planner_predicted_gib']:.3f} |" if "planner_predicted_gib" in row else "n/a |"))
        savers = _savers_text(grid[0]) if grid and "peak_bytes" in grid[0] else ""
        if savers:
            lines += ["", f"All grid rows use the trainer's defaults ({savers}). The planner's figure is for a "
                      "micro-step after the first of an accumulation window (all gradients already allocated); "
                      "these rows are single micro-batch steps, whose gradients appear during backward."]
    lines += ["", "Method: a warm-up optimizer step on a 1 x 8 micro-batch builds the AdamW state, then the measured "
              "step runs through the real `pocketlm.train.train_step` with the state in place and no gradients, as "
              "every later training step does. The tracker registers parameters, optimizer state and the batch "
              "before the step and counts every storage an operator returns until it is freed; it cannot see "
              "scratch memory a kernel frees before it returns. \"Memory savers off\" switches off what the "
              "training config and the model expose (activation checkpointing; the chunked fused loss, so the full "
              "logits are materialised); the optimizer is `build_optimizer`'s in every pocketlm row. Each step runs "
              "once on random tokens: the figures do not depend on the data or on the machine's load."]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str, heading: str = SECTION) -> str:
    """Replace the ``heading`` section (up to the next ``## `` heading outside code fences);
    append it when missing."""
    lines = text.splitlines(keepends=True)
    start = end = None
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if start is None and line.rstrip() == heading:
            start = i
        elif start is not None and line.startswith("## "):
            end = i
            break
    body = section.rstrip("\n") + "\n"
    if start is None:
        prefix = text.rstrip("\n")
        return (prefix + "\n\n" if prefix else "") + body
    tail = lines[end:] if end is not None else []
    return "".join(lines[:start]) + body + ("\n" if tail else "") + "".join(tail)


def update_docs(section: str, path: Path = DOCS) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else \
        "# Benchmarks\n\nMeasurements of pocketlm, each section written by a script in `benchmarks/`.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(replace_section(text, section), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="seed workload (pocketlm, low-memory if available, Hugging Face), the checks and a small grid")
    p.add_argument("--no-grid", action="store_true", help="skip the grid of other configurations")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face")
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
    common = dict(precision=args.precision, device=dev, method=args.method)
    results: dict[str, Any] = {}
    checks: dict[str, Any] = {"memtracker": {}}

    say("pocketlm, seed workload (with PyTorch's MemTracker alongside on the CPU)")
    cross = dev.type == "cpu" and args.method != "cuda"
    results["pocketlm"] = measure_training_step(seed["preset"], seed["batch_size"], seed["seq_len"],
                                                cross_check=cross, **common)
    if cross:
        checks["memtracker"]["gpt2-125m 4x512"] = {k: results["pocketlm"].get(k) for k in
                                                   ("peak_bytes", "memtracker_peak_bytes", "memtracker_agrees")}
    ok, why = low_memory_support()
    if ok:
        say("pocketlm, seed workload, low_memory=True")
        results["pocketlm_low_memory"] = _safe(lambda: measure_training_step(
            seed["preset"], seed["batch_size"], seed["seq_len"], low_memory=True, **common))
    else:
        results["pocketlm_low_memory"] = {"reason": why}
    say("pocketlm, seed workload, memory savers off")
    results["pocketlm_no_savers"] = _safe(lambda: measure_training_step(
        seed["preset"], seed["batch_size"], seed["seq_len"], train_overrides=NO_SAVERS_TRAIN,
        model_attrs=NO_SAVERS_MODEL, **common))
    if not args.quick:
        say("pocketlm, seed workload, activation checkpointing off")
        results["pocketlm_no_checkpointing"] = _safe(lambda: measure_training_step(
            seed["preset"], seed["batch_size"], seed["seq_len"], train_overrides=NO_SAVERS_TRAIN, **common))
        say("pocketlm, seed workload, 2 micro-batches of accumulation")
        results["pocketlm_grad_accum_2"] = _safe(lambda: measure_training_step(
            seed["preset"], seed["batch_size"], seed["seq_len"], grad_accum=2, **common))
    if not args.no_hf:
        say("Hugging Face GPT2LMHeadModel, seed workload, pocketlm's dropouts")
        results["hf"] = _safe(lambda: measure_hf_step(seed["preset"], seed["batch_size"], seed["seq_len"], **common))
        say("Hugging Face GPT2LMHeadModel, seed workload, stock GPT-2 dropouts")
        results["hf_gpt2_dropouts"] = _safe(lambda: measure_hf_step(
            seed["preset"], seed["batch_size"], seed["seq_len"], dropouts="gpt2", **common))
    if cross:
        say("tiny 4x128 with MemTracker alongside")
        row = measure_training_step("tiny", 4, 128, cross_check=True, **common)
        checks["memtracker"]["tiny 4x128"] = {k: row.get(k) for k in
                                              ("peak_bytes", "memtracker_peak_bytes", "memtracker_agrees")}
    if args.rss_check is None:
        args.rss_check = dev.type == "cpu" and sys.platform.startswith("linux")
    if args.rss_check:
        say("peak-RSS check in a child process")
        checks["rss"] = rss_check(seed["preset"], seed["batch_size"], seed["seq_len"], args.precision, args.threads)

    grid: list[dict[str, Any]] = []
    if not args.no_grid:
        configs = QUICK_GRID if args.quick else [(p, b, t) for p in GRID_PRESETS for b in GRID_BATCH for t in GRID_SEQ]
        for preset, b, t in configs:
            if (preset, b, t) == (seed["preset"], seed["batch_size"], seed["seq_len"]) and "peak_bytes" in results["pocketlm"]:
                grid.append(results["pocketlm"])
                continue
            say(f"grid: {preset} {b}x{t}")
            grid.append(_safe(lambda preset=preset, b=b, t=t: measure_training_step(preset, b, t, **common),
                              preset=preset, batch_size=b, seq_len=t))

    ratios: dict[str, Any] = {}
    hfs = {"hf": results.get("hf", {}), "hf_gpt2_dropouts": results.get("hf_gpt2_dropouts", {})}
    for name, row in hfs.items():
        if "peak_bytes" in row:
            ratios[f"{name}_vs_issue_hf_reference"] = round(row["peak_gib"] / HF_REFERENCE_GIB, 3)
    for name in POCKETLM_ROWS:
        row = results.get(name, {})
        if "peak_bytes" not in row:
            continue
        ratios[f"{name}_vs_nanogpt_reference"] = round(row["peak_gib"] / NANOGPT_REFERENCE_GIB, 3)
        for hf_name, hf_row in hfs.items():
            if "peak_bytes" in hf_row:
                ratios[f"{name}_vs_{hf_name}"] = round(row["peak_bytes"] / hf_row["peak_bytes"], 3)
        if name != "pocketlm":
            ratios[f"{name}_vs_pocketlm"] = round(row["peak_bytes"] / results["pocketlm"]["peak_bytes"], 3)

    result = {
        "benchmark": "memory",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": exact_command(),
        "machine": machine_info(dev),
        "seed_workload": seed,
        "reference_gib": {"nanogpt": NANOGPT_REFERENCE_GIB, "hf": HF_REFERENCE_GIB},
        "results": results,
        "ratios": ratios,
        "checks": checks,
        "grid": grid,
        "quick": args.quick,
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "runtime_s": round(time.perf_counter() - began, 1),
    }
    if args.update_docs:
        update_docs(docs_section(result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
