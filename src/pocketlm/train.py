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
from pocketlm.checkpoint import (AVERAGE, CONFIG, STATE, WEIGHTS, Checkpoint, best_checkpoint, check_finite,
                                 checkpoints_dir, is_finite_checkpoint, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, load_weights, low_space_warning, save_checkpoint, tensor_bytes,
                                 weights_state_dict)
from pocketlm.config import TrainConfig
from pocketlm.data import Dataset, load_dataset
from pocketlm.device import autocast
from pocketlm.errors import DamagedCheckpoint, TrainingError
from pocketlm.evaluate import evaluate_nll
from pocketlm.losses import NextTokenLoss
from pocketlm.metrics import MetricsLog
from pocketlm.model import GPT
from pocketlm.ema import WeightEMA
from pocketlm.optim import Optimizers, Schedule, build_optimizer, make_schedule
from pocketlm.parallelize import prepare_model
from pocketlm.perf import keep_freed_memory_for_reuse, throughput
from pocketlm.plan import COMPILE_SECONDS_ESTIMATE, Machine, RunPlan, make_plan, probe_machine, resume_plan
from pocketlm.planner import GiB
from pocketlm.progress import ProgressReporter
from pocketlm.rundir import (RunLock, check_resumable, clean_up_after_crashes, first_usable, prepare_out_dir,
                             resume_candidates, saved_train_config, set_aside_old_log, verified_record, write_atomically)
from pocketlm.state import BatchStream, Progress, TrainState, capture_rng, restore_rng
from pocketlm.pretrained import resolve_start
from pocketlm.tokenizer import Tokenizer


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
    schedule: Schedule
    record: dict[str, Any]
    """config.json: the training config, the model config and the plan."""
    resumed_from: Path | None
    notes: list[str]
    space_warned: bool = False
    saved: dict[int, Path] = field(default_factory=dict)
    """Checkpoints this process wrote, by step (a signal right after a save saves nothing new)."""

    @property
    def out_dir(self) -> Path:
        return self.cfg.resolved_out_dir()

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    def collate(self, batch: Batch) -> MicroBatch:
        return collate(self.data.train, batch, self.tokenizer.eot_id)

    def evaluate(self) -> float:
        """The validation loss, of the weight average when the run keeps one."""
        ema = self.state.ema
        with ema.applied(self.state.model) if ema is not None else contextlib.nullcontext():
            return self._evaluate()

    def _evaluate(self) -> float:
        return evaluate_nll(self.state.model, self.data.validation, batch_size=self.plan.batch_size,
                            device=self.device, precision=self.plan.precision, pad_id=self.tokenizer.eot_id,
                            max_batches=self.cfg.run.eval_batches).mean

    def save(self, val_loss: float | None) -> Path:
        step = self.state.progress.step
        if step in self.saved:
            return self.saved[step]
        check_finite_weights(self.state.model, step, self.last_good())
        weights, state = weights_state_dict(self.state.model), self.state.state_dict()
        ema = self.state.ema
        average = ema.state_dict()["weights"] if ema is not None else None
        self.warn_if_space_is_low(tensor_bytes(weights) + tensor_bytes(state) + tensor_bytes(average))
        self.saved[step] = save_checkpoint(self.out_dir, step, weights, self.tokenizer, self.record, state,
                                           keep=self.cfg.run.keep_checkpoints, val_loss=val_loss, average=average)
        return self.saved[step]

    def warn_if_space_is_low(self, checkpoint_bytes: int) -> None:
        """Once a run: say so before a save may find the disk full."""
        warning = low_space_warning(checkpoints_dir(self.out_dir), checkpoint_bytes)
        if warning is not None and not self.space_warned:
            MetricsLog.warn(warning)
            self.space_warned = True

    def last_good(self) -> Path | None:
        """The newest checkpoint this run can fall back on: finite weights (no save lets others
        through) and a finite validation loss where one was recorded."""
        good = [p for p in list_checkpoints(self.out_dir) if is_finite_checkpoint(p)]
        return good[-1] if good else self.resumed_from


def check_finite_weights(model: torch.nn.Module, step: int, last_good: Path | None) -> None:
    norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in model.parameters()])
    if not bool(torch.isfinite(norms).all()):
        raise non_finite(f"weights became non-finite at step {step}", last_good)


def non_finite(what: str, last_good: Path | None) -> TrainingError:
    """The one-line error of a run whose numbers stopped being finite: nothing from that step is
    saved, so it names the checkpoint to fall back on and what to change."""
    return TrainingError(f"{what}; nothing was saved (last good checkpoint: {last_good or 'none'}); "
                         "start a new run (--out-dir NEW) with a lower --lr, or with --precision fp32")


def _load_source(cfg: TrainConfig, source: Path) -> tuple[Checkpoint, TrainConfig, dict[str, Any]]:
    """A checkpoint to resume, read whole: weights (finite), its config, its training state."""
    ckpt = load_checkpoint(source, expected_model=cfg.model_config())
    check_finite(ckpt.weights, ckpt.path / WEIGHTS)
    saved_cfg = saved_train_config(ckpt.config, ckpt.path / CONFIG)
    check_resumable(saved_cfg, cfg, ckpt.path, branching=bool(cfg.run.resume))
    state = ckpt.load_state()
    if not TrainState.KEYS <= set(state):
        raise DamagedCheckpoint(f"{ckpt.path / STATE} is damaged (it lacks {sorted(TrainState.KEYS - set(state))})")
    if saved_cfg.optim.ema_decay > 0 and (ckpt.average is None or "ema_updates" not in state):
        raise DamagedCheckpoint(f"{ckpt.path} lacks the weight average of its --ema-decay run ({AVERAGE})")
    return ckpt, saved_cfg, state


def _check_folder_holds_same_run(cfg: TrainConfig, checkpoint: Path) -> None:
    saved_cfg = saved_train_config(verified_record(checkpoint), checkpoint / CONFIG)
    check_resumable(saved_cfg, cfg, checkpoint, branching=True)


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
    start = resolve_start(cfg)  # the tokenizer; with --init or --tokenizer also the model's shape (and weights)
    cfg, tokenizer = start.cfg, start.tokenizer
    model_cfg = cfg.model_config()
    machine = probe_machine(cfg)  # before seeding: the peak's random matrices draw from the global RNG
    data = load_dataset(cfg.dataset.data, tokenizer, model_cfg.block_size, cfg.dataset.val_fraction,
                        Path(cfg.dataset.cache_dir) if cfg.dataset.cache_dir else None)
    damage: list[str] = []  # damaged checkpoints passed over, newest first
    found = first_usable(*resume_candidates(cfg), load=lambda path: _load_source(cfg, path), warn=damage.append)
    ckpt, saved_cfg, saved_state = found[1] if found is not None else (None, None, None)
    own = checkpoints_dir(cfg.resolved_out_dir())
    if ckpt is None or ckpt.path.parent.resolve() != own.resolve():  # a branch into a folder holding another run
        first_usable(list(reversed(list_checkpoints(cfg.resolved_out_dir()))), True,
                     load=lambda path: _check_folder_holds_same_run(cfg, path), warn=lambda msg: None)
    plan, notes = _plan_for(cfg, machine, data, tokenizer, ckpt, saved_cfg)
    notes = damage + start.notes + notes
    if machine.warning is not None:
        notes.append(machine.warning)
    state, objective = build_state(cfg, plan, data.train.lengths)
    if ckpt is not None:
        start.check_resumed_tokenizer(ckpt.tokenizer, ckpt.path)
        load_weights(state.model, ckpt.weights, ckpt.path / WEIGHTS)
        state.load_state_dict(saved_state)
    elif start.init is not None:  # --init: the source's weights in place of the random ones
        load_weights(state.model, start.init.weights(model_cfg), start.init.description)
    if cfg.optim.ema_decay > 0:  # the average starts from the weights as they now are
        state.ema = WeightEMA(state.model, cfg.optim.ema_decay)
        if ckpt is not None:
            state.ema.load_state_dict({"updates": saved_state["ema_updates"], "weights": ckpt.average})
    schedule = make_schedule(cfg.optim, plan.total_steps, plan.warmup_steps)
    record = {"train": cfg.to_dict(), "model": dataclasses.asdict(model_cfg), "plan": plan.to_dict()}
    if start.origin is not None:
        record["init"] = start.origin  # where the weights came from
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
               "flops_per_token": plan.flops_per_token, "init": run.record.get("init")})
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
    name = f"from {run.cfg.run.init}" if run.cfg.run.init else run.cfg.preset  # --init: the preset gave no shape
    log.console(f"model {name}: {model.num_parameters() / 1e6:.1f}M parameters on {plan.device} "
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
    prepare_out_dir(out_dir)
    mode = {True: "bar", False: "off", None: "auto"}[show_progress]
    with RunLock(out_dir, warn=MetricsLog.warn), deferred_signals() as signals:
        clean_up_after_crashes(out_dir, warn=MetricsLog.warn)
        if run.resumed_from is None and (kept := set_aside_old_log(out_dir)) is not None:
            MetricsLog.console(f"{out_dir} held no checkpoint: starting afresh (the earlier log is kept as {kept.name})")
        write_atomically(out_dir / CONFIG, json.dumps(run.record, indent=2, sort_keys=True))
        run.warn_if_space_is_low(3 * tensor_bytes(weights_state_dict(run.state.model)))  # weights + AdamW moments
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
    done = progress.step >= total or progress.stopped_early > 0
    final = latest_checkpoint(run.out_dir) if done else None
    if done:
        how = "stopped early" if progress.stopped_early else "complete"
        log.console(f"run already {how} at step {progress.step}; use a new --out-dir to train again")
    elif progress.step == 0:
        val_loss = evaluate_and_log(run, log, report)  # the untrained model: the curve's starting point
        track_best(progress, val_loss, cfg.run.early_stopping)

    def step(micro: list[MicroBatch], lr: float) -> tuple[float, float]:
        return train_step(run.objective, state.optimizer, micro, lr=lr, device=run.device, precision=plan.precision,
                          scaler=state.scaler, grad_clip=cfg.optim.grad_clip)

    window_tokens, window_start = 0, time.perf_counter()
    while not done:
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
            what = (f"loss became {bad.loss} (gradient norm {bad.grad_norm})" if not math.isfinite(bad.loss) else
                    f"gradient norm became {bad.grad_norm} (loss {bad.loss:.4f})")
            raise non_finite(f"{what} at step {progress.step + 1}", run.last_good()) from None
        if state.ema is not None:
            state.ema.update(state.model)
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
            if track_best(progress, val_loss, cfg.run.early_stopping):
                progress.stopped_early = progress.step
        done = progress.step >= total or progress.stopped_early > 0
        if progress.step % cfg.run.save_interval == 0 or done:
            final = run.save(val_loss if evaluated else None)
        window_start += time.perf_counter() - paused
        if progress.stopped_early:
            log.write({"event": "early_stop", "step": progress.step, "best_val_loss": progress.best_val_loss})
            log.console(f"early stopping at step {progress.step}: no better validation loss in "
                        f"{progress.evals_since_best} evaluations (best {progress.best_val_loss:.4f}, "
                        f"checkpoint {best_checkpoint(run.out_dir).name})")
        if on_step is not None:
            on_step(progress.step)
        if signals and not done:
            saved = run.save(None)
            log.write({"event": "interrupted", "step": progress.step, "checkpoint": str(saved)})
            raise Interrupted(signals[0], progress.step, saved)
    return TrainResult(run.out_dir, progress.step, final, val_loss, log.history)


def track_best(progress: Progress, val_loss: float, patience: int | None) -> bool:
    """Record a validation loss; True when early stopping (``patience`` evaluations in a row
    without a new best) says the run is done."""
    if val_loss < progress.best_val_loss:
        progress.best_val_loss, progress.evals_since_best = val_loss, 0
    else:
        progress.evals_since_best += 1
    return patience is not None and progress.evals_since_best >= patience


def evaluate_and_log(run: Run, log: MetricsLog, report: ProgressReporter) -> float:
    report.status("evaluating")
    step = run.state.progress.step
    loss = run.evaluate()
    log.write({"event": "eval", "step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
    if not math.isfinite(loss):
        raise non_finite(f"validation loss became {loss} at step {step}", run.last_good())
    report.message(f"step {step}: val_loss {loss:.4f}, val_ppl {math.exp(min(loss, 50)):.2f}")
    return loss
