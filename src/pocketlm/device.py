"""Choosing the device and the numeric precision, and the autocast context that goes with them."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from pocketlm.config import Device, Precision, check_value
from pocketlm.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: Apple MPS is not available (try --device auto)")
    check_value("device", name, Device)
    return torch.device(name)


def native_bf16_in(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists AVX512-BF16 or AMX-BF16 among the first CPU's flags."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    return False


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 natively, so autocast pays off (without them
    PyTorch emulates bf16 products, hundreds of times slower than fp32)."""
    try:
        return native_bf16_in(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 autocast where the hardware has it, fp16 with loss scaling on older GPUs,
    otherwise fp32. An explicit value is used as given."""
    if name != "auto":
        check_value("precision", name, Precision)
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("--precision fp16 needs a GPU; use bf16 or fp32 on a CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision region. Its weight-copy cache is off: each weight is used once per forward
    pass, so the cache saves no casts, yet it would keep every low-precision weight copy alive
    until the forward pass ends, defeating activation checkpointing (0.16 GiB on gpt2-125m)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=False)
