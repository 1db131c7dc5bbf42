"""The training loop: accumulation, cosine LR, mixed precision, evaluation, crash-safe checkpoints.

Exact resume: the data order is a pure function of (seed, epoch) (see batching.py), and a
checkpoint holds the weights, optimizer, schedule, scaler, RNG states and the position inside
the epoch. A run restarted from any checkpoint therefore takes the same steps as one that was
never interrupted, bit for bit on a CPU in fp32.
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

import torch
from tqdm import tqdm

from pocketlm.batching import Batch, MicroBatch, PaddingStats, collate, epoch_batches, split_batch
from pocketlm.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from pocketlm.config import TrainConfig
from pocketlm.data import ExampleSet, load_dataset
from pocketlm.device import autocast, resolve_device, resolve_precision
from pocketlm.errors import ConfigError, TrainingError
from pocketlm.lowmem import LowMemoryAdamW
from pocketlm.metrics import MetricsLog
from pocketlm.model import GPT, decay_groups
from pocketlm.perf import flops_per_token, keep_freed_memory_for_reuse, known_peak_flops, measure_matmul_peak, throughput
from pocketlm.planner import GiB, FitChoice, fit_to_budget, parse_size
from pocketlm.tokenizer import get_tokenizer

# Fields that may differ when a run is resumed: they change how it is watched, not its result.
RUNTIME_FIELDS = {"out_dir", "resume", "device", "eval_interval", "save_interval",
                  "keep_checkpoints", "log_interval", "cache_dir", "eval_batches",
                  "checkpointing", "full_checkpoint_blocks", "compile"}


@dataclass
class CosineSchedule:
    """Linear warmup to the peak, then cosine decay to ``min_ratio`` of it at ``total_steps``."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_ratio: float = 0.1

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        floor = self.peak_lr * self.min_ratio
        return floor + 0.5 * (self.peak_lr - floor) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Progress:
    """Where the run is: ``micro_index`` is the next micro-batch of epoch ``epoch``."""

    step: int = 0
    epoch: int = 0
    micro_index: int = 0
    tokens_seen: int = 0
    micro_splits: int = 0  # out-of-memory halvings so far: each micro-batch runs as 2**k pieces


# Auto-compile only for runs with at least this many seconds of work at the device's matmul peak
# (steps x tokens per step x model FLOPs per token / peak). Measured on the 2-core CPU: gpt2-125m
# compiles in ~35 s and saves ~3.6 s per step, and bucket batching's second shape recompiles with
# symbolic sizes in ~50 s more, so it breaks even after 10-24 steps of 2.6 s each at peak (~26-62 s);
# the tiny preset repays its ~70 s only after ~1,750 steps of 0.033 s (~58 s). See
# docs/benchmarks.md, Throughput. A step count alone cannot serve both.
COMPILE_MIN_PEAK_SECONDS = 60.0


def work_seconds_at_peak(total_steps: int, tokens_per_step: int, flops_per_tok: float,
                         peak_flops: float | None) -> float | None:
    """How long the run's model FLOPs would take at the device's matmul peak; None if unknown."""
    if not peak_flops:
        return None
    return total_steps * tokens_per_step * flops_per_tok / peak_flops


def should_compile(cfg: TrainConfig, device: torch.device, work_at_peak_s: float | None) -> bool:
    """``--compile`` / ``--no-compile`` as given; auto: on CPU and CUDA when the run holds at least
    ``COMPILE_MIN_PEAK_SECONDS`` of work at peak (MPS support in torch.compile is still partial)."""
    if cfg.compile is not None:
        return cfg.compile
    return (device.type in ("cpu", "cuda") and work_at_peak_s is not None
            and work_at_peak_s >= COMPILE_MIN_PEAK_SECONDS)


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


def build_model(cfg: TrainConfig, device: torch.device, *, compiled: bool = False) -> GPT:
    """The model as training uses it: ``--low-memory`` implies full activation checkpointing."""
    model = GPT(cfg.model_config()).to(device)
    model.set_checkpointing("full" if cfg.low_memory else cfg.checkpointing, cfg.full_checkpoint_blocks)
    if compiled:
        model.compile_blocks()
    return model


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.low_memory:
        optimizer = LowMemoryAdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        head = model.lm_head.weight
        model.weight_grad_sink = lambda grad: optimizer.accumulate(head, grad)
        return optimizer
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one kernel for the whole update, and no foreach temporaries
    return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), **kwargs)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, micro_batches: list[MicroBatch], *,
               lr: float, device: torch.device, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``micro_batches``; returns (loss, grad norm) as tensors.

    Each micro-batch's summed NLL is divided by the real-token count of the *whole step*, so the
    accumulated gradient is exactly that of one batch holding every micro-batch (not a mean of
    per-micro-batch means, which over-weights tokens in short micro-batches).
    """
    n_tokens = sum(mb.real_tokens for mb in micro_batches)
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        mb = mb.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = model.nll_sum(mb.input_ids, mb.targets, position_ids=mb.position_ids,
                                 segment_ids=mb.segment_ids) / n_tokens
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if isinstance(optimizer, LowMemoryAdamW):  # its gradients live in its own bf16 buffers
        grad_norm = optimizer.clip_grad_norm_(grad_clip)
    elif grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def evaluate_loss(model: GPT, examples: ExampleSet, *, batch_size: int, device: torch.device,
                  precision: str = "fp32", pad_id: int = 0, max_batches: int | None = None) -> tuple[float, int]:
    """Mean NLL per real token over ``examples`` (length-bucketed, fixed order), and the token count."""
    was_training = model.training
    model.eval()
    batches = epoch_batches("bucket", examples.lengths, batch_size, model.config.block_size, seed=0, epoch=0)
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches[:max_batches]:
        mb = collate(examples, batch, pad_id).to(device)
        with autocast(device, precision):
            nll += model.nll_sum(mb.input_ids, mb.targets, position_ids=mb.position_ids,
                                 segment_ids=mb.segment_ids).double()
        count += mb.real_tokens
    model.train(was_training)
    return (nll.item() / count if count else float("nan")), count


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


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    final_checkpoint: Path | None
    val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


# An explicit --resume may also change the run's length (e.g. to train a finished run further);
# the LR schedule is then laid out for the new length.
LENGTH_FIELDS = {"max_steps", "epochs"}


def check_resumable(saved: dict[str, Any], current: dict[str, Any], out_dir: Path,
                    allowed: set[str] = RUNTIME_FIELDS) -> None:
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in allowed and saved.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing[:4])
        raise ConfigError(f"{out_dir} holds a run with different settings ({details}); "
                          "use a new --out-dir to start another run")


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def apply_memory_budget(cfg: TrainConfig, device: torch.device, precision: str) -> tuple[TrainConfig, FitChoice | None]:
    """With ``--vram``, the micro-batch, accumulation and checkpointing that the planner fits."""
    if not cfg.vram:
        return cfg, None
    if cfg.vram == "auto":
        if device.type != "cuda":
            raise ConfigError("--vram auto reads free GPU memory and needs CUDA; give a size such as 4GB")
        budget = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    else:
        budget = parse_size(cfg.vram)
    choice = fit_to_budget(cfg.model_config(), budget, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                           precision=precision, device=device.type, low_memory=cfg.low_memory)
    fitted = dataclasses.replace(cfg, batch_size=choice.batch_size, grad_accum=choice.grad_accum,
                                 checkpointing=choice.checkpointing,
                                 full_checkpoint_blocks=choice.full_checkpoint_blocks)
    return fitted, choice


def step_halving_on_oom(step: Callable[[list[MicroBatch]], tuple[torch.Tensor, torch.Tensor]], group: list[Batch],
                        progress: Progress, examples: ExampleSet, pad_id: int, optimizer: torch.optim.Optimizer,
                        device: torch.device, log: MetricsLog) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run one optimizer step over ``group``. On an out-of-memory error, halve every micro-batch
    (doubling their number: the same examples, the same effective batch) and run the same step
    again from scratch; ``progress.micro_splits`` remembers it for the rest of the run."""
    rng_before = capture_rng()
    while True:
        pieces = [piece for b in group for piece in split_batch(b, 2 ** progress.micro_splits)]
        micro = [collate(examples, b, pad_id) for b in pieces]
        try:
            loss, grad_norm = step(micro)
            return loss, grad_norm, sum(m.real_tokens for m in micro)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
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


def train(cfg: TrainConfig, *, on_step: Callable[[int], None] | None = None,
          show_progress: bool | None = None) -> TrainResult:
    """Run (or resume) training as ``cfg`` says. ``on_step`` is called after each optimizer step."""
    out_dir = cfg.resolved_out_dir()
    model_cfg = cfg.model_config()
    run_file = out_dir / "config.json"
    resume_from = Path(cfg.resume) if cfg.resume else latest_checkpoint(out_dir)
    if run_file.is_file():
        check_resumable(json.loads(run_file.read_text())["train"], cfg.to_dict(), out_dir)

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    requested, (cfg, memory_fit) = cfg, apply_memory_budget(cfg, device, precision)
    tokenizer = get_tokenizer("gpt2")
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    data = load_dataset(cfg.data, tokenizer, model_cfg.block_size, cfg.val_fraction,
                        Path(cfg.cache_dir) if cfg.cache_dir else None)

    config_record = {"train": requested.to_dict(), "model": dataclasses.asdict(model_cfg),
                     "applied": {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                                 "checkpointing": cfg.checkpointing,
                                 "full_checkpoint_blocks": cfg.full_checkpoint_blocks}}
    batches_per_epoch = len(epoch_batches(cfg.batching, data.train.lengths, cfg.batch_size,
                                          model_cfg.block_size, cfg.seed, 0))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    peak_flops, peak_source = device_peak_flops(device, precision)
    train_flops_per_token = flops_per_token(model_cfg, model_cfg.block_size)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.block_size  # at most
    # The whole run's work, not what is left of it: a resumed run must take the same (compiled or
    # eager) path as the uninterrupted one to stay bit-identical with it.
    compiled = should_compile(cfg, device, work_seconds_at_peak(total_steps, tokens_per_step,
                                                                train_flops_per_token, peak_flops))
    reuses_memory = device.type == "cpu" and keep_freed_memory_for_reuse()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device, compiled=compiled)
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    schedule = CosineSchedule(cfg.lr, total_steps, min(cfg.warmup_steps, total_steps // 10), cfg.min_lr_ratio)
    progress = Progress()

    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, expected_model=model_cfg)
        check_resumable(ckpt.config["train"], requested.to_dict(), ckpt.path,
                        RUNTIME_FIELDS | LENGTH_FIELDS if cfg.resume else RUNTIME_FIELDS)
        load_weights(model, ckpt.weights, ckpt.path)
        state = ckpt.load_state()
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        restore_rng(state["rng"])

    out_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(config_record, indent=2, sort_keys=True))
    log = MetricsLog(out_dir)
    log.write({"event": "start", "n_params": model.num_parameters(), "device": str(device),
               "precision": precision, "config": config_record, "data": data.corpus.description,
               "train_tokens": data.train.n_tokens, "val_tokens": data.validation.n_tokens,
               "total_steps": total_steps, "resumed_from": str(resume_from) if resume_from else None,
               "start_step": progress.step, "compiled": compiled, "cpu_memory_reuse": reuses_memory,
               "peak_flops": peak_flops, "peak_flops_source": peak_source,
               "flops_per_token": train_flops_per_token})
    if memory_fit is not None:
        log.write({"event": "memory_plan", "vram": requested.vram, "predicted_peak_bytes": memory_fit.plan.total,
                   **config_record["applied"]})
        log.console(f"--vram {requested.vram}: micro-batch {cfg.batch_size} x {cfg.grad_accum} accumulation, "
                    f"{cfg.checkpointing} checkpointing ({cfg.full_checkpoint_blocks} full blocks); "
                    f"predicted peak {memory_fit.plan.total / GiB:.2f} GiB")
    log.console(f"model {cfg.preset}: {model.num_parameters() / 1e6:.1f}M parameters on {device} ({precision}"
                f"{', compiled' if compiled else ''}); {data.train.n_tokens:,} training tokens; {total_steps} steps"
                + (f"; resuming at step {progress.step}" if progress.step else ""))

    def state_dict() -> dict[str, Any]:
        return {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "progress": dataclasses.asdict(progress), "rng": capture_rng()}

    def save() -> Path:
        return save_checkpoint(out_dir, progress.step, model, tokenizer, config_record, state_dict(),
                               keep=cfg.keep_checkpoints)

    def run_eval() -> float:
        loss, _ = evaluate_loss(model, data.validation, batch_size=cfg.batch_size, device=device,
                                precision=precision, pad_id=tokenizer.eot_id, max_batches=cfg.eval_batches)
        log.write({"event": "eval", "step": progress.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        return loss

    model.train()
    val_loss: float | None = None
    final: Path | None = latest_checkpoint(out_dir) if progress.step >= total_steps else None
    if progress.step >= total_steps:
        log.console(f"run already complete at step {progress.step}; use a new --out-dir to train again")
    batches = epoch_batches(cfg.batching, data.train.lengths, cfg.batch_size, model_cfg.block_size,
                            cfg.seed, progress.epoch)
    bar = tqdm(total=total_steps, initial=progress.step, unit="step", dynamic_ncols=True,
               disable=(not show_progress) if show_progress is not None else None)
    if progress.step == 0 and total_steps > 0:
        baseline = run_eval()  # the untrained model: the curve's starting point
        bar.write(f"step 0: val_loss {baseline:.4f}, val_ppl {math.exp(min(baseline, 50)):.2f}")
    window_tokens, window_start = 0, time.perf_counter()
    with deferred_signals() as signals, contextlib.closing(log), contextlib.closing(bar):
        while progress.step < total_steps:
            if progress.micro_index == 0:
                stats = PaddingStats.of(batches)
                log.write({"event": "epoch", "epoch": progress.epoch, "real_tokens": stats.real_tokens,
                           "padded_tokens": stats.padded_tokens, "padding_fraction": stats.padding_fraction})
            group = batches[progress.micro_index:progress.micro_index + cfg.grad_accum]
            lr = schedule.lr(progress.step)

            def step(micro: list[MicroBatch], lr: float = lr) -> tuple[torch.Tensor, torch.Tensor]:
                return train_step(model, optimizer, micro, lr=lr, device=device, precision=precision,
                                  scaler=scaler, grad_clip=cfg.grad_clip)

            loss, grad_norm, step_tokens = step_halving_on_oom(step, group, progress, data.train, tokenizer.eot_id,
                                                               optimizer, device, log)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                kept = latest_checkpoint(out_dir) or resume_from
                raise TrainingError(f"loss became {loss_value} at step {progress.step + 1}; nothing was saved "
                                    f"(last good checkpoint: {kept or 'none'}); try a lower --lr or --precision fp32")
            progress.step += 1
            progress.tokens_seen += step_tokens
            progress.micro_index += len(group)
            if progress.micro_index >= len(batches):
                progress.epoch += 1
                progress.micro_index = 0
                batches = epoch_batches(cfg.batching, data.train.lengths, cfg.batch_size,
                                        model_cfg.block_size, cfg.seed, progress.epoch)
            window_tokens += step_tokens
            if progress.step % cfg.log_interval == 0 or progress.step == total_steps:
                speed = throughput(window_tokens, time.perf_counter() - window_start, train_flops_per_token,
                                   peak_flops)
                log.write({"event": "step", "step": progress.step, "epoch": progress.epoch, "loss": loss_value,
                           "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": speed.tokens_per_s,
                           "mfu": speed.mfu, "tokens_seen": progress.tokens_seen})
                window_tokens, window_start = 0, time.perf_counter()
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed.tokens_per_s:.0f}",
                                mfu=f"{speed.mfu:.0%}" if speed.mfu is not None else "?")
            bar.update(1)
            paused = time.perf_counter()  # evaluation and saving are not training time
            if progress.step % cfg.eval_interval == 0 or progress.step == total_steps:
                val_loss = run_eval()
                bar.write(f"step {progress.step}: val_loss {val_loss:.4f}, val_ppl {math.exp(min(val_loss, 50)):.2f}")
            if progress.step % cfg.save_interval == 0 or progress.step == total_steps:
                final = save()
            window_start += time.perf_counter() - paused
            if on_step is not None:
                on_step(progress.step)
            if signals and progress.step < total_steps:
                saved = save()
                log.write({"event": "interrupted", "step": progress.step, "checkpoint": str(saved)})
                raise Interrupted(signals[0], progress.step, saved)
    return TrainResult(out_dir, progress.step, final, val_loss, log.history)
