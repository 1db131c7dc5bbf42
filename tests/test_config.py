"""One validation layer for the config: the same types and ranges whether a value comes from a
flag, a YAML file or Python, refused in one line before anything touches the disk."""

from __future__ import annotations

import dataclasses

import pytest

from pocketlm.cli import main
from pocketlm.config import (SECTIONS, FIXED, FREE, LAUNCH, LENGTH, ModelConfig, TrainConfig, build_train_config,
                             config_from_dict, field_docs, on_resume)
from pocketlm.errors import ConfigError

# (setting, bad value, what the one line must name)
BAD = [
    ("lr", float("nan"), "--lr"), ("lr", float("inf"), "--lr"), ("lr", -1.0, "--lr"), ("lr", 0.0, "--lr"),
    ("seed", "abc", "--seed"), ("seed", -1, "--seed"), ("beta1", 2.0, "--beta1"), ("beta2", 1.0, "--beta2"),
    ("data", 5, "--data"), ("n_layer", 2.5, "--n-layer"), ("n_layer", 0, "--n-layer"),
    ("eval_batches", 1.5, "--eval-batches"), ("max_steps", 2.5, "--max-steps"), ("max_steps", 0, "--max-steps"),
    ("batch_size", 2.5, "--batch-size"), ("batch_size", "1e8", "--batch-size"), ("batch_size", 10 ** 8, "--batch-size"),
    ("grad_clip", float("nan"), "--grad-clip"), ("grad_clip", -1.0, "--grad-clip"), ("vram", "", "--vram"),
    ("vram", "lots", "memory size"), ("dropout", 1.0, "--dropout"), ("batching", "zigzag", "--batching"),
    ("low_memory", "yes", "--low-memory"), ("warmup_steps", -1, "--warmup-steps"),
    ("val_fraction", 0.0, "--val-fraction"), ("keep_checkpoints", 0, "--keep-checkpoints"),
    ("weight_decay", float("nan"), "--weight-decay"), ("device", "tpu", "--device"), ("precision", "fp8", "--precision"),
    ("compile", 1, "--compile"), ("checkpointing", "some", "--checkpointing"), ("epochs", True, "--epochs"),
]


@pytest.mark.parametrize("name, value, needle", BAD)
def test_bad_values_are_refused_from_python(name, value, needle):
    with pytest.raises(ConfigError, match=needle):
        build_train_config(None, **{name: value})


def _yaml_value(value):
    if isinstance(value, float) and value != value:
        return ".nan"
    if value == float("inf"):
        return ".inf"
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("name, value, needle", BAD)
def test_bad_values_are_refused_from_yaml_before_the_run_folder_exists(tmp_path, capsys, corpus_file, name, value,
                                                                      needle):
    config = tmp_path / "bad.yaml"
    key = f"model:\n  {name}: {_yaml_value(value)}\n" if name in ModelConfig.__dataclass_fields__ \
        else f"{name}: {_yaml_value(value)}\n"
    config.write_text(key, encoding="utf-8")
    run = tmp_path / "run"
    # a short tiny run, should a bad value slip through; no flag for the setting under test (a flag beats YAML)
    defaults = {"data": str(corpus_file), "preset": "tiny", "max_steps": "1", "device": "cpu"}
    flags = [x for key, v in defaults.items() if key != name for x in ("--" + key.replace("_", "-"), v)]
    code = main(["train", "--config", str(config), "--out-dir", str(run), *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("pocketlm: error: ")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not run.exists()


@pytest.mark.parametrize("flag, value, needle", [("--lr", "nan", "--lr"), ("--lr", "inf", "--lr"),
                                                 ("--vram", "", "--vram"), ("--batch-size", "1e8", "--batch-size"),
                                                 ("--beta1", "2", "--beta1"), ("--dropout", "1.5", "--dropout")])
def test_bad_flags_are_refused_in_one_line(tmp_path, capsys, corpus_file, flag, value, needle):
    code = main(["train", "--data", str(corpus_file), "--out-dir", str(tmp_path / "run"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("pocketlm: error: ") == 1 and needle in err
    assert not (tmp_path / "run").exists()


def test_yaml_exponents_sections_and_flat_keys(tmp_path):
    config = tmp_path / "ok.yaml"
    # YAML 1.1 reads 3e-4 as a string; it is a float here
    config.write_text("lr: 3e-4\noptim: {warmup_steps: 7}\nrun: {seed: 9}\nmodel: {n_layer: 3}\n", encoding="utf-8")
    cfg = build_train_config(config, preset="tiny")
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 7 and cfg.run.seed == 9
    assert cfg.model_config().n_layer == 3
    config.write_text("optim: {learning_rate: 1}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="learning_rate"):
        build_train_config(config)


def test_configs_round_trip_through_their_dict_and_the_old_flat_layout():
    cfg = build_train_config(None, preset="tiny", lr=1e-3, batching="pack", low_memory=True, model={"n_layer": 3})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(cfg.flat()) == cfg  # config.json files of earlier versions are flat
    assert cfg.replace(lr=2e-3).optim.lr == 2e-3 and cfg.replace(lr=2e-3).dataset.batching == "pack"


def test_every_field_is_documented_has_a_resume_rule_and_a_flag(capsys):
    assert main(["train", "--help"]) == 0
    helptext = capsys.readouterr().out
    for cls in (*SECTIONS.values(), ModelConfig):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert "--" + f.name.replace("_", "-") in helptext, f.name
            if cls is not ModelConfig:
                assert on_resume(f.name) in (FIXED, FREE, LENGTH, LAUNCH)
    assert on_resume("lr") == FIXED and on_resume("eval_interval") == FREE and on_resume("max_steps") == LENGTH
    for flag in ("--compile / --no-compile", "--low-memory", "--config", "--preset"):
        assert flag in helptext
    assert isinstance(TrainConfig().model, dict)
