"""Peak live tensor memory: ``benchmarks/memtrack.py`` against hand counts and PyTorch's MemTracker."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from memtrack import (
    GRADS,
    OPTIMIZER_STATE,
    PARAMS,
    MemoryReport,
    PeakMemoryTracker,
    measure_peak,
)

F32 = 4


def test_known_allocations_give_exact_peak_and_current() -> None:
    with PeakMemoryTracker() as t:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        b = torch.empty(250, dtype=torch.float64)  # 2000 B
        assert t.current_bytes == 6000
        del b
        assert t.current_bytes == 4000
        c = torch.empty(100)  # 400 B: below the old peak
        assert (t.current_bytes, t.peak_bytes) == (4400, 6000)
    r = t.report()
    assert (r.peak_bytes, r.current_bytes, r.start_bytes) == (6000, 4400, 0)
    assert r.method == "dispatch-tracker" and r.peak_op == "aten.empty.memory_format"
    assert sum(r.peak_breakdown.values()) == r.peak_bytes
    del a, c


def test_freeing_between_ops_is_seen() -> None:
    """a (4000) and b (4000) alive, a freed, then c: the peak is two tensors, not three."""
    with PeakMemoryTracker() as t:
        a = torch.ones(1000)
        b = a * 2
        del a
        assert t.current_bytes == 4000
        c = b + 1
        assert t.current_bytes == 8000
        del b, c
        assert t.current_bytes == 0
    assert t.peak_bytes == 8000


def test_views_and_in_place_ops_are_not_counted_again() -> None:
    with PeakMemoryTracker() as t:
        a = torch.zeros(64, 64)
        views = [a.view(-1), a.t(), a[::2], a[1:3, 4:], *a.split(16), a.unsqueeze(0).expand(3, 64, 64)]
        a.add_(1).mul_(2)
        a[0].fill_(3)
        torch.add(a, 1, out=a)
        assert t.current_bytes == 64 * 64 * F32
        del a
        assert t.current_bytes == 64 * 64 * F32  # the views keep the storage alive
        del views
        assert t.current_bytes == 0
    assert t.peak_bytes == 64 * 64 * F32


def test_pre_existing_tensors_are_counted_once() -> None:
    x = torch.empty(1000)
    t = PeakMemoryTracker()
    assert t.track_existing([x, x.view(10, 100), {"again": x[5:]}]) == 4000
    assert t.track_existing(x) == 0
    with t:
        y = x + 1  # 4000 new
        assert t.current_bytes == 8000
        del y
    r = t.report()
    assert (r.start_bytes, r.peak_bytes, r.current_bytes, r.unregistered_bytes) == (4000, 8000, 4000, 0)
    assert r.peak_breakdown == {"inputs": 4000, "other": 4000}


def test_unregistered_inputs_are_counted_and_reported() -> None:
    x = torch.empty(500)  # never registered
    with PeakMemoryTracker() as t:
        y = x * 2
    r = t.report()
    assert r.unregistered_bytes == 2000
    assert r.peak_bytes == 4000 and r.peak_breakdown == {"unregistered": 2000, "other": 2000}
    del y


def test_device_filter_counts_only_that_device() -> None:
    with PeakMemoryTracker(device="meta") as t:
        torch.empty(1000)
        kept = torch.empty(1000)
    assert t.peak_bytes == 0 and t.current_bytes == 0
    del kept


def test_autograd_gradients_are_counted_and_labelled() -> None:
    w = torch.nn.Parameter(torch.zeros(1000))
    model = torch.nn.Module()
    model.w = w
    t = PeakMemoryTracker()
    t.track_module(model)
    with t:
        (w * 2).sum().backward()  # mul's backward makes the 4000-byte gradient; AccumulateGrad keeps it
        gc.collect()
        assert t.current_bytes == 8000
        assert t.current_breakdown() == {PARAMS: 4000, GRADS: 4000}
    assert 8000 <= t.peak_bytes <= 8000 + 64  # plus a few scalars (loss, its gradient)
    assert t.report().phase_peaks.keys() >= {"backward"}


def _mlp_step() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, callable]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)

    def step() -> None:
        loss = model(x).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # builds the optimizer state: the measured step is a steady-state one
    return model, opt, x, step


def test_mlp_training_step_peak_lies_between_static_sum_and_a_loose_bound() -> None:
    model, opt, x, step = _mlp_step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    static = 2 * params + state  # params + grads + AdamW moments and step counters
    r = measure_peak(step, device="cpu", model=model, optimizer=opt, tensors=[x])
    assert isinstance(r, MemoryReport)
    assert r.start_bytes == params + state + x.nbytes
    assert r.current_bytes == r.start_bytes  # grads set to None again, nothing leaked
    activations = 32 * (64 + 256 + 256 + 64) * F32  # input, hidden, GELU output, output
    assert static <= r.peak_bytes <= static + x.nbytes + 4 * activations + 2 * params
    assert r.peak_breakdown[PARAMS] == params and r.peak_breakdown[OPTIMIZER_STATE] == state
    assert sum(r.peak_breakdown.values()) == r.peak_bytes
    assert set(r.phase_peaks) >= {"forward", "backward", "optimizer"}
    assert r.unregistered_bytes == 0


def test_first_step_labels_new_optimizer_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW(model.parameters())
    t = PeakMemoryTracker()
    t.track_module(model)
    t.track_optimizer(opt)
    with t:
        model(torch.randn(4, 32)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = sum(v.nbytes for s in opt.state.values() for v in s.values())
    assert t.current_breakdown()[OPTIMIZER_STATE] == state
    assert t.report().peak_breakdown[GRADS] == sum(p.nbytes for p in model.parameters())


def test_agrees_with_pytorch_memtracker_on_an_mlp_step() -> None:
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    model, opt, x, step = _mlp_step()
    ours = PeakMemoryTracker()
    ours.track_module(model)
    ours.track_optimizer(opt)
    ours.track_existing(x)
    theirs = mem_tracker.MemTracker()
    theirs.track_external(model, opt, x)
    with theirs, ours:
        step()
    peak = sum(snap["Total"] for snap in theirs.get_tracker_snapshot("peak").values())
    assert ours.peak_bytes == peak


def test_reset_peak_starts_from_the_current_total() -> None:
    with PeakMemoryTracker() as t:
        a = torch.empty(1000)
        del a
        t.reset_peak()
        b = torch.empty(10)
    assert t.peak_bytes == 40 and t.report().peak_breakdown == {"other": 40}
    del b


def test_measure_peak_rejects_unknown_method() -> None:
    with pytest.raises(ValueError):
        measure_peak(lambda: None, device="cpu", method="rss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_uses_the_allocator_and_agrees_with_the_tracker() -> None:
    def fn() -> None:
        a = torch.empty(1 << 20, device="cuda")  # 4 MiB
        b = torch.empty(1 << 19, device="cuda")  # 2 MiB
        del a, b

    r = measure_peak(fn, device="cuda")
    assert r.method == "cuda-allocator"
    assert r.peak_bytes - r.start_bytes == 6 << 20
    t = measure_peak(fn, device="cuda", method="tracker")
    assert t.method == "dispatch-tracker" and t.peak_bytes == 6 << 20


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("pocketlm_memory_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_measure_training_step_on_a_small_model() -> None:
    from pocketlm.config import ModelConfig

    bench = _load_benchmark()
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=101)
    row = bench.measure_training_step(cfg, 2, 16, precision="fp32", device="cpu")
    static = row["static_bytes"]
    # wte (tied with lm_head), wpe, two LayerNorms, attention, MLP, final LayerNorm: by hand.
    n_params = 101 * 32 + 16 * 32 + 2 * (2 * 32) + (32 * 96 + 96) + (32 * 32 + 32) \
        + (32 * 128 + 128) + (128 * 32 + 32) + 2 * 32
    assert static["params"] == 4 * n_params and static["grads"] == 4 * n_params
    assert static["total"] < row["peak_bytes"] < static["total"] + (4 << 20)
    assert row["unregistered_bytes"] == 0 and row["method"] == "dispatch-tracker"
    low = bench.measure_training_step(cfg, 2, 16, precision="fp32", device="cpu", low_memory=True)
    assert low["low_memory"] and low["static_bytes"]["grads"] == 2 * n_params  # bf16 gradient buffers
    assert low["static_bytes"]["params"] == 4 * n_params and low["unregistered_bytes"] == 0


def test_benchmark_replaces_only_its_docs_section() -> None:
    _load_benchmark()  # puts benchmarks/ on sys.path
    import _common as common
    text = "# Benchmarks\n\n## Batching\n\nkeep\n\n## Memory\n\nold\n```\n## not a heading\n```\n\n## Generation\n\nkeep too\n"
    new = common.replace_section(text, "## Memory\n\nnew\n", "## Memory")
    assert new == "# Benchmarks\n\n## Batching\n\nkeep\n\n## Memory\n\nnew\n\n## Generation\n\nkeep too\n"
    assert common.replace_section("# Benchmarks\n", "## Memory\n\nx\n", "## Memory") == "# Benchmarks\n\n## Memory\n\nx\n"


def test_foreach_and_fused_kernel_outputs_are_counted() -> None:
    a, b = torch.zeros(100), torch.zeros(300)
    with PeakMemoryTracker() as t:
        outs = torch._foreach_mul([a, b], 2.0)  # new tensors made inside one C++ kernel
        assert t.current_bytes == 1600 + 1600  # a and b count from their first use, as inputs
        torch._foreach_add_(outs, 1.0)  # in place: nothing new
        assert t.current_bytes == 3200
        del outs
        assert t.current_bytes == 1600
    assert t.report().unregistered_bytes == 1600  # a and b were not registered


def test_agrees_with_memtracker_under_selective_activation_checkpointing() -> None:
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    def policy(ctx, op, *args, **kwargs):  # keep matmuls, recompute the rest
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 256, bias=False), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)
    ours = PeakMemoryTracker()
    ours.track_module(block)
    ours.track_existing(x)
    theirs = mem_tracker.MemTracker()
    theirs.track_external(block, x)
    with theirs, ours:
        y = checkpoint(block, x, use_reentrant=False,
                       context_fn=lambda: create_selective_checkpoint_contexts(policy))
        y.pow(2).sum().backward()
        del y
    peak = sum(snap["Total"] for snap in theirs.get_tracker_snapshot("peak").values())
    assert ours.peak_bytes == peak
    assert ours.report().phase_peaks.keys() >= {"forward", "backward"}
