"""The GPU path: device and precision choice, fp16 with loss scaling, compiled training, packed
attention, cached decoding and the out-of-memory back-off, each checked on CUDA.

Every check is a helper that takes the device. The CPU case of each runs in every test run, so
the check itself cannot rot on machines without a GPU; the CUDA case is marked ``cuda`` and skips
where no GPU is available. On a GPU machine ``python -m pytest -m cuda -q tests/test_cuda.py``
runs only the CUDA cases (one of ``benchmarks/gpu_check.py``'s steps).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pocketlm.batching import Batch, MicroBatch, collate
from pocketlm.config import ModelConfig, build_train_config
from pocketlm.data import ExampleSet
from pocketlm.generate import Generator
from pocketlm.losses import NextTokenLoss
from pocketlm.model import GPT
from pocketlm.plan import Machine, make_plan, probe_machine
from pocketlm.state import TrainState
from pocketlm.train import build_state, step_halving_on_oom, train_step

from test_generate import make_model  # random weights with well-separated logits

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda], id="cuda")
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]

# Small enough for a CPU step in milliseconds; no dropout, so compiled and eager draw no masks.
SMALL_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.0}
VOCAB = 50257  # the tiny preset's, GPT-2's


def small_state(device: str, precision: str, *, compile: bool = False, batch_size: int = 4,
                model: dict | None = None, **settings) -> tuple[TrainState, torch.nn.Module, str]:
    """The model, optimizer and objective exactly as ``train`` builds them for this device and
    precision (the plan given, not probed, so that CPU runs may take fp16 too)."""
    cfg = build_train_config(None, preset="tiny", model=dict(model or SMALL_MODEL), device=device,
                             precision=precision, compile=compile, batch_size=batch_size, grad_accum=1, lr=1e-3,
                             warmup_steps=0, seed=3, **settings)
    lengths = np.full(4 * batch_size, cfg.model_config().block_size)
    plan = make_plan(cfg, Machine(device, precision, None, "not measured"), lengths)
    state, objective = build_state(cfg, plan, lengths)
    return state, objective, plan.precision


def random_micro_batch(rows: int, seq_len: int, seed: int) -> MicroBatch:
    tokens = torch.randint(0, VOCAB, (rows, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return MicroBatch(tokens[:, :-1].clone(), tokens[:, 1:].clone(), None, None, rows * seq_len)


def losses_of_steps(state: TrainState, objective: torch.nn.Module, precision: str, device: str,
                    batches: list[MicroBatch], lr: float = 1e-3) -> list[float]:
    return [train_step(objective, state.optimizer, [mb], lr=lr, device=torch.device(device), precision=precision,
                       scaler=state.scaler)[0] for mb in batches]


# ---------------------------------------------------------------------------------------------
# Device and precision: auto


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16_supported", [True, False], ids=["bf16-gpu", "older-gpu"])
def test_auto_picks_cuda_and_bf16_or_fp16_with_a_scaler(monkeypatch, device, bf16_supported):
    """``--device auto --precision auto`` on a GPU: cuda, bf16 autocast where the GPU has it, else
    fp16 with a GradScaler. The CPU case pretends a GPU is there and checks the choice only; the
    CUDA case also builds the state on the GPU and takes a step with it."""
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    cfg = build_train_config(None, preset="tiny", model=dict(SMALL_MODEL), device="auto", precision="auto",
                             batch_size=2, grad_accum=1, compile=False)
    machine = probe_machine(cfg, measure_peak=False)
    expected = "bf16" if bf16_supported else "fp16"
    assert (machine.device, machine.precision) == ("cuda", expected)
    plan = make_plan(cfg, machine, np.full(8, 64))
    assert (plan.device, plan.precision) == ("cuda", expected)
    if device == "cuda":
        state, objective = build_state(cfg, plan, np.full(8, 64))
        assert (state.scaler is not None) == (expected == "fp16")
        assert next(state.model.parameters()).device.type == "cuda"
        (loss,) = losses_of_steps(state, objective, plan.precision, "cuda", [random_micro_batch(2, 64, 0)])
        assert math.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# fp16 with loss scaling


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_steps_with_grad_scaler_are_finite_and_close_to_bf16_and_fp32(device):
    """Two optimizer steps on one batch from the same weights in fp32, bf16 and fp16 (with the
    GradScaler ``build_state`` makes for fp16): every loss is finite, the scaler did not skip
    the update, and the losses agree to the precisions' rounding. The second step's loss comes
    after an update, so it checks the unscaled gradients too."""
    batches = [random_micro_batch(2, 32, seed=1)] * 2  # small: a CPU without native bf16 emulates it
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        state, objective, precision = small_state(device, precision)
        losses[precision] = losses_of_steps(state, objective, precision, device, batches, lr=1e-2)
        if precision == "fp16":
            assert state.scaler is not None and state.scaler.get_scale() >= 2.0 ** 16  # no step skipped
    assert all(math.isfinite(x) for run in losses.values() for x in run)
    assert losses["fp32"][1] < losses["fp32"][0]  # the update moved the loss
    for precision in ("bf16", "fp16"):
        for low, full in zip(losses[precision], losses["fp32"]):
            assert low == pytest.approx(full, rel=2e-3), (precision, losses)  # CPU: within 2e-5
    for fp16, bf16 in zip(losses["fp16"], losses["bf16"]):
        assert fp16 == pytest.approx(bf16, rel=2e-3)


# ---------------------------------------------------------------------------------------------
# Compiled and eager


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_and_eager_training_follow_the_same_loss_curve(device):
    """torch.compile (blocks and loss kernel, as the trainer applies it) against eager from the
    same weights over six steps: the same curve to rounding (bf16 on CUDA, as a GPU run trains;
    fp32 on a CPU, where bf16 may be emulated), while the loss falls by far more than that."""
    precision, rel = ("bf16", 1e-2) if device == "cuda" else ("fp32", 1e-5)
    batches = [random_micro_batch(4, 64, seed) for seed in (1, 2, 3)] * 2
    curves = {}
    for compiled in (False, True):
        state, objective, _ = small_state(device, precision, compile=compiled)
        curves[compiled] = losses_of_steps(state, objective, precision, device, batches, lr=3e-3)
    assert curves[False][0] - curves[False][-1] > 0.1
    for compiled_loss, eager_loss in zip(curves[True], curves[False]):
        assert compiled_loss == pytest.approx(eager_loss, rel=rel), curves


# ---------------------------------------------------------------------------------------------
# Packed documents


def packed_forward(model: GPT, device: str, precision: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of one row packing two documents (13 and 19 tokens), and of each document alone."""
    from pocketlm.device import autocast

    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in (13, 19)]
    row = torch.cat(docs, dim=1).to(device)
    position_ids = torch.cat([torch.arange(d.size(1)) for d in docs])[None].to(device)
    segment_ids = torch.cat([torch.full((d.size(1),), i) for i, d in enumerate(docs)])[None].to(device)
    with torch.no_grad(), autocast(torch.device(device), precision):
        packed = model(row, position_ids=position_ids, segment_ids=segment_ids).float()
        alone = [model(d.to(device)).float() for d in docs]
    return packed.cpu(), [a.cpu() for a in alone]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_packed_document_attention_matches_each_document_alone_and_the_cpu(device, precision):
    """A packed row (segment ids and per-document positions) gives each document the logits it
    gets alone, on the device's attention kernels; on CUDA also what the CPU computes in fp32."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=101, dropout=0.0)).eval()
    reference, _ = packed_forward(model, "cpu", "fp32")
    packed, alone = packed_forward(copy.deepcopy(model).to(device), device, precision)
    tol = dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(packed[:, :13], alone[0], **tol)
    torch.testing.assert_close(packed[:, 13:], alone[1], **tol)
    torch.testing.assert_close(packed, reference, **(dict(atol=1e-4, rtol=1e-4) if precision == "fp32" else tol))


# ---------------------------------------------------------------------------------------------
# Cached decoding


def greedy_model() -> GPT:
    """GPT-2's vocabulary on a model small enough to decode in milliseconds, with well-separated
    logits so that greedy choices are not decided by rounding (as in test_generate.py)."""
    return make_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB, dropout=0.0))


def greedy_tokens(model: GPT, tokenizer, device: str, prompts: list[str], **settings) -> list[list[int]]:
    generator = Generator(copy.deepcopy(model), tokenizer, device, "fp32", **settings)
    samples = generator.generate(prompts, max_new_tokens=40, temperature=0, stop_tokens=())
    return [s.token_ids for s in samples]


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_decoding_gives_the_cpus_greedy_tokens(device, tokenizer):
    """Greedy decoding with the KV cache (a left-padded batch of three, and one prompt with prompt
    lookup), past the 32-token context so the window slides: on the device, the same tokens as
    decoding without the cache there, and as the cached decoder on the CPU."""
    model = greedy_model()
    for prompts in (["The history of", "Hello", "In 1999 the band released an album that"], ["A small town"]):
        cached = greedy_tokens(model, tokenizer, device, prompts)
        assert cached == greedy_tokens(model, tokenizer, device, prompts, recompute=True)
        assert cached == greedy_tokens(model, tokenizer, "cpu", prompts)
        assert all(len(tokens) == 40 for tokens in cached)


# ---------------------------------------------------------------------------------------------
# Out of memory


class RecordedLog:
    """What ``step_halving_on_oom`` writes to the run's log, kept for the test."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def console(self, message: str) -> None:
        pass


def uniform_examples(n: int, length: int, seed: int = 0) -> ExampleSet:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, n * length + 1).astype(np.uint16)
    return ExampleSet(tokens, np.arange(n, dtype=np.int64) * length, np.full(n, length, dtype=np.int64))


def one_batch(first_row: int, rows: int, length: int) -> list[Batch]:
    return [Batch(tuple(((i, 0, length),) for i in range(first_row, first_row + rows)), length)]


def step_with_backoff(state: TrainState, objective: torch.nn.Module, examples: ExampleSet, group: list[Batch],
                      device: str, precision: str, log: RecordedLog) -> tuple[float, float, int]:
    def step(micro: list[MicroBatch]) -> tuple[float, float]:
        return train_step(objective, state.optimizer, micro, lr=1e-3, device=torch.device(device),
                          precision=precision, scaler=state.scaler)

    return step_halving_on_oom(step, group, state, lambda b: collate(examples, b, VOCAB - 1), torch.device(device),
                               log)


def reserved_peak_of(run) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved()


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_memory_backoff_recovers_from_a_real_cuda_oom(device, monkeypatch):
    """One micro-batch of ``rows`` sequences does not fit, two of ``rows / 2`` do: the step
    halves its micro-batches, runs again and ends with a finite loss over every token. On CUDA the
    error is real: the caching allocator is capped (``set_per_process_memory_fraction``) midway
    between the two settings' measured reserved peaks. The CPU case raises it by hand."""
    rows, length = (32, 256) if device == "cuda" else (4, 32)
    model = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "dropout": 0.0} if device == "cuda" else \
        {**SMALL_MODEL, "block_size": 32}
    precision = "bf16" if device == "cuda" else "fp32"
    state, objective, _ = small_state(device, precision, model=model, batch_size=rows, checkpointing="none")
    examples = uniform_examples(4 * rows, length)
    log = RecordedLog()
    step_with_backoff(state, objective, examples, one_batch(0, 2, length), device, precision, log)  # AdamW state
    whole, halves = one_batch(rows, rows, length), one_batch(rows, rows // 2, length) + \
        one_batch(rows + rows // 2, rows // 2, length)
    if device == "cuda":
        fits = reserved_peak_of(lambda: step_with_backoff(state, objective, examples, halves, device, precision, log))
        too_big = reserved_peak_of(lambda: step_with_backoff(state, objective, examples, whole, device, precision,
                                                             log))
        assert too_big > 1.2 * fits, (fits, too_big)  # room for a cap between them
        assert state.progress.micro_splits == 0 and not [r for r in log.records if r["event"] == "oom"]
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((fits + too_big) / 2 / total)
    else:
        real = NextTokenLoss.forward

        def capped(self, idx, *args, **kwargs):
            if idx.size(0) > rows // 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(self, idx, *args, **kwargs)

        monkeypatch.setattr(NextTokenLoss, "forward", capped)
    try:
        loss, grad_norm, tokens = step_with_backoff(state, objective, examples, whole, device, precision, log)
    finally:
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    assert [r for r in log.records if r["event"] == "oom"] == [{"event": "oom", "step": 1, "micro_splits": 1}]
    assert state.progress.micro_splits == 1
    assert math.isfinite(loss) and math.isfinite(grad_norm) and tokens == rows * length
