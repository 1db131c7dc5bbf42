"""Checkpoints: atomic saves, verification, safe loading."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pocketlm import checkpoint as ckpt_mod
from pocketlm.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, load_model,
                                 save_checkpoint, weights_state_dict)
from pocketlm.config import ModelConfig
from pocketlm.errors import CheckpointError
from pocketlm.model import GPT
from pocketlm.tokenizer import gpt2_tokenizer

CFG = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0)


def save(out_dir, step, model=None, keep=None, state=None):
    model = model or GPT(CFG)
    config = {"model": CFG.__dict__, "train": {"seed": 1}}
    return save_checkpoint(out_dir, step, weights_state_dict(model), gpt2_tokenizer(), config,
                           state or {"progress": {"step": step}, "rng": {"torch": torch.get_rng_state()}}, keep=keep)


def test_round_trip_restores_weights_and_tied_embedding(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    path = save(tmp_path, 5, model)
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "meta.json", "model.safetensors", "state.pt", "tokenizer.json"]
    loaded, tokenizer, ckpt = load_model(tmp_path)
    assert ckpt.step == 5 and tokenizer.identity == gpt2_tokenizer().identity
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert ckpt.load_state()["progress"] == {"step": 5}


def test_keeps_only_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_save_killed_midway_leaves_last_checkpoint_loadable(tmp_path, monkeypatch):
    good = save(tmp_path, 1)

    def dies_halfway(path):  # the process dies after the weights, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "_fsync_dir", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good  # the half-written step 2 is invisible
    assert load_checkpoint(tmp_path).step == 1
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers  # the partial save is only in a temporary folder...
    save(tmp_path, 3)  # ...which a later save (from another process) cleans up
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_truncated_weights_are_reported(tmp_path):
    path = save(tmp_path, 1)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_flipped_byte_is_reported(tmp_path):
    path = save(tmp_path, 1)
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_other_model_config_is_refused(tmp_path):
    save(tmp_path, 1)
    other = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
    with pytest.raises(CheckpointError, match="different model.*n_layer 1 vs 2"):
        load_checkpoint(tmp_path, expected_model=other)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_state_loading_refuses_pickled_objects(tmp_path):
    """state.pt is read with weights_only=True: an arbitrary pickled object is rejected, not run."""
    path = save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))

    (path / "state.pt").write_bytes(pickle.dumps({"x": Evil()}))
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["state.pt"] = ckpt_mod._sha256(path / "state.pt")  # a well-formed but hostile file
    meta["meta_sha256"] = ckpt_mod.meta_digest(meta)  # re-signed by the attacker too
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path).load_state()
