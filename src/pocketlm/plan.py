"""The run plan: every decision a run makes about itself, made once and written down.

``probe_machine`` looks at the machine (device, precision, matmul peak, free memory);
``make_plan`` is a pure function of the config, those facts and the training data's example
lengths. The plan goes into the run's ``config.json`` and into every checkpoint, and a resumed
run *reads it back* instead of deciding again: the compile decision depends on a timing, and a
resume on a busier or idler machine must not take the other path (that would end the
bit-identical resume). Only what a resume may change (``FREE`` fields, a new run length when
branching, another device) is re-planned, and the log says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from pocketlm.batching import epoch_batches
from pocketlm.config import FSDP_REFUSALS, TrainConfig
from pocketlm.device import resolve_device, resolve_precision
from pocketlm.distributed import check_split
from pocketlm.errors import ConfigError
from pocketlm.perf import busy_cpu_warning, flops_per_token, known_peak_flops, measure_matmul_peak, one_thread_matmul_peak
from pocketlm.planner import fit_to_budget, parse_size

# Auto-compile only for runs with at least this many seconds of work at the device's matmul peak
# (steps x tokens per step x model FLOPs per token / peak). Measured on a 2-core CPU with AMX:
# gpt2-125m compiles in ~35 s and saves ~3.6 s per step, and bucket batching's second shape
# recompiles with symbolic sizes in ~50 s more, so it breaks even after 10-24 steps of 2.6 s each
# at peak (~26-62 s); the tiny preset repays its ~70 s only after ~1,750 steps of 0.033 s (~58 s).
# See docs/benchmarks.md, Throughput. A step count alone cannot serve both.
COMPILE_MIN_PEAK_SECONDS = 60.0
# What the progress display promises while the first steps compile (the measured 35-70 s above,
# plus the recompile for a second bucket shape).
COMPILE_SECONDS_ESTIMATE = 60


@dataclass(frozen=True)
class Machine:
    """What the run found about the machine it starts on."""

    device: str
    precision: str
    peak_flops: float | None
    peak_flops_source: str
    memory_budget_bytes: int | None = None
    """The ``--vram`` budget in bytes (``auto``: free GPU memory now), if one was asked for."""
    warning: str | None = None
    """Something the user should know about the machine (a CPU busy with other work)."""
    cpu_threads: int | None = None
    """torch's intra-op threads now, on a CPU."""
    world_size: int = 1
    """Processes training together (torchrun's WORLD_SIZE)."""


def device_peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """The matrix-product peak that MFU is judged against, and where it came from: a GPU's
    datasheet figure when known, else a quick measurement in the run's compute dtype."""
    known = known_peak_flops(device) if precision in ("bf16", "fp16") else None
    if known is not None:
        return known, "datasheet bf16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    try:
        return measure_matmul_peak(device, dtype, min_seconds=0.25), f"measured {precision} 2048x2048 matmul"
    except RuntimeError:  # e.g. a dtype the device cannot multiply
        return None, "unavailable"


def memory_budget(vram: str | None, device: torch.device) -> int | None:
    if vram is None:
        return None
    if vram == "auto":
        if device.type != "cuda":
            raise ConfigError("--vram auto reads free GPU memory and needs CUDA; give a size such as 4GB")
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    return parse_size(vram)


def probe_machine(cfg: TrainConfig, *, measure_peak: bool = True) -> Machine:
    """The device and precision the config asks for, the device's matmul peak and the memory
    budget. Draws from torch's global RNG (the peak's random matrices), so call it before seeding."""
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    peak, source = device_peak_flops(device, precision) if measure_peak else (None, "not measured")
    threads = torch.get_num_threads() if device.type == "cpu" else None
    warning = None
    if threads is not None and peak is not None and source.startswith("measured"):
        dtype = {"bf16": torch.bfloat16}.get(precision, torch.float32)
        warning = busy_cpu_warning(peak, one_thread_matmul_peak(dtype), threads)
    return Machine(str(device), precision, peak, source, memory_budget(cfg.memory.vram, device), warning, threads)


@dataclass(frozen=True)
class RunPlan:
    """How this run trains. Written to the run folder; a resume reads it back."""

    device: str
    precision: str
    batch_size: int
    """The micro-batch actually used (``--vram`` may have made it smaller than asked)."""
    grad_accum: int
    checkpointing: str
    full_checkpoint_blocks: int
    low_memory: bool
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    compiled: bool
    flops_per_token: float
    tokens_per_step: int
    """At most: micro-batch x accumulation x context."""
    peak_flops: float | None
    peak_flops_source: str
    predicted_peak_bytes: int | None = None
    """The planner's prediction, when ``--vram`` fitted the settings."""
    tokenizer: str = "gpt2"
    """The tokenizer the run's data was encoded with."""
    cpu_threads: int | None = None
    """torch's intra-op threads on a CPU run. The thread count sets how reductions split, so a
    resume runs with the run's own count to stay bit-identical."""
    world_size: int = 1
    """Processes training together; each runs grad_accum / world_size micro-batches per step."""
    fsdp: bool = False
    """Whether the ranks shard the model (FSDP2) rather than copy it (DDP)."""

    @property
    def rank_accum(self) -> int:
        """Micro-batches each rank runs per optimizer step."""
        return self.grad_accum // self.world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> "RunPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(saved) - {"predicted_peak_bytes", "tokenizer", "cpu_threads", "world_size",
                                        "fsdp"}  # added later
        if missing:
            raise ConfigError(f"the saved run plan lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in saved.items() if k in names})


def work_seconds_at_peak(total_steps: int, tokens_per_step: int, flops_per_tok: float,
                         peak_flops: float | None) -> float | None:
    """How long the run's model FLOPs would take at the device's matmul peak; None if unknown."""
    if not peak_flops:
        return None
    return total_steps * tokens_per_step * flops_per_tok / peak_flops


def should_compile(asked: bool | None, device_type: str, work_at_peak_s: float | None) -> bool:
    """``--compile`` / ``--no-compile`` as given; auto: on CPU and CUDA when the run holds at least
    ``COMPILE_MIN_PEAK_SECONDS`` of work at peak (MPS support in torch.compile is still partial)."""
    if asked is not None:
        return asked
    return device_type in ("cpu", "cuda") and work_at_peak_s is not None and work_at_peak_s >= COMPILE_MIN_PEAK_SECONDS


def run_length(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps: at most 10% of the run)."""
    total = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    return total, min(cfg.optim.warmup_steps, total // 10)


def make_plan(cfg: TrainConfig, machine: Machine, train_lengths: np.ndarray, tokenizer: str = "gpt2") -> RunPlan:
    """Every decision of a fresh run, from the config, the machine, the example lengths and the
    tokenizer's name."""
    model_cfg = cfg.model_config()
    batch_size, grad_accum = cfg.optim.batch_size, cfg.optim.grad_accum
    check_parallel(cfg, machine)
    low_memory = cfg.memory.low_memory
    checkpointing = "full" if low_memory else cfg.memory.checkpointing
    full_blocks = cfg.memory.full_checkpoint_blocks
    predicted = None
    if machine.memory_budget_bytes is not None:
        fit = fit_to_budget(model_cfg, machine.memory_budget_bytes, batch_size=batch_size, grad_accum=grad_accum,
                            precision=machine.precision, device=torch.device(machine.device).type,
                            low_memory=low_memory, free_memory=cfg.memory.vram == "auto", ranks=machine.world_size,
                            shards=machine.world_size if cfg.memory.fsdp else 1, optimizer=cfg.optim.optimizer,
                            ema=cfg.optim.ema_decay > 0)
        batch_size, grad_accum = fit.batch_size, fit.grad_accum
        checkpointing, full_blocks, predicted = fit.checkpointing, fit.full_checkpoint_blocks, fit.plan.total
    check_split(grad_accum, batch_size, machine.world_size)
    batches = epoch_batches(cfg.dataset.batching, train_lengths, batch_size, model_cfg.block_size, cfg.run.seed, 0)
    steps_per_epoch = math.ceil(len(batches) / grad_accum)
    total_steps, warmup = run_length(cfg, steps_per_epoch)
    fpt = flops_per_token(model_cfg, model_cfg.block_size)
    tokens_per_step = batch_size * grad_accum * model_cfg.block_size
    # The whole run's work, not what is left of it: see the module docstring.
    work = work_seconds_at_peak(total_steps, tokens_per_step, fpt, machine.peak_flops)
    compiled = should_compile(cfg.run.compile, torch.device(machine.device).type, work)
    return RunPlan(device=machine.device, precision=machine.precision, batch_size=batch_size, grad_accum=grad_accum,
                   checkpointing=checkpointing, full_checkpoint_blocks=full_blocks, low_memory=low_memory,
                   steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup, compiled=compiled,
                   flops_per_token=fpt, tokens_per_step=tokens_per_step, peak_flops=machine.peak_flops,
                   peak_flops_source=machine.peak_flops_source, predicted_peak_bytes=predicted, tokenizer=tokenizer,
                   cpu_threads=machine.cpu_threads, world_size=machine.world_size, fsdp=cfg.memory.fsdp)


def check_parallel(cfg: TrainConfig, machine: Machine) -> None:
    """One-line errors for settings that several processes (or --fsdp) cannot honour."""
    if cfg.memory.fsdp and machine.world_size < 2:
        raise ConfigError("--fsdp shards the model across processes and needs at least two: launch with "
                          "torchrun --nproc-per-node N (N >= 2), or leave --fsdp out")
    if cfg.memory.fsdp and machine.precision == "fp16":
        raise ConfigError(f"--fsdp cannot be combined with --precision fp16 (this GPU's auto precision): "
                          f"{FSDP_REFUSALS['--precision fp16']}")
    if cfg.memory.low_memory and machine.world_size > 1:
        raise ConfigError("--low-memory works in a single process (its optimizer keeps its own gradients, which "
                          "data parallelism does not reduce); with torchrun use --fsdp to save memory instead")


def resume_plan(saved: RunPlan, saved_cfg: TrainConfig, cfg: TrainConfig,
                machine: Machine) -> tuple[RunPlan, list[str]]:
    """The saved plan, with only what this resume may change re-planned; and what changed, in words."""
    changes: dict[str, Any] = {}
    notes: list[str] = []
    if torch.device(machine.device).type != torch.device(saved.device).type:
        compiled = should_compile(cfg.run.compile, torch.device(machine.device).type, work_seconds_at_peak(
            saved.total_steps, saved.tokens_per_step, saved.flops_per_token, machine.peak_flops))
        changes.update(device=machine.device, precision=machine.precision, compiled=compiled,
                       peak_flops=machine.peak_flops, peak_flops_source=machine.peak_flops_source,
                       cpu_threads=machine.cpu_threads)
        notes.append(f"resumed on {machine.device} (the run started on {saved.device}): device, precision and "
                     "compile re-planned; the result is no longer bit-identical to an uninterrupted run")
    else:
        if saved.cpu_threads and machine.cpu_threads != saved.cpu_threads:
            notes.append(f"running with the run's {saved.cpu_threads} torch threads (this process had "
                         f"{machine.cpu_threads}), so that the resume stays bit-identical")
        if cfg.run.compile is not None and cfg.run.compile != saved.compiled:
            changes["compiled"] = cfg.run.compile
            notes.append(f"{'--compile' if cfg.run.compile else '--no-compile'} given: compile "
                         f"{'on' if cfg.run.compile else 'off'} from here (the plan had it "
                         f"{'on' if saved.compiled else 'off'})")
    if (machine.world_size, cfg.memory.fsdp) != (saved.world_size, saved.fsdp):
        check_parallel(cfg, machine)
        check_split(saved.grad_accum, saved.batch_size, machine.world_size)
        changes.update(world_size=machine.world_size, fsdp=cfg.memory.fsdp)
        if machine.world_size != saved.world_size:
            notes.append(f"resumed on {machine.world_size} rank(s) (the run trained on {saved.world_size}): the same "
                         f"global batch, each rank taking {saved.grad_accum // machine.world_size} of a step's "
                         f"{saved.grad_accum} micro-batches; losses equal the uninterrupted run's up to rounding")
        if cfg.memory.fsdp != saved.fsdp:
            notes.append(f"{'sharded' if cfg.memory.fsdp else 'unsharded'} from here (--fsdp "
                         f"{'given' if cfg.memory.fsdp else 'left out'})")
    if not saved.low_memory:
        if cfg.memory.checkpointing != saved_cfg.memory.checkpointing:
            changes["checkpointing"] = cfg.memory.checkpointing
        if cfg.memory.full_checkpoint_blocks != saved_cfg.memory.full_checkpoint_blocks:
            changes["full_checkpoint_blocks"] = cfg.memory.full_checkpoint_blocks
    if (cfg.optim.max_steps, cfg.optim.epochs) != (saved_cfg.optim.max_steps, saved_cfg.optim.epochs):
        total, warmup = run_length(cfg, saved.steps_per_epoch)
        changes.update(total_steps=total, warmup_steps=warmup)
        notes.append(f"run length changed: {saved.total_steps} -> {total} steps (the LR schedule follows)")
    return dataclasses.replace(saved, **changes), notes
