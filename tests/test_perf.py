"""Speed accounting (FLOPs, peak, MFU, allocator setting) and the fast path's correctness:
compiled bf16 training must follow the plain fp32 loss curve."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pocketlm.config import PRESETS, ModelConfig, build_train_config
from pocketlm import perf
from pocketlm.perf import (flops_per_token, keep_freed_memory_for_reuse, known_peak_flops,
                           measure_matmul_peak, throughput)
from pocketlm.plan import COMPILE_MIN_PEAK_SECONDS, should_compile, work_seconds_at_peak
from pocketlm.train import train


def test_flops_per_token_counts_every_matmul_weight_and_attention():
    cfg = PRESETS["gpt2-125m"]
    # 12 blocks x (qkv 3C^2 + proj C^2 + mlp 8C^2) + the tied output layer, 6 FLOPs per weight per
    # token, plus attention's QK^T and AV: 2 products x 2 FLOPs x T x C per layer, x3 with backward.
    weights = 12 * 12 * 768 ** 2 + 50257 * 768
    assert flops_per_token(cfg, 512) == 6 * weights + 12 * 12 * 512 * 768
    assert 0.79e9 < flops_per_token(cfg, 512) < 0.81e9
    small = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=100)
    assert flops_per_token(small, 64) < flops_per_token(small, 128)  # longer context, more attention


def test_measured_matmul_peak_is_products_over_time(monkeypatch):
    """On a clock that advances 0.01 s per reading, the peak is exactly the products' FLOPs over the
    time the timed rounds took: 2 n^3 per product, rounds of 4, until min_seconds have passed."""
    ticks = iter(range(10_000))
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(ticks) * 0.01)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(perf.torch, "mm", lambda a, b, out=None: calls.append(1) or real_mm(a, b, out=out))
    peak = measure_matmul_peak("cpu", torch.float32, size=64, min_seconds=0.05)
    timed = len(calls) - 3  # three warm-up products
    assert timed == 20  # five rounds of four: the clock reads 0.01 s further after each round
    assert peak == pytest.approx(2 * 64 ** 3 * timed / 0.05)
    monkeypatch.undo()
    # and a real measurement of a product this machine can do is a positive, finite rate
    real = measure_matmul_peak("cpu", torch.float32, size=128, min_seconds=0.02)
    assert 0 < real < float("inf")


def test_throughput_and_mfu():
    speed = throughput(tokens=8192, seconds=4.0, flops_per_tok=1e9, peak_flops=4e12)
    assert speed.tokens_per_s == 2048
    assert speed.mfu == pytest.approx(0.512)
    assert throughput(100, 1.0, 1e9, None).mfu is None


def test_no_datasheet_peak_for_a_cpu():
    assert known_peak_flops(torch.device("cpu")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_setting_takes_on_glibc():
    assert keep_freed_memory_for_reuse() is True


def test_auto_compile_only_when_the_run_repays_compiling():
    auto = build_train_config(None, preset="tiny").run.compile
    cpu, mps = "cpu", "mps"
    assert should_compile(auto, cpu, COMPILE_MIN_PEAK_SECONDS)
    assert not should_compile(auto, cpu, COMPILE_MIN_PEAK_SECONDS - 1)
    assert not should_compile(auto, cpu, None)  # no peak known
    assert not should_compile(auto, mps, 10 * COMPILE_MIN_PEAK_SECONDS)
    assert not should_compile(build_train_config(None, preset="tiny", compile=False).run.compile, cpu, 1e9)
    assert should_compile(build_train_config(None, preset="tiny", compile=True).run.compile, cpu, 0.0)


def test_work_at_peak_separates_the_presets_as_measured():
    """At this CPU's ~2.5 TFLOP/s bf16 peak: gpt2-125m's seed workload compiles from a couple of
    dozen steps (it repays compiling after 10-16), the README's 200-step tiny run does not (it
    would need ~1,750 steps), the same tiny preset trained for 3,000 steps does."""
    peak = 2.5e12
    gpt2 = flops_per_token(PRESETS["gpt2-125m"], 512)
    tiny = flops_per_token(PRESETS["tiny"], 128)
    assert work_seconds_at_peak(24, 8192, gpt2, peak) >= COMPILE_MIN_PEAK_SECONDS
    assert work_seconds_at_peak(10, 8192, gpt2, peak) < COMPILE_MIN_PEAK_SECONDS
    assert work_seconds_at_peak(200, 2048, tiny, peak) < COMPILE_MIN_PEAK_SECONDS
    assert work_seconds_at_peak(3000, 2048, tiny, peak) >= COMPILE_MIN_PEAK_SECONDS
    assert work_seconds_at_peak(10, 8192, gpt2, None) is None


def _curve(corpus_file, tmp_path, name, **overrides):
    # No dropout: compiled code draws its random masks differently, which is not what is tested.
    cfg = build_train_config(None, preset="tiny", model={"n_layer": 2, "n_head": 2, "n_embd": 64,
                                                           "block_size": 64, "dropout": 0.0},
                             data=str(corpus_file), out_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                             max_steps=8, batch_size=4, grad_accum=2, device="cpu", batching="pack",
                             eval_interval=100, save_interval=100, log_interval=1, warmup_steps=1,
                             lr=3e-3, seed=3, **overrides)
    result = train(cfg, show_progress=False)
    steps = [r for r in result.history if r.get("event") == "step"]
    start = next(r for r in result.history if r.get("event") == "start")
    return start, [r["loss"] for r in steps], steps


@pytest.mark.slow
@pytest.mark.real_peak  # it checks the log's peak is the one measured on this device
@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported(),
                    reason="bf16 autocast is emulated (and slow) without AVX512-BF16 or AMX")
def test_fast_path_follows_the_plain_loss_curve(corpus_file, tmp_path):
    """The trainer's fast path (torch.compile + bf16 autocast + compiled loss kernel) and the
    plain path (eager fp32) from the same initialisation and batches: the loss curves agree to
    bf16 rounding over 8 steps, while the loss itself falls by far more than that tolerance."""
    plain_start, plain, _ = _curve(corpus_file, tmp_path, "plain", precision="fp32", compile=False)
    fast_start, fast, steps = _curve(corpus_file, tmp_path, "fast", precision="bf16", compile=True)
    assert (plain_start["compiled"], fast_start["compiled"]) == (False, True)
    assert plain[0] - plain[-1] > 0.5  # it is learning, so a broken fast path could not hide
    for a, b in zip(fast, plain):
        assert a == pytest.approx(b, rel=2e-3)  # measured: 2e-5
    # the log carries speed and MFU against the measured peak of this device
    assert fast_start["peak_flops"] > 0 and "measured bf16" in fast_start["peak_flops_source"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in steps)
    json.dumps(fast_start)  # the start event is plain JSON


@pytest.mark.slow
def test_compiled_fp32_matches_eager_fp32_closely(corpus_file, tmp_path):
    """torch.compile alone (no precision change) must not move the curve beyond fp32 rounding."""
    _, eager, _ = _curve(corpus_file, tmp_path, "eager", precision="fp32", compile=False)
    _, compiled, _ = _curve(corpus_file, tmp_path, "compiled", precision="fp32", compile=True)
    for a, b in zip(compiled, eager):
        assert a == pytest.approx(b, rel=1e-5)  # measured: 1e-7


def test_busy_cpu_is_told_once_and_a_quiet_one_not():
    from pocketlm.perf import busy_cpu_warning

    assert busy_cpu_warning(190e9, 100e9, 2) is None  # two threads at 95% of twice one thread
    assert busy_cpu_warning(1e9, 100e9, 1) is None  # one thread: nothing to compare
    warning = busy_cpu_warning(80e9, 100e9, 2)  # two threads no faster than one: the other core is taken
    assert warning is not None and "CPU is busy" in warning and "40%" in warning and "100 GFLOP/s" in warning


@pytest.mark.real_peak
def test_trainer_warns_when_its_measured_peak_says_the_cpu_is_busy(monkeypatch, corpus_file, tmp_path):
    from pocketlm import plan as plan_mod

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(plan_mod, "measure_matmul_peak", lambda *a, **k: 1e9)  # four threads...
    monkeypatch.setattr(plan_mod, "one_thread_matmul_peak", lambda dtype: 1e9)  # ...as fast as one
    cfg = build_train_config(None, preset="tiny", model=dict(n_layer=1, n_embd=32, n_head=2, block_size=32),
                             data=str(corpus_file), out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"),
                             max_steps=1, batch_size=2, grad_accum=1, precision="fp32", device="cpu",
                             eval_batches=1, compile=False)
    notes = [r["message"] for r in train(cfg, show_progress=False).history if r["event"] == "note"]
    assert len(notes) == 1 and "CPU is busy" in notes[0] and "25%" in notes[0]
