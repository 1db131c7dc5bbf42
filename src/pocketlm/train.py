"""Training: ``train(cfg)`` opens a run (``open_run``) and runs its loop (``run_loop``).

Exact resume: the data order is a pure function of (seed, epoch) (see batching.py), each
micro-batch's dropout masks a pure function of (seed, step, place in the step), the run plan is
decided once and read back (plan.py), and a checkpoint holds the weights and the whole
``TrainState`` (optimizer, scaler, progress, batch position). A run restarted from any
checkpoint therefore takes the same steps as one that was never interrupted, bit for bit on a
CPU in fp32.

Several processes (torchrun, see distributed.py): every rank builds the same run; each takes
its share of every step's micro-batches; gradients are summed across ranks once per step
(DDP, or FSDP2 with ``--fsdp``); rank 0 writes the folder, the log and the checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pocketlm.batching import Batch, MicroBatch, collate, dropout_seed, split_batch
from pocketlm.checkpoint import (AVERAGE, CONFIG, STATE, TIED_KEY, WEIGHTS, Checkpoint, best_checkpoint,
                                 check_finite, checkpoints_dir, is_finite_checkpoint, latest_checkpoint,
                                 list_checkpoints, load_checkpoint, load_weights, low_space_warning, save_checkpoint,
                                 tensor_bytes, weights_state_dict)
from pocketlm.config import TrainConfig
from pocketlm.data import Dataset, load_dataset
from pocketlm.device import autocast, resolve_device
from pocketlm.distributed import Ranks, process_group
from pocketlm.errors import DamagedCheckpoint, TrainingError
from pocketlm.evaluate import evaluate_nll
from pocketlm.losses import NextTokenLoss
from pocketlm.metrics import MetricsLog, SilentLog
from pocketlm.model import GPT
from pocketlm.ema import WeightEMA
from pocketlm.optim import Optimizers, Schedule, build_optimizer, make_schedule
from pocketlm.parallelize import apply_data_parallel, apply_fsdp, gradient_sync, prepare_model
from pocketlm.perf import keep_freed_memory_for_reuse, return_freed_memory, throughput
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
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 1.0,
               ranks: Ranks = Ranks()) -> tuple[float, float]:
    """One optimizer step over ``micro_batches``; returns (loss, gradient norm before clipping).

    Each micro-batch's summed NLL is divided by the real-token count of the *whole step*, so the
    accumulated gradient is exactly that of one batch holding every micro-batch (not a mean of
    per-micro-batch means, which over-weights tokens in short micro-batches). The loss and the
    norm come to the host together, once, and are checked before the update: a non-finite step
    raises ``NonFiniteStep`` and changes no weight. (With fp16 loss scaling an infinite norm is the
    scaler's business: it skips that update and lowers the scale.)

    With several ``ranks``, ``micro_batches`` are this rank's share of the step: the token count
    is summed over the ranks first (so the loss is the mean over every real token of the global
    step, not a mean of rank means), gradients are summed across ranks once, on the last
    micro-batch, and the loss returned is the global step's.
    """
    n_tokens = ranks.total(sum(mb.real_tokens for mb in micro_batches))
    total = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        if mb.dropout_seed is not None:
            torch.manual_seed(mb.dropout_seed)
        mb = mb.to(device, non_blocking=True)
        with gradient_sync(objective, i == len(micro_batches) - 1):
            with autocast(device, precision):
                loss = objective(mb.input_ids, mb.targets, mb.position_ids, mb.segment_ids) / n_tokens
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    total = ranks.sum(total)
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
                        log: MetricsLog | SilentLog, *, seed: int | None = None, indices: list[int] | None = None,
                        ranks: Ranks = Ranks()) -> tuple[float, float, int]:
    """Run one optimizer step over ``group`` (``indices``: their places in the global step, for
    their dropout seeds from the run's ``seed``). On an out-of-memory error, halve every
    micro-batch (doubling their number: the same examples, the same effective batch) and run the
    same step again from scratch; ``progress.micro_splits`` remembers it for the rest of the run.
    With several ranks an out-of-memory error ends the run: the ranks cannot retry in step."""
    rng_before = capture_rng()
    progress = state.progress
    indices = list(range(len(group))) if indices is None else indices
    while True:
        pieces = [(i, k, piece) for i, b in zip(indices, group)
                  for k, piece in enumerate(split_batch(b, 2 ** progress.micro_splits))]
        micro = [collate_batch(b) for _, _, b in pieces]
        if seed is not None:
            micro = [dataclasses.replace(m, dropout_seed=dropout_seed(seed, progress.step, i, k))
                     for m, (i, k, _) in zip(micro, pieces)]
        try:
            loss, grad_norm = step(micro)
            return loss, grad_norm, sum(m.real_tokens for m in micro)
        except torch.OutOfMemoryError:
            state.optimizer.zero_grad()
            del micro
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if ranks.distributed:
                raise TrainingError(f"out of memory on rank {ranks.rank} at step {progress.step + 1}; resume with a "
                                    "smaller --batch-size (and a larger --grad-accum), or --fsdp, or "
                                    "--checkpointing full") from None
            if all(len(b.rows) <= 1 for _, _, b in pieces):
                raise TrainingError(f"out of memory at step {progress.step + 1} even with one sequence per "
                                    "micro-batch; try --checkpointing full or a smaller --vram") from None
            restore_rng(rng_before)  # without seeds, the retry draws the same dropout masks
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
    main: bool = True
    """Whether this process is rank 0 (the one that reports)."""


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
    ranks: Ranks = Ranks()
    cpu_memory_reuse: bool = False
    """Whether freed large blocks stay in the process for reuse (``perf.keep_freed_memory_for_reuse``)."""
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

    def share(self, group: list[Batch]) -> tuple[list[int], list[Batch], Callable[[Batch], MicroBatch]]:
        """This rank's micro-batches of a step, their places in it, and how to collate them. A rank
        left without one (an epoch's short last step) runs the step's first with nothing to predict."""
        mine = self.ranks.share(group)
        if not mine:
            return [0], group[:1], lambda batch: self.collate(batch).without_targets()
        return [i for i, _ in mine], [b for _, b in mine], self.collate

    def evaluate(self) -> float:
        """The validation loss, of the weight average when the run keeps one. Every rank evaluates
        (a sharded model needs them all); rank 0's figure is everyone's."""
        ema = self.state.ema
        with ema.applied(self.state.model) if ema is not None else contextlib.nullcontext():
            return float(self.ranks.broadcast_json(self._evaluate()))

    def _evaluate(self) -> float:
        return evaluate_nll(self.state.model, self.data.validation, batch_size=self.plan.batch_size,
                            device=self.device, precision=self.plan.precision, pad_id=self.tokenizer.eot_id,
                            max_batches=self.cfg.run.eval_batches).mean

    def save(self, val_loss: float | None) -> Path | None:
        """Save this step's checkpoint (rank 0 writes it; returns its path there, None elsewhere)."""
        step = self.state.progress.step
        if step in self.saved:
            return self.saved[step]
        check_finite_weights(self.state.model, step, self.last_good(), self.ranks)
        weights, state = self.whole_state()
        ema = self.state.ema
        average = ema.state_dict()["weights"] if ema is not None else None

        def write() -> Path:
            self.warn_if_space_is_low(tensor_bytes(weights) + tensor_bytes(state) + tensor_bytes(average))
            return save_checkpoint(self.out_dir, step, weights, self.tokenizer, self.record, state,
                                   keep=self.cfg.run.keep_checkpoints, val_loss=val_loss, average=average)

        self.saved[step] = self.ranks.on_main("save a checkpoint", write)  # type: ignore[assignment]
        return self.saved[step]

    def whole_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The weights and training state to save, whole: gathered from every rank's shards under
        --fsdp (a collective), else rank 0's own (the other ranks hold the same)."""
        if self.plan.fsdp:
            from pocketlm.sharded_state import full_weights

            weights = {k: v for k, v in full_weights(self.state.model).items() if k != TIED_KEY}
            return weights, self.state.state_dict()
        if not self.ranks.is_main:
            return {}, {}
        return weights_state_dict(self.state.model), self.state.state_dict()

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


def check_finite_weights(model: torch.nn.Module, step: int, last_good: Path | None, ranks: Ranks = Ranks()) -> None:
    """One-line error (on every rank) unless every weight is finite; each rank checks its own shards."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in local])
    if ranks.any(not bool(torch.isfinite(norms).all())):
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


def build_state(cfg: TrainConfig, plan: RunPlan, train_lengths: np.ndarray, *,
                weights: dict[str, torch.Tensor] | None = None,
                weights_source: Path | str = "checkpoint") -> tuple[TrainState, torch.nn.Module]:
    """The model as the plan says to train it (with ``weights`` loaded, else as the seed draws
    it), its optimizer and objective, and fresh progress. Seeds torch first: the initial weights
    follow from the seed. Under several ranks the model is wrapped for data parallelism or
    sharded (after loading: each rank keeps its slice of the whole weights)."""
    device = torch.device(plan.device)
    if plan.cpu_threads and torch.get_num_threads() != plan.cpu_threads:
        torch.set_num_threads(plan.cpu_threads)
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model_config()).to(device)
    if weights is not None:
        load_weights(model, weights, weights_source)
    several = plan.world_size > 1
    prepare_model(model, device_type=device.type, compiled=plan.compiled, checkpointing=plan.checkpointing,
                  full_blocks=plan.full_checkpoint_blocks, low_memory=plan.low_memory, single_process=not several)
    if plan.fsdp:
        apply_fsdp(model, plan.precision)
    optimizers = build_optimizer(model, cfg.optim, device, low_memory=plan.low_memory)
    if plan.fsdp:
        from pocketlm.sharded_state import ShardedOptimizers

        optimizers = ShardedOptimizers(optimizers.optimizers, model)
    # Several ranks: the output layer's gradient goes through autograd, where DDP and FSDP see it.
    objective: torch.nn.Module = NextTokenLoss(model, compiled=plan.compiled, accumulate_grad=not several,
                                               weight_grad_sink=optimizers.weight_grad_sink)
    if several and not plan.fsdp:
        objective = apply_data_parallel(objective, device)
    scaler = torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None
    stream = BatchStream(cfg.dataset.batching, train_lengths, plan.batch_size, cfg.model_config().block_size,
                         cfg.run.seed)
    return TrainState(model, optimizers, scaler, Progress(), stream), objective


def open_run(cfg: TrainConfig, ranks: Ranks = Ranks()) -> Run:
    """Check the inputs, then the run folder; plan (or read the plan back); build the state and
    load the checkpoint being resumed. Writes nothing. Every rank opens the run; they must agree
    on the settings, the data and the checkpoint, and all take rank 0's plan."""
    start = resolve_start(cfg)  # the tokenizer; with --init or --tokenizer also the model's shape (and weights)
    cfg, tokenizer = start.cfg, start.tokenizer
    model_cfg = cfg.model_config()
    # before seeding: the peak's random matrices draw from the global RNG
    machine = dataclasses.replace(probe_machine(cfg), world_size=ranks.world_size)
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
    plan = RunPlan.from_dict(ranks.broadcast_json(plan.to_dict()))  # rank 0's measured peak and compile choice
    ranks.check_same({"settings": cfg.to_dict(), "data": data_fingerprint(data),
                      "resumed checkpoint": ckpt.path.name if ckpt is not None else None})
    notes = damage + start.notes + notes
    if machine.warning is not None:
        notes.append(machine.warning)
    if ckpt is not None:
        start.check_resumed_tokenizer(ckpt.tokenizer, ckpt.path)
        state, objective = build_state(cfg, plan, data.train.lengths, weights=ckpt.weights,
                                       weights_source=ckpt.path / WEIGHTS)
        state.load_state_dict(saved_state)
    elif start.init is not None:  # --init: the source's weights in place of the random ones
        state, objective = build_state(cfg, plan, data.train.lengths, weights=start.init.weights(model_cfg),
                                       weights_source=start.init.description)
    else:
        state, objective = build_state(cfg, plan, data.train.lengths)
    if cfg.optim.ema_decay > 0:  # the average starts from the weights as they now are
        state.ema = WeightEMA(state.model, cfg.optim.ema_decay)
        if ckpt is not None:
            state.ema.load_state_dict({"updates": saved_state["ema_updates"], "weights": ckpt.average})
    schedule = make_schedule(cfg.optim, plan.total_steps, plan.warmup_steps)
    record = {"train": cfg.to_dict(), "model": dataclasses.asdict(model_cfg), "plan": plan.to_dict()}
    if start.origin is not None:
        record["init"] = start.origin  # where the weights came from
    return Run(cfg, plan, tokenizer, data, state, objective, schedule, record,
               ckpt.path if ckpt is not None else None, notes, ranks)


def data_fingerprint(data: Dataset) -> dict[str, Any]:
    """Enough of the tokenized data to tell two ranks' copies apart."""
    lengths = np.ascontiguousarray(data.train.lengths, dtype=np.int64)
    return {"train_tokens": data.train.n_tokens, "val_tokens": data.validation.n_tokens,
            "lengths_sha256": hashlib.sha256(lengths.tobytes()).hexdigest()}


def start_log(run: Run, log: MetricsLog) -> None:
    model, plan = run.state.model, run.plan
    log.write({"event": "start", "n_params": model.num_parameters(), "device": plan.device,
               "precision": plan.precision, "config": run.record, "data": run.data.corpus.description,
               "train_tokens": run.data.train.n_tokens, "val_tokens": run.data.validation.n_tokens,
               "total_steps": plan.total_steps, "resumed_from": str(run.resumed_from) if run.resumed_from else None,
               "start_step": run.state.progress.step, "compiled": plan.compiled,
               "cpu_memory_reuse": run.cpu_memory_reuse,
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
    progress lines otherwise. Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) this
    process is one rank of the run; only rank 0 writes to the run folder and prints."""
    ranks = Ranks.from_env()
    device_type = resolve_device(cfg.run.device).type
    if device_type == "cpu" and cfg.memory.fsdp and ranks.distributed:
        return_freed_memory()  # before the model exists: a sharded run is about memory (see perf.py)
    with process_group(ranks, device_type):
        run = open_run(cfg, ranks)
        run.cpu_memory_reuse = run.plan.device == "cpu" and not run.plan.fsdp and keep_freed_memory_for_reuse()
        mode = {True: "bar", False: "off", None: "auto"}[show_progress] if ranks.is_main else "off"
        with contextlib.ExitStack() as stack:
            signals = stack.enter_context(deferred_signals())
            log = ranks.on_main("open the run folder", lambda: open_run_folder(run, stack)) or SilentLog()
            report = stack.enter_context(contextlib.closing(
                ProgressReporter(run.plan.total_steps, run.state.progress.step, mode)))
            if ranks.is_main:
                start_log(run, log)
            return run_loop(run, log, report, signals, on_step)


def open_run_folder(run: Run, stack: contextlib.ExitStack) -> MetricsLog:
    """Take the run folder (its lock held until ``stack`` closes), tidy it and open its log."""
    out_dir = run.out_dir
    prepare_out_dir(out_dir)
    stack.enter_context(RunLock(out_dir, warn=MetricsLog.warn))
    clean_up_after_crashes(out_dir, warn=MetricsLog.warn)
    if run.resumed_from is None and (kept := set_aside_old_log(out_dir)) is not None:
        MetricsLog.console(f"{out_dir} held no checkpoint: starting afresh (the earlier log is kept as {kept.name})")
    write_atomically(out_dir / CONFIG, json.dumps(run.record, indent=2, sort_keys=True))
    n_params = sum(p.numel() for p in run.state.model.parameters())  # whole tensors, sharded or not
    run.warn_if_space_is_low(3 * 4 * n_params)  # fp32 weights + AdamW moments
    return stack.enter_context(contextlib.closing(MetricsLog(out_dir)))


def run_loop(run: Run, log: MetricsLog | SilentLog, report: ProgressReporter, signals: list[int],
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
                          scaler=state.scaler, grad_clip=cfg.optim.grad_clip, ranks=run.ranks)

    window_tokens, window_start = 0, time.perf_counter()
    while not done:
        if state.stream.starts_epoch:
            stats = state.stream.epoch_stats()
            log.write({"event": "epoch", "epoch": state.stream.epoch, "real_tokens": stats.real_tokens,
                       "padded_tokens": stats.padded_tokens, "padding_fraction": stats.padding_fraction})
        group = state.stream.next_group(plan.grad_accum)
        indices, mine, collate_mine = run.share(group)
        lr = run.schedule.lr(progress.step)
        if plan.compiled and progress.step == first_step:
            report.status(f"compiling (about {COMPILE_SECONDS_ESTIMATE} s, first steps only)")
        try:
            loss, grad_norm, _ = step_halving_on_oom(lambda m: step(m, lr), mine, state, collate_mine, run.device,
                                                     log, seed=cfg.run.seed, indices=indices, ranks=run.ranks)
        except NonFiniteStep as bad:
            what = (f"loss became {bad.loss} (gradient norm {bad.grad_norm})" if not math.isfinite(bad.loss) else
                    f"gradient norm became {bad.grad_norm} (loss {bad.loss:.4f})")
            raise non_finite(f"{what} at step {progress.step + 1}", run.last_good()) from None
        if state.ema is not None:
            state.ema.update(state.model)
        progress.step += 1
        step_tokens = sum(b.real_tokens for b in group)
        progress.tokens_seen += step_tokens
        state.stream.advance(len(group))
        window_tokens += step_tokens
        speed = throughput(window_tokens, time.perf_counter() - window_start, plan.flops_per_token,
                           plan.peak_flops * plan.world_size if plan.peak_flops else None)  # all ranks' tokens
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
        if run.ranks.any(bool(signals)) and not done:  # a signal to any rank stops them all
            saved = run.save(None)
            log.write({"event": "interrupted", "step": progress.step, "checkpoint": str(saved)})
            raise Interrupted(signals[0] if signals else signal.SIGTERM, progress.step, saved)
    return TrainResult(run.out_dir, progress.step, final, val_loss, log.history, run.ranks.is_main)


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
