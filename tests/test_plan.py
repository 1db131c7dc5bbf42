"""The run plan: decided once from the config and the machine, written down, and read back by
every resume instead of being decided again."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pocketlm import plan as plan_mod
from pocketlm.checkpoint import latest_checkpoint
from pocketlm.config import build_train_config
from pocketlm.plan import COMPILE_MIN_PEAK_SECONDS, Machine, RunPlan, make_plan, resume_plan
from pocketlm.planner import GiB
from pocketlm.train import train

REPO = Path(__file__).resolve().parents[1]
LENGTHS = np.array([128] * 300 + [40] * 100)  # tiny's context is 128
CPU = Machine("cpu", "fp32", 1e12, "measured fp32 2048x2048 matmul")


def tiny(**overrides):
    return build_train_config(None, preset="tiny", **overrides)


def test_plan_is_a_pure_function_of_config_machine_and_data():
    cfg = tiny(max_steps=50, batch_size=4, grad_accum=2)
    a, b = make_plan(cfg, CPU, LENGTHS), make_plan(cfg, CPU, LENGTHS)
    assert a == b
    assert (a.batch_size, a.grad_accum, a.total_steps, a.warmup_steps) == (4, 2, 50, 5)  # warmup <= 10%
    assert a.tokens_per_step == 4 * 2 * 128 and a.checkpointing == "selective"
    by_epochs = make_plan(tiny(epochs=2, batch_size=4, grad_accum=2), CPU, LENGTHS)
    assert by_epochs.total_steps == 2 * by_epochs.steps_per_epoch
    assert make_plan(tiny(low_memory=True), CPU, LENGTHS).checkpointing == "full"
    assert a.tokenizer == "gpt2" and make_plan(cfg, CPU, LENGTHS, tokenizer="mine").tokenizer == "mine"
    older = {k: v for k, v in a.to_dict().items() if k not in ("tokenizer", "predicted_peak_bytes", "cpu_threads")}
    assert RunPlan.from_dict(older) == dataclasses.replace(a, cpu_threads=None)  # an earlier plan still reads


def test_compile_follows_the_work_at_the_measured_peak():
    cfg = tiny(max_steps=100)
    fast = dataclasses.replace(CPU, peak_flops=1e15)
    slow = dataclasses.replace(CPU, peak_flops=1e3)
    assert not make_plan(cfg, fast, LENGTHS).compiled
    assert make_plan(cfg, slow, LENGTHS).compiled
    assert not make_plan(tiny(max_steps=100, compile=False), slow, LENGTHS).compiled
    plan = make_plan(cfg, slow, LENGTHS)
    work = plan.total_steps * plan.tokens_per_step * plan.flops_per_token / slow.peak_flops
    assert work >= COMPILE_MIN_PEAK_SECONDS


def test_vram_budget_is_fitted_into_the_plan():
    cfg = build_train_config(None, vram="3GB", batch_size=4, grad_accum=4)
    machine = Machine("cuda", "bf16", None, "unavailable", memory_budget_bytes=3 * GiB)
    plan = make_plan(cfg, machine, np.array([512] * 64))
    assert plan.batch_size * plan.grad_accum == 16 and plan.predicted_peak_bytes <= 3 * GiB


def test_resume_reads_the_plan_back_and_replans_only_what_may_change():
    cfg = tiny(max_steps=100)
    saved = make_plan(cfg, CPU, LENGTHS)
    busier = dataclasses.replace(CPU, peak_flops=1e3)  # re-deciding would now compile
    same, notes = resume_plan(saved, cfg, cfg, busier)
    assert same == saved and notes == []
    forced, notes = resume_plan(saved, cfg, tiny(max_steps=100, compile=True), busier)
    assert forced.compiled and "--compile" in notes[0]
    longer, notes = resume_plan(saved, cfg, tiny(max_steps=300, resume="x"), CPU)
    assert (longer.total_steps, longer.warmup_steps) == (300, 30) and "300" in notes[0]
    moved, notes = resume_plan(saved, cfg, cfg, Machine("cuda", "bf16", 1e14, "datasheet bf16"))
    assert (moved.device, moved.precision) == ("cuda", "bf16") and "no longer bit-identical" in notes[0]
    assert RunPlan.from_dict(json.loads(json.dumps(saved.to_dict()))) == saved


def test_the_plan_splits_each_step_across_the_ranks_and_a_resume_may_change_their_number():
    from pocketlm.errors import ConfigError

    cfg = tiny(max_steps=100, batch_size=2, grad_accum=4)
    two = dataclasses.replace(CPU, world_size=2)
    plan = make_plan(cfg, two, LENGTHS)
    assert (plan.world_size, plan.rank_accum, plan.fsdp) == (2, 2, False)
    assert (plan.batch_size, plan.grad_accum) == (2, 4)
    assert plan.steps_per_epoch == make_plan(cfg, CPU, LENGTHS).steps_per_epoch
    with pytest.raises(ConfigError, match="cannot be split evenly across 3 ranks"):
        make_plan(cfg, dataclasses.replace(CPU, world_size=3), LENGTHS)
    with pytest.raises(ConfigError, match="needs at least two"):
        make_plan(tiny(fsdp=True), CPU, LENGTHS)
    with pytest.raises(ConfigError, match="--low-memory works in a single process"):
        make_plan(tiny(low_memory=True), two, LENGTHS)
    with pytest.raises(ConfigError, match="fp16"):
        make_plan(tiny(fsdp=True), Machine("cuda", "fp16", None, "unavailable", world_size=2), LENGTHS)
    # Saved on two ranks, resumed on one and on four (sharded): the same global batch.
    one, notes = resume_plan(plan, cfg, cfg, CPU)
    assert (one.world_size, one.rank_accum) == (1, 4) and "1 rank(s)" in notes[0]
    four, notes = resume_plan(plan, cfg, tiny(max_steps=100, batch_size=2, grad_accum=4, fsdp=True),
                              dataclasses.replace(CPU, world_size=4))
    assert (four.world_size, four.rank_accum, four.fsdp) == (4, 1, True) and any("sharded" in n for n in notes)
    with pytest.raises(ConfigError, match="3 ranks"):
        resume_plan(plan, cfg, cfg, dataclasses.replace(CPU, world_size=3))
    # A --vram budget is per rank: the planner keeps each step splittable and counts the shards.
    budget = build_train_config(None, vram="3GB", batch_size=4, grad_accum=4)
    cuda = Machine("cuda", "bf16", None, "unavailable", memory_budget_bytes=3 * GiB, world_size=2)
    fitted = make_plan(budget, cuda, np.array([512] * 64))
    assert fitted.grad_accum % 2 == 0 and fitted.batch_size * fitted.grad_accum == 16
    sharded = make_plan(budget.replace(fsdp=True), cuda, np.array([512] * 64))
    assert sharded.predicted_peak_bytes < fitted.predicted_peak_bytes


@pytest.mark.slow
@pytest.mark.real_peak
def test_kill_dash_nine_then_resume_on_a_slower_machine_keeps_the_plan(tmp_path, corpus_file, monkeypatch):
    """A run killed with SIGKILL after a checkpoint, resumed while the matmul timing says the run
    would now be worth compiling, ends bit-identical to an uninterrupted run: the resume read the
    plan (not compiled) back instead of deciding again."""
    args = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--block-size", "64",
            "--data", str(corpus_file), "--max-steps", "12", "--save-interval", "2", "--eval-interval", "6",
            "--eval-batches", "2", "--batch-size", "2", "--grad-accum", "2", "--precision", "fp32", "--device", "cpu",
            "--seed", "5"]
    cfg = build_train_config(None, preset="tiny", model=dict(n_layer=1, n_embd=64, n_head=2, block_size=64),
                             data=str(corpus_file), max_steps=12, save_interval=2, eval_interval=6, eval_batches=2,
                             batch_size=2, grad_accum=2, precision="fp32", device="cpu", seed=5,
                             cache_dir=str(tmp_path / "cache"))
    straight = train(cfg.replace(out_dir=str(tmp_path / "straight")), show_progress=False)
    assert not next(r for r in straight.history if r["event"] == "start")["compiled"]

    run = tmp_path / "killed"
    import torch

    # the same thread count as this process: it sets how reductions split (see the next test)
    env = dict(os.environ, POCKETLM_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--out-dir", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while latest_checkpoint(run) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal landed")
    assert latest_checkpoint(run) is not None and latest_checkpoint(run).name != "step-00000012"

    monkeypatch.setattr(plan_mod, "measure_matmul_peak", lambda *a, **k: 1e3)  # a machine 1e8x slower
    assert make_plan(cfg, plan_mod.probe_machine(cfg), np.array([64] * 200)).compiled  # deciding again would compile
    resumed = train(cfg.replace(out_dir=str(run)), show_progress=False)
    start = [r for r in resumed.history if r["event"] == "start"][-1]
    assert start["start_step"] > 0 and start["compiled"] is False
    assert (resumed.final_checkpoint / "model.safetensors").read_bytes() == \
        (straight.final_checkpoint / "model.safetensors").read_bytes()


def test_resume_runs_with_the_runs_own_thread_count(tmp_path, corpus_file):
    """The CPU thread count sets how reductions split: a resume in a process with another count
    takes the run's own (and says so), so it ends bit-identical."""
    import torch

    from pocketlm.train import train

    cfg = build_train_config(None, preset="tiny", model=dict(n_layer=1, n_embd=64, n_head=2, block_size=64),
                             data=str(corpus_file), max_steps=4, save_interval=2, eval_interval=4, eval_batches=1,
                             batch_size=2, grad_accum=2, precision="fp32", device="cpu", seed=5, compile=False,
                             cache_dir=str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    target = 2 if threads != 2 else 1
    try:
        torch.set_num_threads(target)
        straight = train(cfg.replace(out_dir=str(tmp_path / "straight")), show_progress=False)

        class Crash(Exception):
            pass

        def crash_at_2(step: int) -> None:
            if step == 2:
                raise Crash

        with pytest.raises(Crash):
            train(cfg.replace(out_dir=str(tmp_path / "run")), on_step=crash_at_2, show_progress=False)
        torch.set_num_threads(3 - target)  # the other count
        seen = []
        resumed = train(cfg.replace(out_dir=str(tmp_path / "run")), on_step=lambda s: seen.append(torch.get_num_threads()),
                        show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert seen == [target, target]
    notes = [r["message"] for r in resumed.history if r["event"] == "note"]
    assert any(f"the run's {target} torch threads" in n for n in notes)
    assert (resumed.final_checkpoint / "model.safetensors").read_bytes() == \
        (straight.final_checkpoint / "model.safetensors").read_bytes()
