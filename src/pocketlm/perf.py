"""Speed accounting: model FLOPs per token, the device's measured matrix-product peak, MFU,
and the CPU allocator setting that keeps large buffers from being page-faulted in every step.

MFU (model FLOPs utilisation) counts only the FLOPs the model needs (forward and backward, no
recomputation from activation checkpointing) against the peak of the device the run is on.
The peak is *measured* with a bf16 (or fp32) 2048 x 2048 product at start-up rather than
taken from a table, so a CPU with AMX, one without, and any GPU are all judged by their own
limit; ``known_peak_flops`` exists only so GPU logs can also show the datasheet figure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from dataclasses import dataclass

import torch

from pocketlm.config import ModelConfig

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s), for GPUs people train on.
KNOWN_GPU_BF16_PEAKS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
    "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12,
    "RTX 3090": 71e12, "T4": 65e12,
}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward, input and weight gradients) plus the
    attention scores and their weighted sum, (QK^T and AV, 2 x 2 x seq_len x n_embd each way,
    x3 with backward). The PaLM appendix B formula; position embeddings are a lookup, so
    they are left out. gpt2-125m at 512 tokens: 0.80 GFLOP."""
    c, n_layer = config.n_embd, config.n_layer
    matmul_weights = n_layer * 12 * c * c + config.vocab_size * c  # blocks + output layer
    return 6.0 * matmul_weights + 12.0 * n_layer * seq_len * c


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        size: int = 2048, min_seconds: float = 0.5) -> float:
    """FLOP/s of repeated ``size`` x ``size`` products in ``dtype`` on ``device``: the limit a
    training step is judged against. Warms up first; runs for at least ``min_seconds``."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    _sync(device)
    calls, began = 0, time.perf_counter()
    while True:
        for _ in range(4):
            torch.mm(a, b, out=out)
        calls += 4
        _sync(device)
        elapsed = time.perf_counter() - began
        if elapsed >= min_seconds:
            return 2.0 * size ** 3 * calls / elapsed


# A CPU whose threads multiply at less than this share of (threads x one thread's rate) is
# taken to be shared: other processes hold some of its cores.
BUSY_CPU_SCALING = 0.5


def busy_cpu_warning(all_threads_flops: float, one_thread_flops: float, threads: int) -> str | None:
    """A warning when ``threads`` threads multiply far slower than ``threads`` times one thread:
    other processes hold the cores, and this run (and its tokens/s) will be slower than the
    machine can do."""
    if threads <= 1 or all_threads_flops >= BUSY_CPU_SCALING * threads * one_thread_flops:
        return None
    return (f"the CPU is busy: {threads} threads multiply at {all_threads_flops / 1e9:.0f} GFLOP/s, "
            f"{all_threads_flops / (threads * one_thread_flops):.0%} of {threads} x one thread's "
            f"{one_thread_flops / 1e9:.0f} GFLOP/s; other processes seem to hold cores, so this run will be slower "
            "than the machine allows")


def one_thread_matmul_peak(dtype: torch.dtype, min_seconds: float = 0.1) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_matmul_peak("cpu", dtype, size=512, min_seconds=min_seconds)
    finally:
        torch.set_num_threads(threads)


def known_peak_flops(device: torch.device) -> float | None:
    """The datasheet bf16 peak of a known CUDA GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in KNOWN_GPU_BF16_PEAKS.items():  # most specific names first
        if key in name:
            return peak
    return None


@dataclass(frozen=True)
class Throughput:
    """Tokens per second and MFU of a stretch of training."""

    tokens_per_s: float
    mfu: float | None


def throughput(tokens: int, seconds: float, flops_per_tok: float, peak_flops: float | None) -> Throughput:
    rate = tokens / seconds if seconds > 0 else 0.0
    return Throughput(rate, rate * flops_per_tok / peak_flops if peak_flops else None)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
SHARDED_MMAP_THRESHOLD = 1 << 20


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep them after ``free``.

    By default every block over 32 MiB is a fresh ``mmap``: the output layer's gradient, the
    embedding gradient and the loss chunks are allocated and freed in every micro-step, and
    the kernel zero-fills each of their pages again on first touch (28 ms per 154 MB here, a
    third of a step's memory traffic). With ``mmap`` off and trimming raised, freed blocks are
    reused as they are. Peak memory is unchanged; the resident size no longer shrinks between
    steps. Returns whether the setting took (glibc on Linux only)."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def return_freed_memory() -> bool:
    """Make glibc's malloc give every block of 1 MiB or more its own ``mmap``, returned to the
    system on ``free`` (the opposite of ``keep_freed_memory_for_reuse``), for a sharded run on a
    CPU. FSDP gathers and frees a block's whole weights and gradients again and again, in sizes
    that differ by module, from the main thread and gloo's; served from the heap, those blocks
    leave holes that glibc never trims, and the resident size grows step after step, past a
    single process's (benchmarks/scaling.py measures it). A fixed threshold also stops glibc from
    raising it after each free. Returns whether it took."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, SHARDED_MMAP_THRESHOLD))


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
