"""Muon beside AdamW (``--optimizer muon``) and the warmup-stable-decay schedule (``--schedule wsd``)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from conftest import SMALL_VOCAB
from pocketlm.batching import MicroBatch
from pocketlm.config import ModelConfig, OptimConfig, build_train_config
from pocketlm.errors import ConfigError
from pocketlm.losses import NextTokenLoss
from pocketlm.model import GPT
from pocketlm.optim import (CosineSchedule, WSDSchedule, build_optimizer, hidden_matrix_names, make_schedule)
from pocketlm.train import train_step

CPU = torch.device("cpu")
MUON = OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
BLOCK_MATRICES = {f"transformer.h.{i}.{name}.weight" for i in range(2)
                  for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=SMALL_VOCAB, dropout=0.0))


def batch(seed: int = 1) -> MicroBatch:
    tokens = torch.randint(0, SMALL_VOCAB, (4, 17), generator=torch.Generator().manual_seed(seed))
    return MicroBatch(tokens[:, :-1].clone(), tokens[:, 1:].clone(), None, None, 4 * 16)


def names_of(model: GPT, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = build_optimizer(model, MUON, CPU)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    assert set(hidden_matrix_names(model)) == BLOCK_MATRICES
    muon_names = names_of(model, [p for g in muon.param_groups for p in g["params"]])
    adamw_names = names_of(model, [p for g in adamw.param_groups for p in g["params"]])
    assert muon_names == BLOCK_MATRICES
    assert adamw_names == {n for n, _ in model.named_parameters()} - BLOCK_MATRICES  # embeddings, norms, biases
    assert "transformer.wte.weight" in adamw_names  # the output layer is tied to it
    decayed = names_of(model, [p for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]])
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert muon.defaults["adjust_lr_fn"] == "original" and muon.defaults["momentum"] == MUON.muon_momentum
    assert muon.defaults["weight_decay"] == MUON.muon_weight_decay


def test_each_optimizer_updates_only_its_own_parameters():
    model = tiny_model()
    opt = build_optimizer(model, MUON, CPU)
    objective = NextTokenLoss(model)
    mb = batch()
    (objective(mb.input_ids, mb.targets) / mb.real_tokens).backward()
    opt.set_lr(MUON.lr)
    for which, expected in ((1, BLOCK_MATRICES), (0, {n for n, _ in model.named_parameters()} - BLOCK_MATRICES)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.optimizers[which].step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == expected


def test_schedule_scales_each_group_from_its_own_peak():
    opt = build_optimizer(tiny_model(), MUON, CPU)
    opt.set_lr(MUON.lr / 4)
    adamw, muon = opt.optimizers
    assert [g["lr"] for g in adamw.param_groups] == [MUON.lr / 4] * 2  # AdamW's groups exactly as before
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(MUON.muon_lr / 4)]


def test_adamw_alone_is_built_as_before():
    opt = build_optimizer(tiny_model(), OptimConfig(), CPU)
    (adamw,) = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    assert all("lr_scale" not in g for g in adamw.param_groups)
    assert "optimizers" not in opt.state_dict()  # a plain torch optimizer's layout, as earlier checkpoints hold


def _steps(model: GPT, opt, n: int, lr: float = MUON.lr) -> list[float]:
    objective = NextTokenLoss(model)
    return [train_step(objective, opt, [batch()], lr=lr, device=CPU)[0] for _ in range(n)]


def test_a_few_muon_steps_lower_the_loss():
    model = tiny_model()
    losses = _steps(model, build_optimizer(model, MUON, CPU), 8)
    assert losses[0] == pytest.approx(math.log(SMALL_VOCAB), abs=0.2)  # untrained: near uniform
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.4, losses
    # the matrices' share of the progress is Muon's: with its rate near zero the loss falls far less
    frozen = tiny_model()
    still = _steps(frozen, build_optimizer(frozen, OptimConfig(optimizer="muon", lr=1e-3, muon_lr=1e-9), CPU), 8)
    assert losses[-1] < still[-1] - 0.15, (losses, still)


def test_both_optimizers_state_round_trips_through_a_weights_only_load():
    model = tiny_model()
    opt = build_optimizer(model, MUON, CPU)
    _steps(model, opt, 2)
    buffer = io.BytesIO()
    torch.save({"weights": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    expected = _steps(model, opt, 2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert len(saved["optimizer"]["optimizers"]) == 2
    resumed = tiny_model(seed=5)
    resumed.load_state_dict(saved["weights"])
    opt2 = build_optimizer(resumed, MUON, CPU)
    opt2.load_state_dict(saved["optimizer"])
    assert _steps(resumed, opt2, 2) == expected  # the momentum buffers and AdamW moments came back
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_muon_with_low_memory_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="--low-memory .* --optimizer adamw only, not muon"):
        build_train_config(None, optimizer="muon", low_memory=True)
    with pytest.raises(ConfigError, match="not muon"):
        build_optimizer(tiny_model(), MUON, CPU, low_memory=True)


def test_wsd_schedule_shape():
    s = WSDSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, min_ratio=0.1, decay_fraction=0.2)
    lrs = [s.lr(i) for i in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # the same warmup as cosine
    assert s.decay_start == 80
    assert lrs[10:80] == [1.0] * 70  # stable at the peak
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert s.lr(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))  # 1 - sqrt: half way down at a quarter
    assert s.lr(100) == pytest.approx(0.1) and s.lr(10_000) == pytest.approx(0.1)
    # a warmup longer than the stable phase: the decay starts right after it
    assert WSDSchedule(1.0, 100, 90, 0.0, 0.2).decay_start == 90


def test_make_schedule_follows_the_config():
    assert make_schedule(OptimConfig(), 100, 10) == CosineSchedule(3e-4, 100, 10, 0.1)
    wsd = make_schedule(OptimConfig(schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.0, lr=1e-3), 100, 10)
    assert wsd == WSDSchedule(1e-3, 100, 10, 0.0, 0.5) and wsd.decay_start == 50


def test_the_cpu_muon_is_torchs_update_with_an_fp32_orthogonalisation(monkeypatch):
    """FP32Muon must be torch.optim.Muon's step (momentum, Nesterov, weight decay, per-matrix lr)
    with only the Newton-Schulz iteration's precision changed: with torch's iteration switched to
    fp32 as well, both give the same parameters and momentum after several steps."""
    import torch.optim._muon as torch_muon

    from pocketlm.optim import FP32Muon, orthogonalized

    def fp32_newton_schulz(grad, coefficients, steps, eps):
        return orthogonalized(grad.float(), coefficients, steps, eps)

    torch.manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16)]  # tall, wide, square: the transpose and the lr ratio
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "nesterov": True, "adjust_lr_fn": "original"}
    mine, reference = FP32Muon(ours, fp32_iteration=True, **settings), torch.optim.Muon(theirs, **settings)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_newton_schulz)
    for step in range(3):
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(step * 10 + i)) for i, s in enumerate(shapes)]
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        mine.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"])
    reference.load_state_dict(mine.state_dict())  # one state format: checkpoints move between them


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_cpu_muon_iterates_in_bf16_exactly_where_the_cpu_has_it(monkeypatch, native_bf16):
    """Native bf16 (AVX512-BF16, AMX) makes torch's bf16 iteration the faster one, so there the
    step is torch's, bit for bit; a CPU that emulates bf16 gets the fp32 iteration."""
    import pocketlm.optim as optim_mod
    from pocketlm.optim import FP32Muon

    monkeypatch.setattr(optim_mod, "cpu_has_native_bf16", lambda: native_bf16)
    shapes = [(24, 8), (16, 16)]
    ours = [torch.randn(s, generator=torch.Generator().manual_seed(i), requires_grad=True)
            for i, s in enumerate(shapes)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    mine, reference = FP32Muon(ours, lr=0.02), torch.optim.Muon(theirs, lr=0.02)
    assert mine.fp32_iteration is not native_bf16
    for params in (ours, theirs):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i))
    mine.step()
    reference.step()
    same = all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert same is native_bf16  # bf16's rounding tells the two iterations apart
    assert FP32Muon(ours, lr=0.02, fp32_iteration=not native_bf16).fp32_iteration is not native_bf16


def test_the_fp32_orthogonalisation_agrees_with_torchs_bf16_one():
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    from pocketlm.optim import orthogonalized

    update = torch.randn(48, 16, generator=torch.Generator().manual_seed(3))
    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    ours = orthogonalized(update, coefficients, 5, EPS)
    theirs = _zeropower_via_newtonschulz(update, coefficients, 5, EPS).float()
    assert ours.dtype == torch.float32 and ours.shape == update.shape
    assert (ours - theirs).norm() / theirs.norm() < 0.02  # bf16's rounding, no more
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.5  # near-orthogonal, as the iteration promises
    model = tiny_model()
    assert type(build_optimizer(model, MUON, CPU).optimizers[1]).__name__ == "FP32Muon"
