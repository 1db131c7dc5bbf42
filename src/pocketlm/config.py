"""Configuration: one small frozen dataclass per concern, each field written once.

A field's type (``Literal`` for choices), default, docstring and ``setting(...)`` metadata (its
range, and whether a resumed run may change it) are all that the YAML loader, the validation
and the command line need: ``pocketlm train --help`` is generated from them (see cli.py).

Every leaf field has a name unique across the sections, so a value can be given flat: as the
flag ``--warmup-steps``, the YAML key ``warmup_steps:`` (or ``optim: {warmup_steps: ...}``), or
``build_train_config(warmup_steps=...)``. The same validation applies to all three, before
anything touches the disk: integers must be integers, rates finite and in range, choices one
of their ``Literal`` values.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pocketlm.errors import ConfigError

# What a resumed run may do with a field (``setting(on_resume=...)``).
FIXED = "fixed"  # must equal the run's value: it changes the result
FREE = "free"  # may change on any resume: it changes how the run is watched or run, not its result
LENGTH = "length"  # may change when branching from a checkpoint with --resume (train further)
LAUNCH = "launch"  # how this launch runs: taken from this command only, never from the run being resumed


def setting(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, on_resume: str = FIXED,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its valid range and resume rule in its metadata."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "on_resume": on_resume}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Validation, shared by every config dataclass


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(f: dataclasses.Field) -> str:
    bounds = []
    m = f.metadata
    if m.get("gt") is not None:
        bounds.append(f"> {m['gt']}")
    if m.get("ge") is not None:
        bounds.append(f">= {m['ge']}")
    if m.get("lt") is not None:
        bounds.append(f"< {m['lt']}")
    if m.get("le") is not None:
        bounds.append(f"<= {m['le']}")
    return " and ".join(bounds)


def optional_type(hint: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), type(None) in args
    return hint, False


def coerce(value: Any, hint: Any) -> Any:
    """YAML reads ``3e-4`` as a string (YAML 1.1 wants ``3.0e-4``) and ``1`` as an int: both are
    fine where a float is expected. Nothing else is converted."""
    kind, _ = optional_type(hint)
    if kind is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
    return value


def check_value(name: str, value: Any, hint: Any, f: dataclasses.Field | None = None) -> None:
    """One-line ``ConfigError`` unless ``value`` has the field's type and lies in its range."""
    kind, optional = optional_type(hint)
    flag = flag_name(name)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{flag} must be given, got None")
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return
    if kind is bool:
        ok = isinstance(value, bool)
        what = "true or false"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "a whole number"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = "a finite number"
    elif kind is str:
        ok = isinstance(value, str) and value.strip() != ""
        what = "a non-empty string"
    else:  # mappings and the like: checked by their owner
        return
    bounds = _describe(f) if f is not None else ""
    if ok and bounds:
        m = f.metadata
        ok = ((m.get("gt") is None or value > m["gt"]) and (m.get("ge") is None or value >= m["ge"])
              and (m.get("lt") is None or value < m["lt"]) and (m.get("le") is None or value <= m["le"]))
    if not ok:
        raise ConfigError(f"{flag} must be {what}{' ' + bounds if bounds else ''}; got {value!r}")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def validate_fields(obj: Any) -> None:
    hints = type_hints(type(obj))
    for f in fields(obj):
        check_value(f.name, getattr(obj, f.name), hints[f.name], f)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right below it in the class body)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen app): no help texts
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


class Validated:
    """Mixin: validate every field on construction."""

    def __post_init__(self) -> None:
        validate_fields(self)
        self.check()

    def check(self) -> None:
        """Rules across fields; override where there are some."""


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ModelConfig(Validated):
    """Shape of the GPT. Parameter names follow Hugging Face GPT-2 (see model.py)."""

    n_layer: int = setting(12, ge=1, le=1024)
    """Number of transformer blocks."""
    n_head: int = setting(12, ge=1, le=1024)
    """Attention heads per block; must divide n_embd."""
    n_embd: int = setting(768, ge=1, le=65536)
    """Width of the residual stream."""
    block_size: int = setting(512, ge=1, le=1 << 20)
    """Context length in tokens (size of the learned position table)."""
    vocab_size: int = setting(50257, ge=2, le=1 << 24)
    """Vocabulary size of the embedding table (GPT-2's BPE by default)."""
    dropout: float = setting(0.1, ge=0.0, lt=1.0)
    """Dropout on the embeddings and on each block's attention and MLP outputs during training."""
    attn_dropout: float = setting(0.0, ge=0.0, lt=1.0)
    """Dropout on attention probabilities. Off by default: any value above 0 makes PyTorch's CPU
    attention fall back to a kernel that materialises every (T x T) probability matrix, which cost
    1.9 GiB more peak memory and was slower on the seed workload."""
    layer_norm_eps: float = setting(1e-5, gt=0.0, lt=1.0)
    """LayerNorm epsilon, as in GPT-2."""

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


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


Batching = Literal["bucket", "pack", "random"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Checkpointing = Literal["none", "selective", "full"]
OptimizerName = Literal["adamw", "muon"]
ScheduleName = Literal["cosine", "wsd"]
RecipeName = Literal["seed", "data-limited"]


# ---------------------------------------------------------------------------------------------
# Recipes: named sets of field defaults. ``--recipe NAME`` fills in the recipe's value for each
# field the user did not set (by flag, YAML key or keyword); what the user set wins. The values
# are then ordinary fields of the config, written to config.json like any other, so a resumed
# run reads them back and never consults the recipe again.

RECIPES: dict[str, dict[str, Any]] = {
    # The original project's recipe: every field's own default (``python train.py``).
    "seed": {},
    # For text too small for the model (a few epochs over a few million tokens), chosen with
    # benchmarks/quality.py on held-out text (docs/benchmarks.md, "Quality per compute"): Muon for
    # the blocks' matrices; warmup-stable-decay down to zero; a higher peak learning rate for the
    # AdamW groups; a step of half the seed's 16 sequences (twice the steps for the same tokens);
    # stronger weight decay, after Kim et al. (2025, "Pre-training under infinite compute"; 0.8
    # measured worse than 0.2 here); an average of the weights for evaluation and export. Measured
    # alone, the average tied at ``tiny`` after the whole schedule (one that decays to zero already
    # settles the weights) and won at ``gpt2-125m`` at every evaluation, two seeds
    # (docs/benchmarks.md, "Quality per compute, gpt2-125m"), so the recipe keeps it and its fp32
    # copy of the weights.
    "data-limited": {
        "optimizer": "muon",
        "schedule": "wsd",
        "min_lr_ratio": 0.0,
        "lr": 2e-3,
        "grad_accum": 2,
        "weight_decay": 0.2,
        "muon_weight_decay": 0.1,
        "ema_decay": 0.995,
    },
}
assert set(RECIPES) == set(typing.get_args(RecipeName)), "every recipe name is a choice of --recipe"


# ---------------------------------------------------------------------------------------------
# Training, by concern


@dataclass(frozen=True)
class DataConfig(Validated):
    """Where the text comes from and how it is cut into micro-batches."""

    data: str | None = None
    """Text source: a WikiText folder, a text file, a folder of .txt files, or hf:NAME[:CONFIG]
    for a Hugging Face dataset. None means the Hub's WikiText-2."""
    val_fraction: float = setting(0.1, gt=0.0, lt=1.0)
    """Share of documents held out for validation when the source has no validation split."""
    cache_dir: str | None = setting(None, on_resume=FREE)
    """Where token caches live; default $POCKETLM_CACHE, else ~/.cache/pocketlm."""
    batching: Batching = "bucket"
    """Batch schedule: bucket (length-grouped), pack (documents concatenated, no padding) or
    random (the baseline)."""
    tokenizer: str | None = setting(None, on_resume=FIXED)
    """Tokenizer folder: its tokenizer.json (as `pocketlm tokenizer train` writes it), or a Hugging
    Face folder's vocab.json and merges.txt. The model's vocab_size follows it, rounded up to a
    multiple of 64, unless --vocab-size is given. None means GPT-2's BPE."""


@dataclass(frozen=True)
class OptimConfig(Validated):
    """The recipe: batch, length, the optimizer, its learning-rate schedule and weight averaging."""

    batch_size: int = setting(4, ge=1, le=1 << 16)
    """Micro-batch size in sequences; with the context it sets the token budget of a micro-batch."""
    grad_accum: int = setting(4, ge=1, le=1 << 16)
    """Micro-batches per optimizer step."""
    epochs: int = setting(3, ge=1, le=1 << 20, on_resume=LENGTH)
    """Passes over the training set (ignored when max_steps is set)."""
    max_steps: int | None = setting(None, ge=1, le=1 << 40, on_resume=LENGTH)
    """Stop after this many optimizer steps; overrides epochs."""
    lr: float = setting(3e-4, gt=0.0, le=10.0)
    """Peak learning rate."""
    min_lr_ratio: float = setting(0.1, ge=0.0, le=1.0)
    """The decay (cosine, or wsd's) ends at this fraction of the peak."""
    warmup_steps: int = setting(100, ge=0, le=1 << 40)
    """Linear warmup length, capped at 10% of the run's steps."""
    weight_decay: float = setting(0.1, ge=0.0, le=10.0)
    """AdamW decay, applied to tensors of two or more dimensions only."""
    beta1: float = setting(0.9, ge=0.0, lt=1.0)
    """AdamW's first-moment decay."""
    beta2: float = setting(0.95, ge=0.0, lt=1.0)
    """AdamW's second-moment decay."""
    grad_clip: float = setting(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 disables clipping)."""
    recipe: RecipeName = "seed"
    """Named defaults for other fields, applied before the given ones (which win): seed (the
    original recipe) or data-limited (Muon, wsd, a higher learning rate, half the batch, stronger
    weight decay; RECIPES in config.py lists its values)."""
    optimizer: OptimizerName = "adamw"
    """adamw: AdamW for every parameter. muon: Muon (momentum orthogonalised by Newton-Schulz) for
    the 2-D weight matrices inside the transformer blocks, AdamW for embeddings, output layer,
    biases and LayerNorm gains. Not with --low-memory."""
    muon_lr: float = setting(0.02, gt=0.0, le=10.0)
    """With --optimizer muon: Muon's peak learning rate (the schedule scales it as it scales --lr).
    Each matrix's step is scaled by sqrt(max(1, rows/cols)), as in Keller Jordan's Muon."""
    muon_momentum: float = setting(0.95, ge=0.0, lt=1.0)
    """With --optimizer muon: Muon's Nesterov momentum."""
    muon_weight_decay: float = setting(0.01, ge=0.0, le=10.0)
    """With --optimizer muon: decoupled weight decay of the Muon matrices; each step scales them
    by 1 - (Muon's current learning rate x this)."""
    schedule: ScheduleName = "cosine"
    """Learning-rate schedule after the warmup: cosine (decay to --min-lr-ratio) or wsd (hold the
    peak, then decay to --min-lr-ratio as 1 - sqrt(progress) over the last --decay-fraction)."""
    decay_fraction: float = setting(0.2, gt=0.0, le=1.0)
    """With --schedule wsd: the share of the run's steps spent decaying."""
    ema_decay: float = setting(0.0, ge=0.0, lt=1.0)
    """Exponential moving average of the weights (fp32) with this decay per step, used for
    evaluation; 0 turns it off. Early steps use min(this, (1 + t) / (10 + t))."""


@dataclass(frozen=True)
class MemoryConfig(Validated):
    """How memory is saved. None of these changes the results, except --low-memory's rounding."""

    checkpointing: Checkpointing = setting("selective", on_resume=FREE)
    """Activation checkpointing: selective (keep matmul and attention outputs, recompute the
    cheap ops in backward), full (keep only block inputs) or none. Same results, less memory."""
    full_checkpoint_blocks: int = setting(2, ge=0, le=1024, on_resume=FREE)
    """With selective checkpointing, also recompute this many blocks fully."""
    low_memory: bool = False
    """Gradients and AdamW moments in bf16 (weights stay fp32) and full activation
    checkpointing: the most frugal setting. Not with --precision fp16."""
    vram: str | None = None
    """Memory budget such as 4GB (auto on CUDA: the free memory), per rank under torchrun. The
    planner picks the micro-batch, accumulation and checkpointing that fit, keeping the effective
    batch."""
    fsdp: bool = setting(False, on_resume=LAUNCH)
    """Under torchrun, shard weights, gradients and optimizer state across the ranks (FSDP2)
    instead of copying them to each (DDP): less memory per rank, more communication. Not with
    --low-memory, --optimizer muon, --ema-decay or --precision fp16."""

    def check(self) -> None:
        if self.vram is not None and self.vram != "auto":
            from pocketlm.planner import parse_size

            parse_size(self.vram)


@dataclass(frozen=True)
class RunConfig(Validated):
    """Where and how the run executes, and how it is watched."""

    out_dir: str | None = setting(None, on_resume=FREE)
    """Run folder; default runs/<preset>. Running the same command again resumes it."""
    resume: str | None = setting(None, on_resume=FREE)
    """Resume from this checkpoint (or run) folder instead of the run folder's latest; with a new
    --out-dir this branches, and may set a new --max-steps or --epochs."""
    device: Device = setting("auto", on_resume=FREE)
    """Where to train: auto picks cuda, then mps, then cpu."""
    precision: Precision = "auto"
    """auto: bf16 autocast where the device has it, fp16 with loss scaling on older GPUs, else fp32."""
    seed: int = setting(1337, ge=0, lt=1 << 63)
    """Seeds initialisation, data order and dropout."""
    init: str | None = setting(None, on_resume=FIXED)
    """Start from these weights instead of random ones: a Hugging Face Hub model id (gpt2, distilgpt2,
    gpt2-medium; hf:NAME always means the Hub), a local Hugging Face GPT-2 folder, or a pocketlm
    checkpoint or run folder. The model's shape and tokenizer come from it; steps, optimizer and
    schedule start fresh. Default run folder: runs/from-NAME."""
    compile: bool | None = setting(None, on_resume=FREE)
    """torch.compile the transformer blocks and the loss kernel. Default: on for CPU and CUDA runs
    holding at least a minute of model FLOPs at the device's matmul peak, where it repays its
    compile time; decided once and kept by every resume."""
    eval_interval: int = setting(250, ge=1, on_resume=FREE)
    """Evaluate on the validation split every this many steps (and at step 0 and at the end)."""
    eval_batches: int | None = setting(None, ge=1, on_resume=FREE)
    """Cap on validation micro-batches per evaluation (default: the whole split)."""
    save_interval: int = setting(250, ge=1, on_resume=FREE)
    """Save a checkpoint every this many steps (and at the end, and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = setting(3, ge=1, on_resume=FREE)
    """How many of the newest checkpoints to keep; the best one (lowest validation loss) is kept too."""
    early_stopping: int | None = setting(None, ge=1, le=1 << 20, on_resume=LENGTH)
    """Stop when the validation loss has not improved for this many evaluations in a row, keeping
    the best checkpoint (off by default)."""
    log_interval: int = setting(10, ge=1, on_resume=FREE)
    """Write a step line to metrics.jsonl every this many steps."""


# Why --fsdp refuses a setting: each needs the whole of a tensor that FSDP splits across ranks.
FSDP_REFUSALS = {
    "--low-memory": "its optimizer keeps its own bf16 gradients, which FSDP does not reduce; --fsdp "
                    "alone already divides weights, gradients and moments by the number of ranks",
    "--optimizer muon": "Muon orthogonalises whole weight matrices and each rank holds only a slice; "
                        "use --optimizer muon without --fsdp (plain data parallelism)",
    "--ema-decay": "the weight average is not sharded yet; use --ema-decay without --fsdp",
    "--precision fp16": "fp16 loss scaling would have to agree across shards; use --precision bf16 or fp32",
}


def low_memory_refusal(optimizer: str) -> str:
    """Why --low-memory refuses an optimizer other than AdamW: one sentence for every place that checks."""
    return f"--low-memory keeps AdamW's state in bf16 and works with --optimizer adamw only, not {optimizer}"


SECTIONS: dict[str, type] = {"dataset": DataConfig, "optim": OptimConfig, "memory": MemoryConfig,
                             "run": RunConfig}


@dataclass(frozen=True)
class TrainConfig(Validated):
    """Everything a training run needs. The defaults are the original project's recipe."""

    preset: str = "gpt2-125m"
    """Model preset: gpt2-125m or tiny."""
    model: Mapping[str, Any] = setting(default_factory=dict)
    """Overrides of single ModelConfig fields on top of the preset, e.g. {n_layer: 6}."""
    dataset: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> None:
        self.model_config()  # the preset exists and the overrides fit it
        if self.memory.low_memory and self.run.precision == "fp16":
            raise ConfigError("--low-memory keeps gradients in bf16 and cannot be combined with --precision fp16")
        if self.memory.fsdp:
            refused = [flag for flag, on in (("--low-memory", self.memory.low_memory),
                                             ("--optimizer muon", self.optim.optimizer == "muon"),
                                             ("--ema-decay", self.optim.ema_decay > 0),
                                             ("--precision fp16", self.run.precision == "fp16")) if on]
            if refused:
                raise ConfigError(f"--fsdp cannot be combined with {refused[0]}: " + FSDP_REFUSALS[refused[0]])
        if self.memory.low_memory and self.optim.optimizer == "muon":
            raise ConfigError(low_memory_refusal(self.optim.optimizer))

    def model_config(self) -> ModelConfig:
        base = model_preset(self.preset)
        if not isinstance(self.model, Mapping):
            raise ConfigError(f"model: must be a mapping of ModelConfig fields, got {self.model!r}")
        unknown = set(self.model) - {f.name for f in fields(ModelConfig)}
        if unknown:
            raise ConfigError(f"unknown model field(s) in config: {', '.join(sorted(unknown))}")
        hints = type_hints(ModelConfig)
        return dataclasses.replace(base, **{k: coerce(v, hints[k]) for k, v in self.model.items()})

    def resolved_out_dir(self) -> Path:
        if self.run.out_dir:
            return Path(self.run.out_dir)
        if self.run.init:  # named after its source, so it never lands in (and resumes) a from-scratch run
            return Path("runs") / f"from-{init_name(self.run.init)}"
        return Path("runs") / self.preset

    def to_dict(self) -> dict[str, Any]:
        """Nested, as config.json and YAML files hold it."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every leaf field by its (unique) name, plus ``preset`` and ``model``."""
        out: dict[str, Any] = {"preset": self.preset, "model": dict(self.model)}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        return out

    def replace(self, **flat: Any) -> "TrainConfig":
        """A copy with leaf fields changed by name: ``cfg.replace(batch_size=2, lr=1e-3)``. A new
        ``recipe`` resets the fields either recipe sets to the new recipe's values (or defaults),
        except those given here."""
        current = self.flat()
        if flat.get("recipe", self.optim.recipe) != self.optim.recipe:
            for name in {*RECIPES[self.optim.recipe], *RECIPES.get(flat["recipe"], {})}:
                current.pop(name, None)
        return config_from_flat({**current, **flat})


def init_name(source: str) -> str:
    """A short name for an --init source: the last part of its path or Hub id (``gpt2``,
    ``openai-community/gpt2`` -> ``gpt2``; ``runs/tiny`` -> ``tiny``)."""
    return Path(source.removeprefix("hf:").rstrip("/\\")).name or "init"


def leaf_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Leaf field name -> (its section, the field)."""
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in fields(cls)}


_LEAVES = leaf_fields()
assert len(_LEAVES) == sum(len(fields(c)) for c in SECTIONS.values()), "leaf field names must be unique"
TOP_LEVEL = {"preset", "model"}


def on_resume(name: str) -> str:
    if name in _LEAVES:
        return _LEAVES[name][1].metadata.get("on_resume", FIXED)
    return FIXED


def with_recipe(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the named recipe's value (``recipe``, default seed) for each field they leave out."""
    name = values.get("recipe", OptimConfig.recipe)
    check_value("recipe", name, RecipeName)
    return {**RECIPES[name], **values}


def config_from_flat(values: Mapping[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from leaf names (and ``preset``/``model``); unknown names are refused.
    Fields left out take the recipe's values (see ``RECIPES``), else their defaults."""
    unknown = sorted(set(values) - set(_LEAVES) - TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values = with_recipe(values)
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        if name in _LEAVES:
            section, _ = _LEAVES[name]
            per_section[section][name] = coerce(value, type_hints(SECTIONS[section])[name])
    top = {k: values[k] for k in TOP_LEVEL if k in values}
    if "preset" in top:
        check_value("preset", top["preset"], str)
    try:
        built = {s: SECTIONS[s](**kw) for s, kw in per_section.items()}
        return TrainConfig(**top, **built)
    except TypeError as exc:  # pragma: no cover - names are checked above
        raise ConfigError(f"bad config: {exc}") from None


def flatten_settings(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """YAML's keys to leaf names: sections (``optim: {lr: ...}``) or flat keys (``lr: ...``)."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, Mapping):
            names = {f.name for f in fields(SECTIONS[key])}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ConfigError(f"unknown field(s) in {where}, section {key}: {', '.join(map(str, unknown))}")
            flat.update(value)
        elif key in _LEAVES or key in TOP_LEVEL:
            flat[key] = value
        else:
            raise ConfigError(f"unknown field(s) in {where}: {key}")
    return flat


def config_from_dict(saved: Mapping[str, Any]) -> TrainConfig:
    """A config as ``to_dict`` wrote it (or the flat form of earlier pocketlm versions)."""
    return config_from_flat(flatten_settings(saved, "the saved config"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a plain dict, with one-line errors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return raw


def given_settings(yaml_path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """The settings a user gave: the YAML file's, then explicit overrides (None: not given).
    Model fields may be given flat too (``n_layer=6``); they go into ``model``."""
    values = flatten_settings(load_yaml(yaml_path), str(yaml_path)) if yaml_path else {}
    model = dict(values.pop("model", None) or {})
    model_fields = {f.name for f in fields(ModelConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in model_fields:
            model[key] = value
        else:
            values[key] = value
    if model:
        values["model"] = model
    return values


def build_train_config(yaml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file, then explicit overrides (None means 'not given')."""
    return config_from_flat(given_settings(yaml_path, **overrides))
