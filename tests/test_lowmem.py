"""--low-memory: bf16 gradient buffers and the bf16-moment AdamW."""

from __future__ import annotations

import json

import pytest
import torch

from pocketlm.config import ModelConfig, build_train_config
from pocketlm.losses import NextTokenLoss
from pocketlm.lowmem import LowMemoryAdamW
from pocketlm.model import GPT
from pocketlm.optim import decay_groups
from pocketlm.train import train

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=211, dropout=0.0)


def _batch(seed):
    ids = torch.randint(0, 211, (4, 33), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _run(optimizer_cls, steps=5, accumulate=2, **kwargs):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = optimizer_cls(decay_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), **kwargs)
    objective = NextTokenLoss(model, weight_grad_sink=opt.accumulate if isinstance(opt, LowMemoryAdamW) else None)
    for step in range(steps):
        for micro in range(accumulate):
            x, y = _batch(step * 10 + micro)
            (objective(x, y) / 256).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_matches_torch_adamw_up_to_bf16_rounding():
    ours = _run(LowMemoryAdamW)
    reference = _run(torch.optim.AdamW)
    torch.manual_seed(0)
    start = GPT(CFG)
    for (name, a), b, c in zip(ours.named_parameters(), reference.parameters(), start.parameters()):
        # Per tensor, the mean deviation is a small fraction of how far AdamW moved the weights
        # (a few near-zero gradients round differently in bf16, so no elementwise bound).
        deviation = (a - b).abs().mean()
        movement = (b - c).abs().mean()
        assert deviation <= 0.05 * movement, (name, deviation.item(), movement.item())
    unchanged = _run(LowMemoryAdamW)
    assert all(torch.equal(a, b) for a, b in zip(unchanged.parameters(), ours.parameters()))  # deterministic


def test_gradients_live_in_bf16_buffers_and_include_the_tied_head():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = LowMemoryAdamW(decay_groups(model, 0.1), lr=1e-3)
    head = model.lm_head.weight
    x, y = _batch(0)
    NextTokenLoss(model, weight_grad_sink=opt.accumulate)(x, y).backward()
    assert all(p.grad is None for p in model.parameters())  # no fp32 gradient survives backward
    assert {b.dtype for b in opt.grad_buffers.values()} == {torch.bfloat16}
    assert set(opt.grad_buffers) == set(model.parameters())
    # the same gradient as plain autograd (embedding and output layer both reach the tied weight)
    torch.manual_seed(0)
    plain = GPT(CFG)
    NextTokenLoss(plain)(x, y).backward()
    torch.testing.assert_close(opt.grad_buffers[head].float(), plain.lm_head.weight.grad, atol=2e-2, rtol=2e-2)


def test_clipping_scales_buffers_to_the_max_norm():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = LowMemoryAdamW([p])
    opt.accumulate(p, torch.full((10,), 3.0))
    norm = opt.clip_grad_norm_(1.0)
    assert norm.item() == pytest.approx(3.0 * 10 ** 0.5, rel=1e-3)
    assert torch.linalg.vector_norm(opt.grad_buffers[p].float()).item() == pytest.approx(1.0, rel=1e-2)


def test_state_is_bf16_and_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = LowMemoryAdamW(decay_groups(model, 0.1))
    x, y = _batch(0)
    NextTokenLoss(model, weight_grad_sink=opt.accumulate)(x, y).backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    moments = [v for s in state["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}


def test_low_memory_training_learns_and_resumes_exactly(corpus_file, tmp_path):
    def config(out, **kw):
        return build_train_config(None, preset="tiny", model={"n_layer": 1, "n_embd": 64, "n_head": 2,
                                                             "block_size": 64}, data=str(corpus_file),
                                  out_dir=str(tmp_path / out), cache_dir=str(tmp_path / "c"), max_steps=6,
                                  batch_size=2, grad_accum=2, precision="fp32", device="cpu", eval_batches=2,
                                  save_interval=3, log_interval=1, lr=2e-3, low_memory=True, **kw)
    straight = train(config("straight"), show_progress=False)
    losses = [r["loss"] for r in straight.history if r["event"] == "step"]
    assert losses[-1] < losses[0]

    class Crash(Exception):
        pass

    def crash(step):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        train(config("resumed"), on_step=crash, show_progress=False)
    resumed = train(config("resumed"), show_progress=False)
    assert (resumed.final_checkpoint / "model.safetensors").read_bytes() == \
        (straight.final_checkpoint / "model.safetensors").read_bytes()
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["train"]["memory"]["low_memory"] is True and saved["plan"]["low_memory"] is True


def test_low_memory_refuses_fp16():
    from pocketlm.errors import ConfigError

    with pytest.raises(ConfigError, match="low-memory"):
        build_train_config(None, low_memory=True, precision="fp16")
