"""Predicting a training step's peak memory, and choosing settings that fit a memory budget.

The model counts the bytes of every tensor that is alive at the step's peak, which is at the
boundary of forward and backward in a micro-step after the first of an accumulation window (so
gradients are already allocated): weights, gradients and the optimizer's state in fp32 (AdamW's
two moments, or with Muon one momentum for the blocks' matrices), the weight average when the
recipe keeps one; the activations
each block keeps for backward, which depend on the checkpointing mode; and the fused output
layer's buffers (see losses.py). ``benchmarks/memory.py`` and ``tests/test_planner.py`` compare
these predictions with measured peaks.

With several processes (torchrun), ``predict_peak(shards=N)`` is one rank's peak when FSDP2
shards the parameters over N ranks (``parallelize.apply_fsdp``), and ``fit_to_budget(ranks=N)``
splits each step's micro-batches evenly across N data-parallel ranks.

A GPU budget (``--vram 4GB``) is a card's size, not a tensor budget: ``CardLosses`` sets aside
what a real card loses before and around those tensors (the driver's share, the CUDA context,
the caching allocator's margin) and ``fit_to_budget`` fits the plan into what is left.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from pocketlm.config import ModelConfig, low_memory_refusal
from pocketlm.errors import ConfigError
from pocketlm.losses import CHUNK_ELEMENTS

MiB = 1024 ** 2
GiB = 1024 ** 3
FP32 = 4
# Room for allocator rounding, kernels' scratch space and the framework itself, inside the
# allocated peak (measured on a CPU; on CUDA a little more for cuBLAS's workspaces, not yet
# measured). What the CUDA caching allocator and context take beyond it is in ``CardLosses``.
WORKSPACE_FRACTION = {"cpu": 0.03, "cuda": 0.05, "mps": 0.10}


@dataclass(frozen=True)
class CardLosses:
    """What a GPU's memory loses before and around the tensors ``predict_peak`` counts.

    None of the CUDA figures below has been measured on a GPU running pocketlm yet;
    ``benchmarks/gpu_check.py`` measures each of them (context, allocator margin, reported size)
    so that measured figures can replace these documented ones.
    """

    driver_fraction: float = 0.0
    """Share of a card's nominal size that its driver keeps (the size it reports is smaller)."""
    context_bytes: int = 0
    """Device memory of the process's CUDA context and the libraries it loads."""
    fragmentation: float = 0.0
    """How much more the caching allocator reserves than the peak it hands out."""

    def tensor_budget(self, budget_bytes: int, *, free_memory: bool = False) -> int:
        """The allocated peak that fits ``budget_bytes``: a card's nominal size, or with
        ``free_memory`` the memory a running process found free (driver and context already gone)."""
        reservable = budget_bytes if free_memory else \
            budget_bytes * (1 - self.driver_fraction) - self.context_bytes
        return max(0, int(reservable / (1 + self.fragmentation)))


# The driver's share: cards report less than their nominal GiB, e.g. nvidia-smi shows 7,982 MiB on
# an "8 GB" RTX 2070 Max-Q (2.6% short) and 24,219 MiB on a 24 GB Titan RTX (1.5% short) (table in
# lambdal/lambda-tensorflow-benchmark pull request #10).
# The context: 274 MiB (287,047,680 bytes) for a bare PyTorch CUDA context with lazy module
# loading and 636 MiB without it (pytorch/pytorch pull request #86509, which made lazy loading
# PyTorch's default in 1.13; CUDA's own default on Linux since 12.2), plus cuBLAS and the kernels a
# training step loads on first use; forum measurements of a PyTorch process's floor before lazy
# loading were 700-800 MiB (discuss.pytorch.org, "High gpu memory overhead"). 400 MiB: lazy loading
# plus the libraries. Not yet measured here.
# The allocator's margin: reserved blocks are split and cached by size, so the reserved peak
# (what the card must hold) runs above the allocated one; 10% is a documented guess, not yet measured.
CARD_LOSSES = {"cuda": CardLosses(driver_fraction=0.03, context_bytes=400 * MiB, fragmentation=0.10)}
NO_LOSSES = CardLosses()


def card_losses(device: str) -> CardLosses:
    """What a budget on ``device`` (``cpu``, ``cuda``, ``mps``) loses; nothing off CUDA, where the
    budget is the tensors' own (a CPU has no caching allocator or context to pay for)."""
    return CARD_LOSSES.get(device, NO_LOSSES)


def parse_size(text: str) -> int:
    """``4GB``, ``3.5 GiB``, ``1500MB``, ``2g`` -> bytes. GB and GiB both mean 1024**3 here: a
    card sold as '4 GB' holds 4 GiB (4,294,967,296 bytes) of memory chips, so ``--vram 4GB`` is
    that card; ``CardLosses`` then sets aside what the card loses before any tensor."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 4GB or 1500MB")
    value, unit = float(match.group(1)), match.group(2)
    return int(value * 1024 ** " kmgt".index(unit or " "))


def _block_parameters(config: ModelConfig) -> int:
    C = config.n_embd
    return 12 * C * C + 13 * C  # qkv, proj, fc, proj weights and biases, two LayerNorms


def _root_parameters(config: ModelConfig) -> int:
    """What is left outside the blocks: the token embedding (tied to the output layer), the
    position embedding and the final LayerNorm; under FSDP2 the root module's own group."""
    C = config.n_embd
    return config.vocab_size * C + config.block_size * C + 2 * C


def num_parameters(config: ModelConfig) -> int:
    return _root_parameters(config) + config.n_layer * _block_parameters(config)


def hidden_matrix_parameters(config: ModelConfig) -> int:
    """Elements of the blocks' 2-D weights (``optim.hidden_matrix_names``: attention's qkv and
    projection, the MLP's two), which Muon trains."""
    return config.n_layer * 12 * config.n_embd ** 2


def optimizer_state_elements(config: ModelConfig, optimizer: str = "adamw") -> int:
    """Elements of optimizer state a step keeps between steps: AdamW's two moments for every
    parameter; with ``muon``, one momentum for the blocks' matrices and AdamW's two for the rest
    (``optim.build_optimizer``)."""
    params = num_parameters(config)
    if optimizer == "adamw":
        return 2 * params
    if optimizer == "muon":
        matrices = hidden_matrix_parameters(config)
        return matrices + 2 * (params - matrices)
    raise ConfigError(f"unknown optimizer {optimizer!r}; expected adamw or muon")


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak bytes of one training micro-step, by component."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits_and_loss: int
    workspace: int
    gathered: int = 0
    """Under FSDP2, the transient unsharded copies of sharded parameters and their gradients
    (see ``predict_peak``); 0 in a single process."""
    average: int = 0
    """The fp32 weight average (``ema.WeightEMA``) a recipe with ``ema_decay`` keeps; 0 without."""

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits_and_loss
                + self.workspace + self.gathered + self.average)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _activation_bytes(config: ModelConfig, tokens: int, batch_size: int, seq_len: int, act: int,
                      checkpointing: str, full_blocks: int, weight_casts: bool = True) -> int:
    """Bytes each block keeps for backward, summed over blocks, plus the final LayerNorm's.
    ``weight_casts``: whether autocast makes low-precision weight copies (not when FSDP2 already
    gathers the weights in the compute dtype)."""
    C, H = config.n_embd, config.n_head
    block_input = FP32 * tokens * C  # the residual stream stays fp32 under autocast
    lse = FP32 * batch_size * H * seq_len  # attention's log-sum-exp
    # Outputs of the matmuls and attention: qkv (3C), attention (C), its projection (C),
    # MLP up (4C) and down (C) projections.
    matmul_outputs = act * tokens * 10 * C + lse
    if checkpointing == "full":
        per_block_saved = [block_input] * config.n_layer
    elif checkpointing == "selective":
        full = min(full_blocks, config.n_layer)
        per_block_saved = [block_input] * full + [block_input + matmul_outputs] * (config.n_layer - full)
    else:  # none: autograd keeps every intermediate, and the low-precision weight copies,
        # but not the two projections' outputs (only a residual add and dropout consume them)
        matmul_outputs -= act * tokens * 2 * C
        casts = act * tokens * C * 2 if act < FP32 else 0  # LayerNorm outputs cast for the matmuls
        # weight copies saved by the matmuls; under FSDP2 they save the gathered weights themselves,
        # whose storage is freed when the block reshards, so they hold nothing
        weights = act * 12 * C * C if act < FP32 and weight_casts else 0
        gelu_out = act * tokens * 4 * C
        masks = 2 * tokens * C if config.dropout > 0 else 0
        residual = FP32 * tokens * C  # the second LayerNorm's input
        per_block_saved = [block_input + matmul_outputs + casts + weights + gelu_out + masks + residual]
        per_block_saved *= config.n_layer
    final_norm = 2 * FP32 * tokens * C  # ln_f input and output
    return sum(per_block_saved) + final_norm


def _head_bytes(config: ModelConfig, tokens: int, act: int, weight_cast: bool = True) -> int:
    """The fused output layer's peak (see losses.py): in forward, its low-precision weight copy
    (none when ``weight_cast`` is off: FSDP2 gathers the weight in the compute dtype and the
    cast is a no-op), the gradients it computes for backward, and one chunk of logits in three forms."""
    V, C = config.vocab_size, config.n_embd
    weight_copy = act * V * C if act < FP32 and weight_cast else 0
    grad_hidden, grad_weight = act * tokens * C, act * V * C
    chunk = min(max(1, CHUNK_ELEMENTS // V), tokens)
    # a chunk's logits in fp32 and their gradient cast back to the compute dtype: two buffers at
    # a time (one in fp32, where the cast is a no-op)
    softmax = chunk * V * ((act + FP32) if act < FP32 else FP32)
    if chunk == tokens:  # one chunk: the weight gradient is created once the fp32 logits are gone
        chunk_peak = max(softmax, chunk * V * act + grad_weight)
    else:
        chunk_peak = softmax + grad_weight
    return weight_copy + grad_hidden + chunk_peak


def _gathered_bytes(config: ModelConfig, param_bytes: int) -> int:
    """FSDP2's transient unsharded copies on one rank (``parallelize.apply_fsdp``): the root's
    parameters, which FSDP2 gathers for forward and keeps until backward is done, with their
    fp32 gradient before the reduce-scatter (mostly the tied embedding/output weight's); and two
    blocks' weights at a time (the running block's and the prefetched next one's) with one
    block's fp32 gradient. Weights in the gather's dtype, gradients in fp32 (the reduce dtype)."""
    root, block = _root_parameters(config), _block_parameters(config)
    gathered_blocks = min(2, config.n_layer)
    return (param_bytes + FP32) * root + (gathered_blocks * param_bytes + FP32) * block


def _per_shard(total: int, shards: int) -> int:
    return -(-total // shards)  # a rank's shard of a whole, rounded up (FSDP2 pads the last shard)


def predict_peak(config: ModelConfig, batch_size: int, seq_len: int | None = None, *, precision: str = "bf16",
                 checkpointing: str = "selective", full_blocks: int = 2, device: str = "cpu",
                 low_memory: bool = False, shards: int = 1, optimizer: str = "adamw",
                 ema: bool = False) -> MemoryPlan:
    """Peak memory of one training micro-step: fp32 weights, gradients and ``optimizer``'s state
    (``optimizer_state_elements``), or with ``low_memory`` bf16 gradients and AdamW moments and full
    checkpointing (lowmem.py); with ``ema``, an fp32 weight average besides.

    ``shards``: one rank's peak when FSDP2 shards the parameters over that many ranks (1: a
    single process, or data parallelism with whole replicas). Each rank then keeps 1/shards of
    the weights, gradients and moments, and ``gathered`` counts the unsharded copies FSDP2
    makes while it runs (``_gathered_bytes``), as if all were alive at once, an upper bound:
    the root's gradient only exists at the end of backward. Under bf16/fp16 the gathered
    weights are already in the compute dtype, so the casts autocast and the fused output layer
    would otherwise make cost nothing. These transient terms are counted from FSDP2's schedule,
    not yet measured against a run. The activations are otherwise a single process's.
    """
    if shards < 1:
        raise ConfigError(f"shards must be at least 1, not {shards}")
    if low_memory and optimizer != "adamw":
        raise ConfigError(low_memory_refusal(optimizer))
    seq_len = seq_len or config.block_size
    if seq_len > config.block_size:
        raise ConfigError(f"sequence length {seq_len} exceeds the context of {config.block_size}")
    tokens = batch_size * seq_len
    act = FP32 if precision == "fp32" else 2  # also the dtype FSDP2 gathers weights in (parallelize.py)
    params = num_parameters(config)
    if low_memory:
        checkpointing = "full"
    sharded = shards > 1
    activations = _activation_bytes(config, tokens, batch_size, seq_len, act, checkpointing, full_blocks,
                                    weight_casts=not sharded)
    head = _head_bytes(config, tokens, act, weight_cast=not sharded)
    grad_bytes, moment_bytes = (2, 2) if low_memory else (FP32, FP32)
    weights = _per_shard(FP32 * params, shards)
    gradients = _per_shard(grad_bytes * params, shards)
    state = _per_shard(moment_bytes * optimizer_state_elements(config, optimizer), shards)
    average = _per_shard(FP32 * params, shards) if ema else 0
    gathered = _gathered_bytes(config, act) if sharded else 0
    static = weights + gradients + state + average
    workspace = int(WORKSPACE_FRACTION.get(device, 0.1) * (static + activations + head + gathered))
    return MemoryPlan(weights=weights, gradients=gradients, optimizer=state, activations=activations,
                      logits_and_loss=head, workspace=workspace, gathered=gathered, average=average)


@dataclass(frozen=True)
class FitChoice:
    batch_size: int
    grad_accum: int
    checkpointing: str
    full_checkpoint_blocks: int
    plan: MemoryPlan
    tensor_budget: int = 0
    """The allocated peak the budget allowed, once ``CardLosses`` was set aside."""


def _checkpoint_ladder(n_layer: int) -> list[tuple[str, int]]:
    """From fastest to most frugal."""
    return [("none", 0)] + [("selective", k) for k in range(n_layer + 1)] + [("full", n_layer)]


def fit_to_budget(config: ModelConfig, budget_bytes: int, *, batch_size: int, grad_accum: int,
                  seq_len: int | None = None, precision: str = "bf16", device: str = "cpu",
                  low_memory: bool = False, free_memory: bool = False, ranks: int = 1,
                  shards: int = 1, optimizer: str = "adamw", ema: bool = False) -> FitChoice:
    """Settings whose predicted peak fits ``budget_bytes``, keeping the effective batch
    (micro-batch x accumulation). Preference: the largest micro-batch that fits without full
    checkpointing, with the least recomputation; full checkpointing only as a last resort.
    On CUDA the budget is a card's nominal size (``free_memory``: the free memory a process
    found, as ``--vram auto`` reads it) and ``card_losses`` is set aside first.

    With ``ranks`` data-parallel processes the budget is each rank's and the effective batch is
    the global one: each rank runs grad_accum / ranks of a step's micro-batches, so only
    micro-batches whose accumulation is a multiple of ``ranks`` are chosen. ``shards``,
    ``optimizer`` and ``ema`` are passed to ``predict_peak`` (FSDP2 sharding over that many ranks;
    the optimizer's state and the weight average)."""
    if ranks < 1:
        raise ConfigError(f"ranks must be at least 1, not {ranks}")
    losses = card_losses(device)
    usable = losses.tensor_budget(budget_bytes, free_memory=free_memory)
    effective = batch_size * grad_accum
    if effective % ranks:
        # grad_accum = effective / micro is a multiple of ranks only if effective is: no micro-batch
        # can fit, whatever the memory
        raise ConfigError(f"no setting fits {budget_bytes / GiB:.2f} GiB: the global batch of {effective} sequences "
                          f"per step (batch size {batch_size} x grad accum {grad_accum}) cannot be split evenly "
                          f"across {ranks} ranks (grad accum must be a multiple of the ranks); choose a global batch "
                          f"divisible by {ranks}")
    micro_sizes = [m for m in range(effective, 0, -1) if effective % m == 0 and (m & (m - 1)) == 0 or m == batch_size]
    # Micro-batch 1 (accumulation = effective, a multiple of ranks) always survives this filter.
    micro_sizes = [m for m in micro_sizes if (effective // m) % ranks == 0]
    ladder = [("full", config.n_layer)] if low_memory else _checkpoint_ladder(config.n_layer)

    def first_fit(modes: list[tuple[str, int]]) -> FitChoice | None:
        for micro in sorted(set(micro_sizes), reverse=True):
            for mode, full in modes:
                plan = predict_peak(config, micro, seq_len, precision=precision, checkpointing=mode,
                                    full_blocks=full, device=device, low_memory=low_memory, shards=shards,
                                    optimizer=optimizer, ema=ema)
                if plan.total <= usable:
                    return FitChoice(micro, effective // micro, mode, full, plan, usable)
        return None

    choice = first_fit(ladder[:-1]) or first_fit(ladder[-1:])
    if choice is None:
        smallest = predict_peak(config, 1, seq_len, precision=precision, checkpointing="full", device=device,
                                low_memory=low_memory, shards=shards, optimizer=optimizer, ema=ema)
        lost = "the allocator's margin is" if free_memory else \
            "the driver's share, the CUDA context and the allocator's margin are"
        context = f" ({usable / GiB:.2f} GiB for tensors once {lost} set aside)" if losses != NO_LOSSES else ""
        hint = "" if low_memory else "; try --low-memory"
        raise ConfigError(f"no setting fits {budget_bytes / GiB:.2f} GiB{context}: even micro-batch 1 with "
                          f"full checkpointing needs about {smallest.total / GiB:.2f} GiB{hint}")
    return choice


def format_plan(plan: MemoryPlan) -> str:
    # a single process gathers nothing and a run without a weight average keeps none: no empty rows
    rows = [(name.replace("_", " "), value) for name, value in plan.as_dict().items()
            if name not in ("gathered", "average") or value]
    return "\n".join(f"  {name:<16} {value / GiB:7.3f} GiB" for name, value in rows)

