"""How a training run executes the model, applied from outside it (as torchtitan's parallelize.py).

``model.py`` is only the architecture. For training, ``prepare_model`` applies, as the run plan
says:

* activation checkpointing of each block (``apply_activation_checkpointing``);
* ``torch.compile`` of the block runners, one graph per checkpointing mode shared by every
  block (``apply_compile``);
* on a compiled CPU run, the kernels of ``cpu_kernels.py`` in place of PyTorch's dropout, GELU
  and attention (``apply_cpu_kernels``);
* the token embedding's gradient added straight into ``.grad`` (``apply_embedding_grad_fusion``);
  a single process only: data parallelism must see every gradient arrive through autograd;
* with several processes, data parallelism around the objective (``apply_data_parallel``, DDP)
  or sharding of each block and of the whole model (``apply_fsdp``, FSDP2).

None of these changes a parameter's name: state dicts, checkpoints and Hugging Face export see
the plain model. Each changes memory or speed; the tests check that none changes the results
beyond floating-point rounding.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pocketlm import cpu_kernels
from pocketlm.model import GPT, MLP, Block, ScaledDotProductAttention

_PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

_aten = torch.ops.aten
# Selective activation checkpointing keeps the outputs of the expensive ops (matmuls, attention)
# and recomputes the cheap ones in backward: bf16 copies of the weights, LayerNorm, GELU, dropout.
_SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
              _aten._scaled_dot_product_flash_attention_for_cpu.default,
              _aten._scaled_dot_product_flash_attention.default,
              _aten._scaled_dot_product_efficient_attention.default,
              _aten._scaled_dot_product_cudnn_attention.default}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls)


def _block_forward(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # The class's forward, not ``block(...)``: a prepared block's own ``forward`` leads back here.
    return type(block).forward(block, x, mask)


# How a training block runs under each checkpointing choice. Module-level functions of the block,
# so that ``torch.compile`` traces one graph per choice and every block of the model reuses it.
def _plain_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _block_forward(block, x, mask)


def _full_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return checkpoint(_block_forward, block, x, mask, use_reentrant=False)


def _selective_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return checkpoint(_block_forward, block, x, mask, use_reentrant=False, context_fn=_selective_contexts)


BLOCK_RUNNERS: dict[str, Callable[..., torch.Tensor]] = {
    "none": _plain_block, "full": _full_block, "selective": _selective_block}


def _run_training_blocks_with(block: Block, runner: Callable[..., torch.Tensor]) -> None:
    """Make ``block`` run through ``runner`` in training; inference and cached decoding stay plain."""
    def forward(x: torch.Tensor, mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        if cache is None and block.training and torch.is_grad_enabled():
            return runner(block, x, mask)
        return type(block).forward(block, x, mask, cache)

    block.forward = forward  # an instance attribute: parameter names and the state dict are unchanged


def block_modes(n_layer: int, mode: str, full_blocks: int) -> list[str]:
    """Checkpointing mode per block: ``selective`` recomputes the first ``full_blocks`` fully."""
    if mode == "none":
        return ["none"] * n_layer
    if mode == "full":
        return ["full"] * n_layer
    if mode != "selective":
        raise ValueError(f"checkpointing must be none, selective or full, got {mode!r}")
    return ["full" if i < full_blocks else "selective" for i in range(n_layer)]


def apply_activation_checkpointing(model: GPT, mode: str, full_blocks: int = 0,
                                   runners: dict[str, Callable[..., torch.Tensor]] | None = None) -> None:
    """Activation checkpointing in training: ``selective`` (see _SAVED_OPS) on every block, ``full``
    on every block, or ``selective`` plus full recomputation of the first ``full_blocks`` blocks.
    Changes memory and speed, never the results."""
    runners = runners or BLOCK_RUNNERS
    for block, block_mode in zip(model.transformer.h, block_modes(len(model.transformer.h), mode, full_blocks)):
        _run_training_blocks_with(block, runners[block_mode])


def _silence_sac_in_place_warning(record: logging.LogRecord) -> bool:
    """torch.compile warns, on every run, that a selectively checkpointed region must not hold
    in-place ops. A training ``Block`` has none (the KV cache's writes only run in inference),
    so the warning is noise in the trainer's output."""
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def compiled_block_runners() -> dict[str, Callable[..., torch.Tensor]]:
    """``BLOCK_RUNNERS`` through ``torch.compile``: LayerNorm, GELU, dropout, residual adds and the
    bf16 casts fuse into a few kernels per block. Results equal the eager ones up to rounding."""
    logging.getLogger("torch._higher_order_ops.wrap").addFilter(_silence_sac_in_place_warning)
    return {mode: torch.compile(fn) for mode, fn in BLOCK_RUNNERS.items()}


def apply_cpu_kernels(model: nn.Module) -> None:
    """Swap in ``cpu_kernels``' dropout, GELU and attention (each falls back to PyTorch's own op
    outside compiled CPU training)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, cpu_kernels.Dropout(child.p))
            elif isinstance(module, MLP) and type(child) is nn.GELU:
                setattr(module, name, cpu_kernels.GELUTanh())
            elif type(child) is ScaledDotProductAttention:
                setattr(module, name, cpu_kernels.BandedAttention(child.dropout))


class _EmbeddingIntoGrad(torch.autograd.Function):
    """Token-embedding lookup whose backward adds the rows' gradients straight into
    ``weight.grad`` (index_add), where autograd would first build a zero-filled dense
    (vocab x n_embd) gradient and then add all of it: 154 MB written and read twice per
    micro-batch on gpt2-125m, for 2,048 rows that changed."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.weight = weight
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad_out.reshape(-1, grad_out.size(-1)).to(weight.dtype)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, idx.reshape(-1), rows)
        return None, None


def embed_tokens(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding``, with the gradient fused into ``weight.grad`` when training a leaf weight."""
    if torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf:
        return _EmbeddingIntoGrad.apply(idx, weight)
    return F.embedding(idx, weight)


class EmbeddingIntoGrad(nn.Embedding):
    """``nn.Embedding`` whose weight gradient goes straight into ``.grad`` (``embed_tokens``).
    Only for a single process: data parallelism must see every gradient arrive through autograd."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return embed_tokens(idx, self.weight)


def apply_embedding_grad_fusion(model: GPT) -> None:
    old = model.transformer.wte
    # ``_weight`` skips the random initialisation (on the meta device it would import torch._dynamo,
    # seconds of every start); the module then takes the same Parameter, still tied to lm_head.
    fused = EmbeddingIntoGrad(old.num_embeddings, old.embedding_dim, _weight=old.weight.detach())
    fused.weight = old.weight
    model.transformer.wte = fused


def prepare_model(model: GPT, *, device_type: str, compiled: bool, checkpointing: str, full_blocks: int,
                  low_memory: bool, single_process: bool = True) -> None:
    """Everything a run plan asks of the model for training, applied in place, in the order that
    composes: kernel swaps, then checkpointing around the (compiled) block runners."""
    if compiled and device_type == "cpu":
        apply_cpu_kernels(model)
    apply_activation_checkpointing(model, checkpointing, full_blocks, compiled_block_runners() if compiled else None)
    if single_process and not low_memory:  # the low-memory optimizer takes gradients from autograd's hooks
        apply_embedding_grad_fusion(model)


def _allreduce_sum(process_group, bucket):  # no annotations: DDP checks them, and this file's are strings
    """DDP's gradient reduction, summed rather than averaged: the loss is already divided by the
    real-token count of the whole global step, so the gradients of the ranks add up to the
    global batch's gradient."""
    import torch.distributed as dist

    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_data_parallel(objective: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around the training objective (model and fused loss), so
    its forward is DDP's and every parameter's gradient, the output layer's included, is
    reduced. The trainer skips the reduction on all but a step's last micro-batch (``no_sync``)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(objective, device_ids=device_ids,
                                  gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, _allreduce_sum)
    return ddp


def apply_fsdp(model: GPT, precision: str) -> None:
    """Shard the model over the ranks with FSDP2: each block on its own (its weights are gathered
    just before it runs and freed after), then the whole model, which holds the embeddings, the
    tied output layer and the final LayerNorm. Under bf16/fp16 the gathered weights are cast to
    that dtype once per gather and gradients are reduced in fp32 (the policy matching autocast).
    Gradients are summed across ranks, not averaged (see ``_allreduce_sum``)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    dtype = _PARAM_DTYPES.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # The objective and evaluation call ``hidden_states``, not ``forward``: FSDP must gather the
    # root's weights for it too. The root keeps them gathered until backward, so the fused loss
    # reads the whole output layer after ``hidden_states`` returns.
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


@contextlib.contextmanager
def gradient_sync(objective: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the ``with``, DDP's backward passes reduce gradients across ranks only when
    ``enabled``: a step's micro-batches but the last just accumulate locally (``no_sync``).
    FSDP reduce-scatters after every micro-batch regardless: skipping it would keep a whole
    unsharded copy of the gradients on every rank between micro-batches, the memory sharding is
    there to save. Nothing to do in a single process."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(objective, DistributedDataParallel) and not enabled:
        with objective.no_sync():
            yield
        return
    yield


def unwrap(objective: nn.Module) -> nn.Module:
    """The objective inside a data-parallel wrapper (itself otherwise)."""
    return getattr(objective, "module", objective)
