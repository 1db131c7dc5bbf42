"""benchmarks/quality.py without training: its data split, the reference's blocks and the report."""

from __future__ import annotations

import _common as common  # benchmarks/ is on sys.path (conftest.py)
import pytest
import quality


def test_split_holds_out_the_last_tenth_of_the_articles(tmp_path, wiki_valid_path, wiki_articles):
    split = quality.split_data(wiki_valid_path, tmp_path)
    assert (len(split.train), len(split.held_out)) == (54, 6)
    assert split.train + split.held_out == wiki_articles  # every article once, in order


def test_reference_blocks_are_the_text_end_to_end(tokenizer):
    docs = ["one two three four five six seven", "eight nine ten"]
    blocks = quality.concatenated_blocks(docs, tokenizer, block_size=4)
    ids = [t for d in docs for t in tokenizer.encode(d)]
    assert blocks.shape == (len(ids) // 4, 4) and blocks.flatten().tolist() == ids[:blocks.numel()]
    assert tokenizer.eot_id not in blocks.flatten().tolist()  # no document boundaries, as run_clm


def fake_result() -> dict:
    def seed_run(seed: int, bpb: float, ignored: list[str]) -> dict:
        curve = [{"step": s, "tokens": 2048 * s, "seconds": 1.5 * s, "loss": 6 - s / 10, "bpb": bpb + (10 - s) / 100,
                  "word_ppl": 900.0 - s} for s in (5, 10)]
        return {"seed": seed, "steps": 10, "curve": curve, "seconds": 15.0 + seed - 1, "ignored": ignored}

    runs = {label: {"seeds": (seeds := [seed_run(1, bpb, ignored), seed_run(2, bpb + 0.02, ignored)]),
                    "summary": quality.summary(seeds)}
            for label, bpb, ignored in (("hf", 2.1, []), ("seed", 2.0, []), ("data-limited", 1.9, ["ema"]))}
    return {"benchmark": "quality", "date": "2026-01-01 00:00 UTC", "command": "python benchmarks/quality.py",
            "machine": common.machine_info("cpu"), "load_average": {"before": 0.1, "after": 0.2}, "runtime_s": 60.0,
            "model": "tiny", "model_config": {"n_layer": 2, "n_embd": 128}, "precision": "fp32", "epochs": 3,
            "max_steps": None, "seeds": [1, 2], "stride": 64, "context": 128, "train_articles": 54,
            "held_out_articles": 6, "held_out_tokens": 28045, "plot": "quality.png",
            "recipe_data_limited": {"optimizer": "muon", "schedule": "wsd", "ema_decay": 0.995}, "runs": runs,
            "targets": {}}


def test_report_gives_mean_and_spread_over_seeds_and_owns_up_to_ignored_levers(tmp_path):
    r = fake_result()
    assert r["runs"]["seed"]["summary"]["bpb"] == {"mean": pytest.approx(2.01), "std": pytest.approx(0.0141421, 1e-4)}
    text = quality.docs_section(r)
    assert text.startswith(quality.SECTION + "\n")
    assert "| pocketlm, seed recipe | 2 | 10 | 20,480 | 5.0000 ± 0.0000 | 2.0100 ± 0.0141 |" in text
    assert "(trainer ignored: ema)" in text and "stride 64" in text and "![" in text
    quality.plot(r, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_defaults_are_the_seed_budget():
    args = quality.parse_args([])
    assert (args.model, args.epochs, args.seeds, args.max_steps, args.lr_sweep) == ("small", 3, 3, None, [])
    assert quality.parse_args(["--lr-sweep", "3e-4,1e-3"]).lr_sweep == [3e-4, 1e-3]


def test_the_benchmark_is_handed_the_run_whatever_open_run_is_called_with(monkeypatch):
    """The trainer calls ``open_run(cfg, ranks)``; the benchmark's hook must pass every argument on
    (it once took only the config and broke every pocketlm run of the benchmark)."""
    import pocketlm.train as trainer

    monkeypatch.setattr(trainer, "open_run", lambda cfg, *args, **kwargs: ("run", cfg, args, kwargs))
    seen = []
    with quality.run_opened(seen.append):
        assert trainer.open_run("cfg", "ranks", extra=1) == ("run", "cfg", ("ranks",), {"extra": 1})
    assert seen == [("run", "cfg", ("ranks",), {"extra": 1})]


def test_time_to_reach_interpolates_between_evaluations_and_says_never():
    curve = [{"seconds": 0.0, "loss": 10.0}, {"seconds": 10.0, "loss": 8.0}, {"seconds": 20.0, "loss": 6.0}]
    assert quality.time_to_reach(curve, 10.0) == 0.0
    assert quality.time_to_reach(curve, 7.0) == pytest.approx(15.0)
    assert quality.time_to_reach(curve, 6.0) == 20.0
    assert quality.time_to_reach(curve, 5.9) is None


def test_targets_compare_against_the_best_swept_learning_rate_and_the_seeds_time():
    r = fake_result()
    runs = r["runs"]
    # the seed recipe ends at loss 5.0 after 15.5 s of training on average; data-limited's curves
    # reach 5.0 at their last evaluation, 15 s into training
    values = quality.target_values(runs)
    assert values["data_limited_time_to_seed"] == pytest.approx(15.0 / 15.5)
    # reference 2.11 and seed 2.01 bits per byte, each with spread 0.0141 over 2 seeds
    assert values["seed_vs_hf"] == pytest.approx(0.1 + (2 * 0.0141421 ** 2 / 2) ** 0.5, 1e-4)
    assert values["data_limited_vs_tuned"] == pytest.approx(0.0)  # same word ppl in the fake runs
    swept = {**runs["seed"], "summary": {**runs["seed"]["summary"], "word_ppl": {"mean": 500.0, "std": 0.0}}}
    values = quality.target_values({**runs, "seed, lr 0.002": swept})
    assert values["data_limited_vs_tuned"] == pytest.approx(1 - 890.0 / 500.0)  # the tuned seed is better
    assert quality.target_values({"seed": runs["seed"]}) == {}


def test_variants_and_run_selection_parse():
    args = quality.parse_args(["--variant", "fast:recipe=data-limited,lr=1e-3,warmup_steps=5", "--runs", "seed,fast"])
    assert args.variant == [("fast", {"recipe": "data-limited", "lr": 1e-3, "warmup_steps": 5})]
    assert args.runs == {"seed", "fast"}
    for bad in ("nolabel", ":lr=1", "x:lr"):
        with pytest.raises(SystemExit):
            quality.parse_args(["--variant", bad])
