"""Named recipes (``--recipe``): defaults for other fields, applied before what the user gives."""

from __future__ import annotations

import dataclasses

import pytest

from pocketlm.cli import main
from pocketlm.config import (FIXED, RECIPES, TrainConfig, build_train_config, config_from_dict, config_from_flat,
                             given_settings, leaf_fields, on_resume)
from pocketlm.errors import ConfigError


def test_seed_recipe_is_exactly_the_defaults():
    assert build_train_config(None, recipe="seed") == build_train_config(None) == TrainConfig()
    assert TrainConfig().optim.recipe == "seed" and RECIPES["seed"] == {}


def test_data_limited_sets_its_fields_and_leaves_the_rest():
    cfg = build_train_config(None, recipe="data-limited")
    flat, defaults = cfg.flat(), TrainConfig().flat()
    assert RECIPES["data-limited"]  # not empty
    for name, value in RECIPES["data-limited"].items():
        assert flat[name] == value != defaults[name], name  # each one changes something
    untouched = set(defaults) - set(RECIPES["data-limited"]) - {"recipe"}
    assert {n: flat[n] for n in untouched} == {n: defaults[n] for n in untouched}


def test_given_settings_beat_the_recipe_from_python_yaml_and_flags(tmp_path):
    cfg = build_train_config(None, recipe="data-limited", weight_decay=0.05, schedule="cosine")
    assert (cfg.optim.weight_decay, cfg.optim.schedule, cfg.optim.optimizer) == (0.05, "cosine", "muon")

    config = tmp_path / "r.yaml"
    config.write_text("recipe: data-limited\noptim: {ema_decay: 0.9}\n", encoding="utf-8")
    cfg = build_train_config(config, muon_lr=0.01)
    assert (cfg.optim.ema_decay, cfg.optim.muon_lr, cfg.optim.schedule) == (0.9, 0.01, "wsd")

    # the command line's path: flags become given settings (None: not given), the recipe fills the rest
    cfg = config_from_flat(given_settings(None, recipe="data-limited", optimizer="adamw", lr=None))
    assert (cfg.optim.optimizer, cfg.optim.schedule, cfg.optim.lr) == ("adamw", "wsd", 2e-3)


def test_a_saved_config_reads_back_as_it_ran():
    cfg = build_train_config(None, recipe="data-limited", weight_decay=0.05)
    assert config_from_dict(cfg.to_dict()) == cfg  # the override survives: the recipe fills no saved field
    assert config_from_dict(cfg.flat()) == cfg


def test_replace_with_a_recipe_resets_the_fields_it_sets():
    tuned = build_train_config(None, recipe="data-limited", warmup_steps=50)
    back = tuned.replace(recipe="seed")
    assert back.optim == dataclasses.replace(TrainConfig().optim, warmup_steps=50)
    assert back.optim.grad_accum == TrainConfig().optim.grad_accum == 4
    assert TrainConfig().replace(recipe="data-limited") == build_train_config(None, recipe="data-limited")
    assert tuned.replace(lr=2e-3).optim.optimizer == "muon"  # other changes keep the recipe's values


def test_unknown_recipe_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--recipe must be one of seed, data-limited; got 'fast'"):
        build_train_config(None, recipe="fast")
    code = main(["train", "--recipe", "fast", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("pocketlm: error: ") == 1 and "--recipe" in err
    assert not (tmp_path / "run").exists()


def test_recipes_only_set_real_fields_and_are_fixed_on_resume():
    leaves = leaf_fields()
    for name, values in RECIPES.items():
        assert set(values) <= set(leaves) - {"recipe"}, name
        build_train_config(None, recipe=name)  # every value valid
    for name in ("recipe", "optimizer", "muon_lr", "muon_momentum", "muon_weight_decay", "schedule",
                 "decay_fraction", "ema_decay"):
        assert on_resume(name) == FIXED, name
