"""Training loop: accumulation equivalence, LR schedule, weight decay, seeds, exact resume."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from pocketlm.batching import collate, epoch_batches
from pocketlm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from pocketlm.config import ModelConfig, build_train_config
from pocketlm.data import load_dataset
from pocketlm.errors import ConfigError
from pocketlm.losses import NextTokenLoss, token_nll_sum
from pocketlm.model import GPT
from pocketlm.optim import CosineSchedule, Optimizers, build_optimizer
from pocketlm.tokenizer import gpt2_tokenizer
from pocketlm.train import Interrupted, train, train_step

SMALL_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.1}


def small_config(corpus_file, out_dir, cache_dir, **overrides):
    values = dict(preset="tiny", model=dict(SMALL_MODEL), data=str(corpus_file), out_dir=str(out_dir),
                  cache_dir=str(cache_dir), max_steps=6, batch_size=2, grad_accum=2, precision="fp32",
                  device="cpu", eval_interval=3, eval_batches=2, save_interval=2, log_interval=1,
                  warmup_steps=2, lr=1e-3, seed=7)
    values.update(overrides)
    return build_train_config(None, **values)


@pytest.fixture(scope="module")
def straight(corpus_file, tmp_path_factory):
    """One uninterrupted reference run, shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("straight")
    return train(small_config(corpus_file, root / "run", root / "cache"), show_progress=False)


def weights_bytes(checkpoint_dir) -> bytes:
    return (checkpoint_dir / "model.safetensors").read_bytes()


def step_losses(out_dir) -> dict[int, float]:
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "step":
            losses[record["step"]] = record["loss"]
    return losses


# --------------------------------------------------------------------------------------------
# The step


def test_accumulated_step_equals_one_big_batch(corpus_file, tmp_path):
    """Micro-batches of unequal real-token counts, accumulated, give the big batch's loss and
    gradient; the mean of per-micro-batch means (a known bug elsewhere) would not."""
    tok = gpt2_tokenizer()
    cfg = ModelConfig(**{**SMALL_MODEL, "dropout": 0.0})
    data = load_dataset(str(corpus_file), tok, cfg.block_size, cache_dir=tmp_path)
    batches = epoch_batches("bucket", data.train.lengths, 2, cfg.block_size, seed=0, epoch=0)
    # the fullest batch and the two emptiest: very different real-token counts
    by_tokens = sorted(batches, key=lambda b: b.real_tokens)
    chosen = [by_tokens[-1], by_tokens[0], by_tokens[1]]
    micro = [collate(data.train, b, tok.eot_id) for b in chosen]
    assert len({m.real_tokens for m in micro}) > 1
    rows = tuple(r for b in chosen for r in b.rows)
    big = collate(data.train, type(chosen[0])(rows, max(b.seq_len for b in chosen)), tok.eot_id)

    def one_step(micro_batches):
        torch.manual_seed(0)
        model = GPT(cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = Optimizers([torch.optim.SGD(model.parameters(), lr=1.0)])  # parameter change == -gradient
        loss, _ = train_step(NextTokenLoss(model), opt, micro_batches, lr=1.0, device=torch.device("cpu"),
                             grad_clip=0.0)
        return loss, {n: before[n] - p.detach() for n, p in model.named_parameters()}

    acc_loss, acc_grads = one_step(micro)
    big_loss, big_grads = one_step([big])
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    for name in big_grads:
        torch.testing.assert_close(acc_grads[name], big_grads[name], rtol=1e-4, atol=1e-7)

    # The mean-of-means loss differs for these unequal micro-batches, so the test can tell.
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        means = [token_nll_sum(model(m.input_ids), m.targets).item() / m.real_tokens for m in micro]
    assert abs(sum(means) / len(means) - big_loss) > 1e-3


def test_lr_schedule_shape():
    s = CosineSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, min_ratio=0.1)
    lrs = [s.lr(i) for i in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warmup to the peak
    assert max(lrs) == pytest.approx(1.0)
    decay = lrs[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone after warmup
    assert s.lr(55) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert s.lr(100) == pytest.approx(0.1) and s.lr(10_000) == pytest.approx(0.1)  # ends at 10% of peak


def test_weight_decay_only_on_matrices(corpus_file, tmp_path):
    cfg = small_config(corpus_file, tmp_path / "run", tmp_path / "cache")
    model = GPT(cfg.model_config())
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_defaults_are_the_original_recipe():
    cfg = build_train_config(None)
    o = cfg.optim
    assert (cfg.preset, o.batch_size, o.grad_accum, o.lr, o.weight_decay, o.epochs) == \
        ("gpt2-125m", 4, 4, 3e-4, 0.1, 3)
    assert (o.beta1, o.beta2, o.grad_clip, o.min_lr_ratio, cfg.dataset.batching) == (0.9, 0.95, 1.0, 0.1, "bucket")
    assert str(cfg.resolved_out_dir()) == os.path.join("runs", "gpt2-125m")


# --------------------------------------------------------------------------------------------
# Whole runs


def test_seed_makes_runs_repeatable_and_logs_what_was_asked(corpus_file, tmp_path, straight):
    a = straight
    b = train(small_config(corpus_file, tmp_path / "b", tmp_path / "cache"), show_progress=False)
    assert step_losses(a.out_dir) == step_losses(b.out_dir)
    assert weights_bytes(a.final_checkpoint) == weights_bytes(b.final_checkpoint)
    c = train(small_config(corpus_file, tmp_path / "c", tmp_path / "cache", seed=8), show_progress=False)
    assert step_losses(c.out_dir) != step_losses(a.out_dir)

    records = [json.loads(line) for line in (a.out_dir / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    assert first["event"] == "start" and first["n_params"] > 0
    assert first["device"] == "cpu" and first["precision"] == "fp32"
    assert first["config"]["train"]["optim"]["max_steps"] == 6
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in steps)
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    epoch = next(r for r in records if r["event"] == "epoch")
    assert {"real_tokens", "padded_tokens", "padding_fraction"} <= epoch.keys()
    assert json.loads((a.out_dir / "config.json").read_text())["train"]["run"]["seed"] == 7
    # keep_checkpoints=3 by default: steps 2, 4, 6
    assert [p.name for p in list_checkpoints(a.out_dir)] == ["step-00000002", "step-00000004", "step-00000006"]


@pytest.mark.parametrize("batching", ["bucket", "pack"])
def test_resume_after_interrupt_is_bit_identical(corpus_file, tmp_path, batching, straight):
    """Interrupted (SIGTERM: save and stop) then resumed with the same config ends with the same
    weights and the same per-step losses as a run never interrupted, dropout included."""
    if batching != "bucket":
        straight = train(small_config(corpus_file, tmp_path / "straight", tmp_path / "cache", batching=batching),
                         show_progress=False)

    resumed_cfg = small_config(corpus_file, tmp_path / "resumed", tmp_path / "cache", batching=batching)

    def stop_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        train(resumed_cfg, on_step=stop_at_3, show_progress=False)
    assert info.value.step == 3 and info.value.checkpoint.name == "step-00000003"
    result = train(resumed_cfg, show_progress=False)
    assert result.step == 6
    assert weights_bytes(result.final_checkpoint) == weights_bytes(straight.final_checkpoint)
    assert step_losses(result.out_dir) == step_losses(straight.out_dir)


def test_crash_without_saving_resumes_from_last_checkpoint(corpus_file, tmp_path, straight):
    """A crash between checkpoints (no chance to save) loses only the steps since the last save."""
    cfg = small_config(corpus_file, tmp_path / "crashed", tmp_path / "cache")

    class Crash(Exception):
        pass

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, on_step=crash_at_5, show_progress=False)
    assert latest_checkpoint(cfg.resolved_out_dir()).name == "step-00000004"
    result = train(cfg, show_progress=False)
    assert weights_bytes(result.final_checkpoint) == weights_bytes(straight.final_checkpoint)


def test_resume_from_explicit_checkpoint_into_new_dir(corpus_file, tmp_path, straight):
    step2 = straight.out_dir / "checkpoints" / "step-00000002"
    forked = train(small_config(corpus_file, tmp_path / "fork", tmp_path / "cache", resume=str(step2)),
                   show_progress=False)
    assert weights_bytes(forked.final_checkpoint) == weights_bytes(straight.final_checkpoint)


def test_rerunning_a_finished_run_changes_nothing(corpus_file, tmp_path):
    cfg = small_config(corpus_file, tmp_path / "run", tmp_path / "cache")
    first = train(cfg, show_progress=False)
    before = weights_bytes(first.final_checkpoint)
    again = train(cfg, show_progress=False)
    assert again.step == 6 and weights_bytes(again.final_checkpoint) == before


def test_same_out_dir_with_other_settings_is_refused(corpus_file, tmp_path):
    train(small_config(corpus_file, tmp_path / "run", tmp_path / "cache", max_steps=2, save_interval=2),
          show_progress=False)
    with pytest.raises(ConfigError, match="different settings.*lr"):
        train(small_config(corpus_file, tmp_path / "run", tmp_path / "cache", max_steps=2, lr=5e-4),
              show_progress=False)
    # the existing run is untouched
    assert load_checkpoint(tmp_path / "run").step == 2


def test_packed_training_runs_and_logs_no_padding(corpus_file, tmp_path):
    result = train(small_config(corpus_file, tmp_path / "run", tmp_path / "cache", batching="pack", max_steps=2),
                   show_progress=False)
    epoch = next(r for r in result.history if r["event"] == "epoch")
    assert epoch["padded_tokens"] == 0


# --------------------------------------------------------------------------------------------
# The best checkpoint and early stopping


def scripted_validation(monkeypatch, losses):
    """Run.evaluate returns these validation losses in turn (the loss curve is the test's input)."""
    from pocketlm.train import Run

    values = iter(losses)
    monkeypatch.setattr(Run, "evaluate", lambda self: next(values))


def test_early_stopping_keeps_the_best_checkpoint_and_eval_takes_it(corpus_file, tmp_path, monkeypatch, capsys):
    from pocketlm.checkpoint import best_checkpoint, checkpoint_for_use
    from pocketlm.cli import main

    scripted_validation(monkeypatch, [5.0, 4.0, 4.5, 4.0, 4.7, 3.0])  # steps 0-5; a tie is no improvement
    cfg = small_config(corpus_file, tmp_path / "run", tmp_path / "cache", eval_interval=1, save_interval=1,
                       keep_checkpoints=1, early_stopping=3, max_steps=10)
    result = train(cfg, show_progress=False)
    assert result.step == 4  # steps 2, 3, 4 brought no new best
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000001", "step-00000004"]  # best + newest
    assert best_checkpoint(tmp_path / "run").name == "step-00000001"
    said = []
    assert checkpoint_for_use(tmp_path / "run", said.append).name == "step-00000001"
    assert "best checkpoint" in said[0] and "4.0000" in said[0] and "step-00000004" in said[0]
    assert checkpoint_for_use(tmp_path / "run" / "checkpoints" / "step-00000004").name == "step-00000004"
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "early_stop"] == [4]

    # the same command again: the run is over, nothing changes
    again = train(cfg, show_progress=False)
    assert again.step == 4 and [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step-00000004"
    capsys.readouterr()
    monkeypatch.undo()
    code = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus_file)])
    assert code == 0 and "using the best checkpoint" in capsys.readouterr().err


def test_without_early_stopping_the_best_survives_pruning(corpus_file, tmp_path, monkeypatch):
    from pocketlm.checkpoint import checkpoint_for_use

    scripted_validation(monkeypatch, [5.0, 3.0, 4.0, 4.5, 4.6])
    cfg = small_config(corpus_file, tmp_path / "run", tmp_path / "cache", eval_interval=1, save_interval=1,
                       keep_checkpoints=2, max_steps=4)
    assert train(cfg, show_progress=False).step == 4
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000001", "step-00000003",
                                                                    "step-00000004"]
    assert checkpoint_for_use(tmp_path / "run").name == "step-00000001"


def test_a_run_never_evaluated_at_a_save_is_used_at_its_latest(corpus_file, tmp_path):
    from pocketlm.checkpoint import checkpoint_for_use

    cfg = small_config(corpus_file, tmp_path / "run", tmp_path / "cache", eval_interval=100, save_interval=1,
                       max_steps=2)
    train(cfg, show_progress=False)  # evaluated at step 0 and at the end (step 2)
    assert checkpoint_for_use(tmp_path / "run").name == "step-00000002"


def test_data_limited_recipe_resumes_bit_identical_and_is_used_by_its_average(corpus_file, tmp_path, capsys):
    """Muon, warmup-stable-decay and the weight average together: an interrupted run resumes to the
    same weights, average and losses; validation and `pocketlm eval` read the average."""
    from pocketlm.checkpoint import load_model

    def cfg(name):
        return small_config(corpus_file, tmp_path / name, tmp_path / "cache", recipe="data-limited", lr=3e-3)

    straight = train(cfg("straight"), show_progress=False)

    def stop_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(cfg("resumed"), on_step=stop_at_3, show_progress=False)
    resumed = train(cfg("resumed"), show_progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        assert (resumed.final_checkpoint / name).read_bytes() == (straight.final_checkpoint / name).read_bytes()
    assert step_losses(resumed.out_dir) == step_losses(straight.out_dir)
    assert resumed.val_loss == straight.val_loss

    ckpt = load_checkpoint(straight.final_checkpoint)
    assert ckpt.config["train"]["optim"]["optimizer"] == "muon" and ckpt.config["train"]["optim"]["schedule"] == "wsd"
    said = []
    model, _, _ = load_model(straight.final_checkpoint, say=said.append)
    assert "weight average" in said[0]
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in ckpt.average.items())
    assert not torch.equal(ckpt.average["transformer.h.0.mlp.c_fc.weight"],
                           ckpt.weights["transformer.h.0.mlp.c_fc.weight"])
