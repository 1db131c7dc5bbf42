"""The EMA of the weights: its arithmetic, an exact swap in and out, and its state in state.pt."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import SMALL_VOCAB
from pocketlm.config import ModelConfig, build_train_config
from pocketlm.ema import WeightEMA
from pocketlm.model import GPT


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=SMALL_VOCAB, dropout=0.0))


def nudge(model: GPT, step: int) -> None:
    """Stand-in for an optimizer step: move every weight by a step-dependent amount."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)) * 0.1)


def test_update_is_the_warmed_up_exponential_average():
    model = tiny_model()
    ema = WeightEMA(model, decay=0.75)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for t in range(30):
        nudge(model, t)
        d = min(0.75, (1 + t) / (10 + t))  # early steps forget the random initialisation quickly
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach().double()
    assert ema.current_decay() == 0.75 and ema.updates == 30  # the configured decay from step 26 on
    shadow = dict(zip(ema.names, ema.shadow))
    assert set(shadow) == {n for n, _ in model.named_parameters()}  # the tied output layer once
    for n, value in expected.items():
        assert shadow[n].dtype == torch.float32
        torch.testing.assert_close(shadow[n].double(), value, rtol=0, atol=1e-6)


def test_applied_swaps_the_average_in_and_the_weights_back_exactly():
    model = tiny_model()
    ema = WeightEMA(model, decay=0.99)
    for t in range(5):
        nudge(model, t)
        ema.update(model)
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, SMALL_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = tiny_model(seed=9)
    reference.load_state_dict({**dict(zip(ema.names, ema.shadow)),
                               "lm_head.weight": ema.shadow[ema.names.index("transformer.wte.weight")]})
    with torch.no_grad(), ema.applied(model) as swapped:
        assert torch.equal(swapped(idx), reference(idx))  # the model computes with the average
        assert not torch.equal(model.transformer.wte.weight, own["transformer.wte.weight"])
    for n, p in model.named_parameters():
        assert torch.equal(p, own[n]), n  # bit for bit
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    with pytest.raises(RuntimeError, match="boom"), ema.applied(model):
        raise RuntimeError("boom")
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters())  # restored after an error too


def test_state_round_trips_through_a_weights_only_load():
    model = tiny_model()
    ema = WeightEMA(model, decay=0.95)
    for t in range(3):
        nudge(model, t)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save({"ema": ema.state_dict()}, buffer)
    buffer.seek(0)
    restored = WeightEMA(tiny_model(seed=3), decay=0.95)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["ema"])
    assert restored.updates == 3 and restored.current_decay() == ema.current_decay()
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow))
    # the continued averages agree
    nudge(model, 3)
    ema.update(model)
    restored.update(model)
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow))


def test_foreign_state_and_models_are_refused():
    ema = WeightEMA(tiny_model(), decay=0.9)
    wider = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=SMALL_VOCAB, dropout=0.0))
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict(WeightEMA(wider, decay=0.9).state_dict())
    deeper = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=SMALL_VOCAB, dropout=0.0))
    with pytest.raises(ValueError, match="does not fit"):
        ema.load_state_dict(WeightEMA(deeper, decay=0.9).state_dict())
    with pytest.raises(ValueError, match="not the ones"):
        ema.update(deeper)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(tiny_model(), decay=1.0)


def test_ema_decay_setting_range():
    assert build_train_config(None).optim.ema_decay == 0.0  # off by default
    assert build_train_config(None, ema_decay=0.999).optim.ema_decay == 0.999
    from pocketlm.errors import ConfigError

    with pytest.raises(ConfigError, match="--ema-decay"):
        build_train_config(None, ema_decay=1.0)
