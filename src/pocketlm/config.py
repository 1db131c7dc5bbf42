"""Configuration dataclasses: one per component, each field documented.

The YAML files a user passes with ``--config`` mirror these dataclasses key for key,
and every command-line flag overrides the matching field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pocketlm.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT. Parameter names follow Hugging Face GPT-2 (see model.py)."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 768
    """Width of the residual stream."""
    block_size: int = 512
    """Context length in tokens (size of the learned position table)."""
    vocab_size: int = 50257
    """Tokenizer vocabulary size (GPT-2 BPE by default)."""
    dropout: float = 0.1
    """Dropout on the embeddings and on each block's attention and MLP outputs during training."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities. Off by default: any value above 0 makes PyTorch's
    CPU attention fall back to a kernel that materialises every (T x T) probability matrix,
    which cost 1.9 GiB more peak memory and was slower on the seed workload."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon, as in GPT-2."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")


PRESETS: dict[str, ModelConfig] = {
    # GPT-2 small with the original project's 512-token context: about 124M parameters.
    "gpt2-125m": ModelConfig(),
    # A few million parameters (mostly the embedding table): a CPU step in well under a second.
    "tiny": ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=128, dropout=0.1),
}


def model_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


BATCHING_CHOICES = ("bucket", "pack", "random")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
CHECKPOINTING_CHOICES = ("none", "selective", "full")


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the original project's recipe."""

    preset: str = "gpt2-125m"
    """Model preset; see ``PRESETS``."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of individual ``ModelConfig`` fields on top of the preset (YAML only)."""
    data: str | None = None
    """Text source: a WikiText directory, a text file, a directory of .txt files, or
    ``hf:NAME[:CONFIG]`` for a Hugging Face dataset. None means the Hub's WikiText-2."""
    val_fraction: float = 0.1
    """Share of documents held out for validation when the source has no validation split."""
    cache_dir: str | None = None
    """Where token caches live; default ``$POCKETLM_CACHE`` or ``~/.cache/pocketlm``."""
    out_dir: str | None = None
    """Run directory; default ``runs/<preset>``. Re-running with the same one resumes."""
    resume: str | None = None
    """Resume from this checkpoint directory instead of the out dir's latest."""
    epochs: int = 3
    """Passes over the training set (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; overrides ``epochs``."""
    batch_size: int = 4
    """Micro-batch size in sequences; with ``block_size`` it sets the token budget per micro-batch."""
    grad_accum: int = 4
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup length, capped at 10% of the run's steps."""
    weight_decay: float = 0.1
    """AdamW decay, applied to tensors of two or more dimensions only."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    batching: str = "bucket"
    """Batch schedule: bucket (length-grouped), pack (no padding), random (baseline)."""
    device: str = "auto"
    """auto picks cuda, then mps, then cpu."""
    precision: str = "auto"
    """auto: bf16 where the device has it, fp16 with loss scaling on older GPUs, else fp32."""
    seed: int = 1337
    """Seeds initialisation, data order and dropout."""
    eval_interval: int = 250
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_batches: int | None = None
    """Cap on validation micro-batches per evaluation (None: the whole split)."""
    save_interval: int = 250
    """Save a checkpoint every this many steps (and at the end, and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    log_interval: int = 10
    """Write a step line to metrics.jsonl every this many steps."""
    checkpointing: str = "selective"
    """Activation checkpointing: selective (keep matmul and attention outputs, recompute the
    cheap ops in backward), full (keep only block inputs), or none. Same results, less memory."""
    low_memory: bool = False
    """Gradients and AdamW moments in bf16 (weights stay fp32) and full activation
    checkpointing: about 1.4 GiB instead of 2.4 on the seed workload. Not with fp16."""
    vram: str | None = None
    """Memory budget such as ``4GB`` (or ``auto`` on CUDA: the free memory). The planner then
    picks micro-batch, accumulation and checkpointing that fit, keeping the effective batch."""
    full_checkpoint_blocks: int = 2
    """With selective checkpointing, also recompute this many blocks fully (more memory saved,
    more compute)."""
    compile: bool | None = None
    """Compile the transformer blocks with ``torch.compile``. None (auto): on for CPU and CUDA
    runs long enough for the speed-up to outweigh the compile time (``train.should_compile``:
    at least a minute of model FLOPs at the device's matmul peak), off otherwise."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")

        for name in ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "eval_interval",
                     "save_interval", "keep_checkpoints", "log_interval", "eval_batches"):
            positive(name)
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("--warmup-steps, --weight-decay and --grad-clip must not be negative")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.low_memory and self.precision == "fp16":
            raise ConfigError("--low-memory keeps gradients in bf16 and cannot be combined with --precision fp16")
        if self.full_checkpoint_blocks < 0:
            raise ConfigError(f"--full-checkpoint-blocks must not be negative, got {self.full_checkpoint_blocks}")
        for name, choices in (("batching", BATCHING_CHOICES), ("device", DEVICE_CHOICES),
                              ("precision", PRECISION_CHOICES), ("checkpointing", CHECKPOINTING_CHOICES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        model_preset(self.preset)
        self.model_config()  # validates the overrides

    def model_config(self) -> ModelConfig:
        base = model_preset(self.preset)
        known = {f.name for f in fields(ModelConfig)}
        unknown = set(self.model) - known
        if unknown:
            raise ConfigError(f"unknown model field(s) in config: {', '.join(sorted(unknown))}")
        return dataclasses.replace(base, **self.model)

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.preset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a plain dict, with one-line errors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return raw


def build_train_config(yaml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Preset defaults, then the YAML file, then explicit overrides (None means 'not given')."""
    values: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown field(s) in {yaml_path}: {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"bad config: {exc}") from None
