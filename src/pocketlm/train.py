"""Training: ``train(cfg)`` opens a run (``open_run``) and runs its loop (``run_loop``).

Exact resume: the data order is a pure function of (seed, epoch) (see batching.py), the run plan
is decided once and read back (plan.py), and a checkpoint holds the weights and the whole
``TrainState`` (optimizer, scaler, progress, batch position, RNG). A run restarted from any
checkpoint therefore takes the same steps as one that was never interrupted, bit for bit on a
CPU in fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pocketlm.batching import Batch, MicroBatch, collate, split_batch
from pocketlm.checkpoint import (Checkpoint, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint,
                                 weights_state_dict)
from pocketlm.config import TrainConfig
from pocketlm.data import Dataset, load_dataset
from pocketlm.device import autocast
from pocketlm.errors import ConfigError, TrainingError
from pocketlm.evaluate import evaluate_nll
from pocketlm.losses import NextTokenLoss
from pocketlm.metrics import MetricsLog
from pocketlm.model import GPT
from pocketlm.optim import CosineSchedule, Optimizers, build_optimizer
from pocketlm.parallelize import prepare_model
from pocketlm.perf import keep_freed_memory_for_reuse, throughput
from pocketlm.plan import COMPILE_SECONDS_ESTIMATE, Machine, RunPlan, make_plan, probe_machine, resume_plan
from pocketlm.planner import GiB
from pocketlm.progress import ProgressReporter
from pocketlm.rundir import RunLock, check_resumable, resume_source, saved_train_config, set_aside_old_log
from pocketlm.state import BatchStream, Progress, TrainState, capture_rng, restore_rng
from pocketlm.tokenizer import Tokenizer, get_tokenizer


# ---------------------------------------------------------------------------------------------
# One optimizer step


class NonFiniteStep(Exception):
    def __init__(self, loss: float, grad_norm: float) -> None:
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


def train_step(objective: torch.nn.Module, optimizers: Optimizers, micro_batches: list[MicroBatch], *,
               lr: float, device: torch.device, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 1.0) -> tuple[float, float]:
    """One optimizer step over ``micro_batches``; returns (loss, gradient norm before clipping).

    Each micro-batch's summed NLL is divided by the real-token count of the *whole step*, so the
    accumulated gradient is exactly that of one batch holding every micro-batch (not a mean of
    per-micro-batch means, which over-weights tokens in short micro-batches). The loss and the
    norm come to the host together, once, and are checked before the update: a non-finite step
    raises ``NonFiniteStep`` and changes no weight. (With fp16 loss scaling an infinite norm is the
    scaler's business: it skips that update and lowers the scale.)
    """
    n_tokens = sum(mb.real_tokens for mb in micro_batches)
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        mb = mb.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = objective(mb.input_ids, mb.targets, mb.position_ids, mb.segment_ids) / n_tokens
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        optimizers.unscale_(scaler)
    grad_norm = optimizers.clip_grad_norm_(grad_clip)
    loss_value, norm_value = torch.stack([total.float(), grad_norm.float().to(total.device)]).tolist()
    if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm_value)):
        optimizers.zero_grad()
        raise NonFiniteStep(loss_value, norm_value)
    optimizers.set_lr(lr)
    optimizers.step(scaler)
    if scaler is not None:
        scaler.update()
    optimizers.zero_grad()
    return loss_value, norm_value


def step_halving_on_oom(step: Callable[[list[MicroBatch]], tuple[float, float]], group: list[Batch],
                        state: TrainState, collate_batch: Callable[[Batch], MicroBatch], device: torch.device,
                        log: MetricsLog) -> tuple[float, float, int]:
    """Run one optimizer step over ``group``. On an out-of-memory error, halve every micro-batch
    (doubling their number: the same examples, the same effective batch) and run the same step
    again from scratch; ``progress.micro_splits`` remembers it for the rest of the run."""
    rng_before = capture_rng()
    progress = state.progress
    while True:
        pieces = [piece for b in group for piece in split_batch(b, 2 ** progress.micro_splits)]
        micro = [collate_batch(b) for b in pieces]
        try:
            loss, grad_norm = step(micro)
            return loss, grad_norm, sum(m.real_tokens for m in micro)
        except torch.OutOfMemoryError:
            state.optimizer.zero_grad()
            del micro
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if all(len(b.rows) <= 1 for b in pieces):
                raise TrainingError(f"out of memory at step {progress.step + 1} even with one sequence per "
                                    "micro-batch; try --checkpointing full or a smaller --vram") from None
            restore_rng(rng_before)  # the retry draws the same dropout masks
            progress.micro_splits += 1
            log.write({"event": "oom", "step": progress.step + 1, "micro_splits": progress.micro_splits})
            log.console(f"out of memory at step {progress.step + 1}: micro-batches halved "
                        f"(x{2 ** progress.micro_splits} accumulation), retrying the step")


# ---------------------------------------------------------------------------------------------
# Signals


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of dying mid-step; the loop saves and stops at a step boundary."""
    received: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Opening a run


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    final_checkpoint: Path | None
    val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """Everything the loop needs, made by ``open_run``."""

    cfg: TrainConfig
    plan: RunPlan
    tokenizer: Tokenizer
    data: Dataset
    state: TrainState
    objective: torch.nn.Module
    schedule: CosineSchedule
    record: dict[str, Any]
    """config.json: the training config, the model config and the plan."""
    resumed_from: Path | None
    notes: list[str]

    @property
    def out_dir(self) -> Path:
        return self.cfg.resolved_out_dir()

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    def collate(self, batch: Batch) -> MicroBatch:
        return collate(self.data.train, batch, self.tokenizer.eot_id)

    def evaluate(self) -> float:
        return evaluate_nll(self.state.model, self.data.validation, batch_size=self.plan.batch_size,
                            device=self.device, precision=self.plan.precision, pad_id=self.tokenizer.eot_id,
                            max_batches=self.cfg.run.eval_batches).mean

    def save(self, val_loss: float | None) -> Path:
        check_finite_weights(self.state.model, self.state.progress.step, self.last_good())
        return save_checkpoint(self.out_dir, self.state.progress.step, weights_state_dict(self.state.model),
                               self.tokenizer, self.record, self.state.state_dict(),
                               keep=self.cfg.run.keep_checkpoints, val_loss=val_loss)

    def last_good(self) -> Path | None:
        """The newest checkpoint this run can fall back on (every saved one is finite)."""
        return latest_checkpoint(self.out_dir) or self.resumed_from


def check_finite_weights(model: torch.nn.Module, step: int, last_good: Path | None) -> None:
    norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in model.parameters()])
    if not bool(torch.isfinite(norms).all()):
        raise non_finite(f"weights became non-finite at step {step}", last_good)


def non_finite(what: str, last_good: Path | None) -> TrainingError:
    """The one-line error of a run whose numbers stopped being finite: nothing from that step is
    saved, so it names the checkpoint to fall back on and what to change."""
    return TrainingError(f"{what}; nothing was saved (last good checkpoint: {last_good or 'none'}); "
                         "start a new run (--out-dir NEW) with a lower --lr, or with --precision fp32")


def _load_source(cfg: TrainConfig, source: Path) -> tuple[Checkpoint, TrainConfig]:
    ckpt = load_checkpoint(source, expected_model=cfg.model_config())
    saved_cfg = saved_train_config(ckpt.config, ckpt.path / "config.json")
    check_resumable(saved_cfg, cfg, ckpt.path, branching=bool(cfg.run.resume))
    return ckpt, saved_cfg


def _plan_for(cfg: TrainConfig, machine: Machine, data: Dataset, tokenizer: Tokenizer, ckpt: Checkpoint | None,
              saved_cfg: TrainConfig | None) -> tuple[RunPlan, list[str]]:
    if ckpt is None:
        return make_plan(cfg, machine, data.train.lengths, tokenizer.name), []
    if "plan" in ckpt.config:  # read back, not re-decided
        saved_plan = RunPlan.from_dict(ckpt.config["plan"])
    else:  # a checkpoint of an earlier pocketlm, before plans were written down
        saved_plan = make_plan(saved_cfg, machine, data.train.lengths, tokenizer.name)
    return resume_plan(saved_plan, saved_cfg, cfg, machine)


def build_state(cfg: TrainConfig, plan: RunPlan, train_lengths: np.ndarray) -> tuple[TrainState, torch.nn.Module]:
    """The model as the plan says to train it, its optimizer and objective, and fresh progress.
    Seeds torch first: the initial weights (and the first dropout masks) follow from the seed."""
    device = torch.device(plan.device)
    if plan.cpu_threads and torch.get_num_threads() != plan.cpu_threads:
        torch.set_num_threads(plan.cpu_threads)
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model_config()).to(device)
    prepare_model(model, device_type=device.type, compiled=plan.compiled, checkpointing=plan.checkpointing,
                  full_blocks=plan.full_checkpoint_blocks, low_memory=plan.low_memory)
    optimizers = build_optimizer(model, cfg.optim, device, low_memory=plan.low_memory)
    objective = NextTokenLoss(model, compiled=plan.compiled, weight_grad_sink=optimizers.weight_grad_sink)
    scaler = torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None
    stream = BatchStream(cfg.dataset.batching, train_lengths, plan.batch_size, cfg.model_config().block_size,
                         cfg.run.seed)
    return TrainState(model, optimizers, scaler, Progress(), stream), objective


def open_run(cfg: TrainConfig) -> Run:
    """Check the inputs, then the run folder; plan (or read the plan back); build the state and
    load the checkpoint being resumed. Writes nothing."""
    model_cfg = cfg.model_config()
    source = resume_source(cfg)
    machine = probe_machine(cfg)  # before seeding: the peak's random matrices draw from the global RNG
    tokenizer = get_tokenizer("gpt2")
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    data = load_dataset(cfg.dataset.data, tokenizer, model_cfg.block_size, cfg.dataset.val_fraction,
                        Path(cfg.dataset.cache_dir) if cfg.dataset.cache_dir else None)
    ckpt, saved_cfg = _load_source(cfg, source) if source is not None else (None, None)
    folder_ckpt = latest_checkpoint(cfg.resolved_out_dir())
    if folder_ckpt is not None and (ckpt is None or folder_ckpt != ckpt.path):
        _load_source(cfg, folder_ckpt)  # a branch into a folder that holds another run is refused
    plan, notes = _plan_for(cfg, machine, data, tokenizer, ckpt, saved_cfg)
    if machine.warning is not None:
        notes.append(machine.warning)
    state, objective = build_state(cfg, plan, data.train.lengths)
    if ckpt is not None:
        load_weights(state.model, ckpt.weights, ckpt.path)
        state.load_state_dict(ckpt.load_state())
    schedule = CosineSchedule(cfg.optim.lr, plan.total_steps, plan.warmup_steps, cfg.optim.min_lr_ratio)
    record = {"train": cfg.to_dict(), "model": dataclasses.asdict(model_cfg), "plan": plan.to_dict()}
    return Run(cfg, plan, tokenizer, data, state, objective, schedule, record,
               ckpt.path if ckpt is not None else None, notes)


def start_log(run: Run, log: MetricsLog) -> None:
    model, plan = run.state.model, run.plan
    log.write({"event": "start", "n_params": model.num_parameters(), "device": plan.device,
               "precision": plan.precision, "config": run.record, "data": run.data.corpus.description,
               "train_tokens": run.data.train.n_tokens, "val_tokens": run.data.validation.n_tokens,
               "total_steps": plan.total_steps, "resumed_from": str(run.resumed_from) if run.resumed_from else None,
               "start_step": run.state.progress.step, "compiled": plan.compiled,
               "cpu_memory_reuse": plan.device == "cpu" and keep_freed_memory_for_reuse(),
               "peak_flops": plan.peak_flops, "peak_flops_source": plan.peak_flops_source,
               "flops_per_token": plan.flops_per_token})
    if plan.predicted_peak_bytes is not None:
        log.write({"event": "memory_plan", "vram": run.cfg.memory.vram, "predicted_peak_bytes": plan.predicted_peak_bytes,
                   "batch_size": plan.batch_size, "grad_accum": plan.grad_accum,
                   "checkpointing": plan.checkpointing, "full_checkpoint_blocks": plan.full_checkpoint_blocks})
        log.console(f"--vram {run.cfg.memory.vram}: micro-batch {plan.batch_size} x {plan.grad_accum} accumulation, "
                    f"{plan.checkpointing} checkpointing ({plan.full_checkpoint_blocks} full blocks); "
                    f"predicted peak {plan.predicted_peak_bytes / GiB:.2f} GiB")
    for note in run.notes:
        log.write({"event": "note", "message": note})
        log.console(note)
    step = run.state.progress.step
    log.console(f"model {run.cfg.preset}: {model.num_parameters() / 1e6:.1f}M parameters on {plan.device} "
                f"({plan.precision}{', compiled' if plan.compiled else ''}); {run.data.train.n_tokens:,} training "
                f"tokens; {plan.total_steps} steps" + (f"; resuming at step {step}" if step else ""))


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, *, on_step: Callable[[int], None] | None = None,
          show_progress: bool | None = None) -> TrainResult:
    """Run (or resume) training as ``cfg`` says. ``on_step`` is called after each optimizer step.
    ``show_progress``: True a progress bar, False nothing, None a bar on a terminal and plain
    progress lines otherwise."""
    run = open_run(cfg)
    out_dir = run.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = {True: "bar", False: "off", None: "auto"}[show_progress]
    with RunLock(out_dir, warn=MetricsLog.warn), deferred_signals() as signals:
        if run.resumed_from is None and (kept := set_aside_old_log(out_dir)) is not None:
            MetricsLog.console(f"{out_dir} held no checkpoint: starting afresh (the earlier log is kept as {kept.name})")
        (out_dir / "config.json").write_text(json.dumps(run.record, indent=2, sort_keys=True))
        with contextlib.closing(MetricsLog(out_dir)) as log, \
                contextlib.closing(ProgressReporter(run.plan.total_steps, run.state.progress.step, mode)) as report:
            start_log(run, log)
            return run_loop(run, log, report, signals, on_step)


def run_loop(run: Run, log: MetricsLog, report: ProgressReporter, signals: list[int],
             on_step: Callable[[int], None] | None) -> TrainResult:
    state, plan, cfg = run.state, run.plan, run.cfg
    progress, total = state.progress, plan.total_steps
    first_step = progress.step
    val_loss: float | None = None
    final = latest_checkpoint(run.out_dir) if progress.step >= total else None
    if progress.step >= total:
        log.console(f"run already complete at step {progress.step}; use a new --out-dir to train again")
    elif progress.step == 0:
        val_loss = evaluate_and_log(run, log, report)  # the untrained model: the curve's starting point

    def step(micro: list[MicroBatch], lr: float) -> tuple[float, float]:
        return train_step(run.objective, state.optimizer, micro, lr=lr, device=run.device, precision=plan.precision,
                          scaler=state.scaler, grad_clip=cfg.optim.grad_clip)

    window_tokens, window_start = 0, time.perf_counter()
    while progress.step < total:
        if state.stream.starts_epoch:
            stats = state.stream.epoch_stats()
            log.write({"event": "epoch", "epoch": state.stream.epoch, "real_tokens": stats.real_tokens,
                       "padded_tokens": stats.padded_tokens, "padding_fraction": stats.padding_fraction})
        group = state.stream.next_group(plan.grad_accum)
        lr = run.schedule.lr(progress.step)
        if plan.compiled and progress.step == first_step:
            report.status(f"compiling (about {COMPILE_SECONDS_ESTIMATE} s, first steps only)")
        try:
            loss, grad_norm, step_tokens = step_halving_on_oom(lambda m: step(m, lr), group, state, run.collate,
                                                               run.device, log)
        except NonFiniteStep as bad:
            raise non_finite(f"loss became {bad.loss} (gradient norm {bad.grad_norm}) at step {progress.step + 1}",
                             run.last_good()) from None
        progress.step += 1
        progress.tokens_seen += step_tokens
        state.stream.advance(len(group))
        window_tokens += step_tokens
        speed = throughput(window_tokens, time.perf_counter() - window_start, plan.flops_per_token, plan.peak_flops)
        report.step(progress.step, loss, speed.tokens_per_s, speed.mfu, lr)
        if progress.step % cfg.run.log_interval == 0 or progress.step == total:
            log.write({"event": "step", "step": progress.step, "epoch": state.stream.epoch, "loss": loss, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": speed.tokens_per_s, "mfu": speed.mfu,
                       "tokens_seen": progress.tokens_seen})
            window_tokens, window_start = 0, time.perf_counter()
        paused = time.perf_counter()  # evaluation and saving are not training time
        evaluated = progress.step % cfg.run.eval_interval == 0 or progress.step == total
        if evaluated:
            val_loss = evaluate_and_log(run, log, report)
        if progress.step % cfg.run.save_interval == 0 or progress.step == total:
            final = run.save(val_loss if evaluated else None)
        window_start += time.perf_counter() - paused
        if on_step is not None:
            on_step(progress.step)
        if signals and progress.step < total:
            saved = run.save(None)
            log.write({"event": "interrupted", "step": progress.step, "checkpoint": str(saved)})
            raise Interrupted(signals[0], progress.step, saved)
    return TrainResult(run.out_dir, progress.step, final, val_loss, log.history)


def evaluate_and_log(run: Run, log: MetricsLog, report: ProgressReporter) -> float:
    report.status("evaluating")
    step = run.state.progress.step
    loss = run.evaluate()
    log.write({"event": "eval", "step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
    if not math.isfinite(loss):
        raise non_finite(f"validation loss became {loss} at step {step}", run.last_good())
    report.message(f"step {step}: val_loss {loss:.4f}, val_ppl {math.exp(min(loss, 50)):.2f}")
    return loss
