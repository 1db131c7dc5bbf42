"""Device and precision choice."""

from __future__ import annotations

import pytest
import torch

from pocketlm import device as device_mod
from pocketlm.device import autocast, resolve_device, resolve_precision
from pocketlm.errors import ConfigError


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("bf16_ok, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_gpu(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_explicit_precision_wins_and_is_checked():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("int4", torch.device("cpu"))


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx2 avx512f", False),  # AVX-512 without its bf16 extension
    ("fpu avx512f avx512_bf16", True),
    ("fpu amx_bf16 amx_tile", True),
    ("fpu amx_tile", False),  # tiles alone do not multiply bf16
])
def test_native_bf16_is_read_from_the_first_cpus_flags(flags, expected):
    cpuinfo = (f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
               "processor\t: 1\nflags\t\t: amx_bf16\n")  # only the first CPU's line counts
    assert device_mod.native_bf16_in(cpuinfo) is expected
    assert device_mod.native_bf16_in("processor\t: 0\n") is False  # no flags line at all


def test_autocast_bf16_on_cpu_runs_matmuls_in_bf16():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32
