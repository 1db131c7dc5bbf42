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


def test_loss_at_a_time_reads_the_curve_between_evaluations():
    curve = [{"seconds": 10.0, "loss": 8.0}, {"seconds": 20.0, "loss": 6.0}]
    assert quality.loss_at(curve, 9.9) is None  # before its first evaluation nothing is known
    assert quality.loss_at(curve, 15.0) == pytest.approx(7.0)
    assert quality.loss_at(curve, 20.0) == 6.0 and quality.loss_at(curve, 99.0) == 6.0


def with_variant(r: dict, label: str, loss_shift: float, seconds: float, seed: int = 1) -> dict:
    """``r`` plus a one-seed variant of data-limited: its curve is data-limited's seed ``seed``
    shifted by ``loss_shift`` and stretched to ``seconds`` of training."""
    base = next(s for s in r["runs"]["data-limited"]["seeds"] if s["seed"] == seed)
    stretch = seconds / base["seconds"]
    curve = [{**p, "loss": p["loss"] + loss_shift, "seconds": p["seconds"] * stretch} for p in base["curve"]]
    seeds = [{**base, "curve": curve, "seconds": seconds, "ignored": []}]
    runs = {**r["runs"], label: {"settings": {"recipe": "data-limited", "optimizer": "adamw"}, "seeds": seeds,
                                 "summary": quality.summary(seeds)}}
    return {**r, "runs": runs}


def test_a_lever_is_compared_with_its_recipe_on_the_same_seed_at_equal_tokens_and_equal_time():
    # data-limited's seed 1: evaluations at 7.5 s (loss 5.5) and 15 s (loss 5.0), 15 s in all
    r = with_variant(fake_result(), "without Muon", loss_shift=0.2, seconds=7.5)
    [lever] = quality.lever_comparisons(r["runs"])
    assert lever["label"] == "without Muon" and lever["recipe"] == "data-limited" and lever["seeds"] == [1]
    assert lever["changed"] == {"optimizer": "adamw"}
    assert lever["equal_tokens"] == pytest.approx(0.2)  # compared with seed 1 only, not both seeds' mean
    # the variant is twice as fast: at its end (7.5 s) the recipe had only reached 5.5, the variant 5.2
    assert lever["equal_time_at"] == pytest.approx(7.5) and lever["equal_time"] == pytest.approx(-0.3)
    text = quality.docs_section({**r, "levers": [lever]})
    assert "| without Muon | data-limited | optimizer adamw | 1 |" in text and "+0.2000" in text
    assert "-0.3000 at 8 s" in text
    # the report's own runs are never levers of themselves, and a variant of an absent recipe has no row
    assert quality.lever_comparisons(fake_result()["runs"]) == []
    lone = with_variant(fake_result(), "x", 0.0, 15.0)["runs"]
    assert quality.lever_comparisons({"x": lone["x"]}) == []


def test_a_run_stopped_at_the_seed_loss_is_marked_and_left_out_of_what_it_cannot_show():
    r = fake_result()
    for s in r["runs"]["data-limited"]["seeds"]:
        s["stopped_at_loss"] = 5.0
    values = quality.target_values(r["runs"])
    assert "data_limited_vs_tuned" not in values  # its word ppl is not the budget's
    assert values["data_limited_time_to_seed"] == pytest.approx(15.0 / 15.5)  # what the stop is for
    assert "(stopped at the seed recipe's final held-out loss)" in quality.docs_section(r)


def test_the_goal_is_the_seed_recipes_loss_at_the_same_seed():
    r = fake_result()
    runs = r["runs"]
    second = runs["seed"]["seeds"][1]
    second["curve"] = [{**p, "loss": p["loss"] - 0.25} for p in second["curve"]]  # seed 2 ends at 4.75
    runs["seed"]["summary"] = quality.summary(runs["seed"]["seeds"])
    assert quality.seed_goal(runs, 1) == 5.0 and quality.seed_goal(runs, 2) == 4.75
    assert quality.seed_goal(runs, 3) == pytest.approx(4.875)  # a seed it lacks: its mean
    # data-limited's seed 1 reaches 5.0 at 15 s; its seed 2 never reaches 4.75, though it reaches the mean
    assert quality.target_values(runs)["data_limited_time_to_seed"] is None


def test_a_lever_of_runs_stopped_at_the_seed_loss_compares_where_both_got_and_their_time_to_it():
    r = fake_result()
    for s in r["runs"]["data-limited"]["seeds"]:
        s["stopped_at_loss"] = 5.0
    # seed 1 of the variant: 0.3 lower at every evaluation, twice as fast: 5.2 at 3.75 s, 4.7 at 7.5 s
    [lever] = quality.lever_comparisons(with_variant(r, "with EMA", -0.3, 7.5)["runs"])
    assert lever["equal_tokens"] == pytest.approx(-0.3) and lever["equal_tokens_at"] == 20_480
    # the recipe reaches 5.0 at its last evaluation, 15 s; the variant between 5.2 (3.75 s) and 4.7 (7.5 s)
    assert lever["recipe_time_to_goal"] == pytest.approx(15.0)
    assert lever["time_to_goal"] == pytest.approx(3.75 + 3.75 * 0.2 / 0.5)
    text = quality.docs_section({**r, "levers": [lever]})
    assert "-0.3000 at 20,480 tokens" in text and "| 5 s / 15 s = 0.35x |" in text
    assert "time to the seed recipe's final loss, variant / recipe" in text


def test_each_model_has_its_own_section_and_plot():
    assert quality.section_heading("tiny") == quality.SECTION
    assert quality.section_heading("gpt2-125m") == quality.SECTION + ", gpt2-125m"
    assert quality.plot_path("tiny").name == "quality.png" and quality.plot_path("small").name == "quality-small.png"
    # a budget other than the seed's 3 epochs has its own section and plot too
    assert quality.budget_name(3, None) == "" and quality.budget_name(6, None) == "6 epochs"
    assert quality.budget_name(3, 40) == "40 steps"
    assert quality.section_heading("tiny", "6 epochs") == quality.SECTION + ", 6 epochs"
    assert quality.section_heading("gpt2-125m", "6 epochs") == quality.SECTION + ", gpt2-125m, 6 epochs"
    assert quality.plot_path("tiny", "6 epochs").name == "quality-6-epochs.png"
    assert quality.docs_section({**fake_result(), "epochs": 6}).startswith("## Quality per compute, 6 epochs\n")
    r = {**fake_result(), "model": "gpt2-125m"}
    assert quality.docs_section(r).startswith("## Quality per compute, gpt2-125m\n")


def test_merge_takes_only_results_of_the_same_setup_and_machine(tmp_path):
    import json

    r = fake_result()
    setup = {k: r[k] for k in quality.SAME_SETUP}
    good = tmp_path / "seed.json"
    good.write_text(json.dumps(r))
    assert quality.earlier_results([good], setup, r["machine"])[0]["runs"].keys() == r["runs"].keys()
    recipe_changed = {**setup, "recipe_data_limited": {**r["recipe_data_limited"], "ema_decay": 0.0}}
    for changed, why in (({**setup, "stride": 32}, "stride"), ({**setup, "model": "small"}, "model"),
                         (recipe_changed, "recipe_data_limited")):
        with pytest.raises(SystemExit, match=f"quality: error: --merge .*seed.json was measured otherwise \\({why}"):
            quality.earlier_results([good], changed, r["machine"])
    with pytest.raises(SystemExit, match="machine cpu differ"):
        quality.earlier_results([good], setup, {**r["machine"], "cpu": "another"})
    other_bf16 = not r["machine"]["cpu_native_bf16"]  # same model name, another generation: times differ
    with pytest.raises(SystemExit, match="machine cpu_native_bf16 differ"):
        quality.earlier_results([good], setup, {**r["machine"], "cpu_native_bf16": other_bf16})
    older = tmp_path / "older.json"  # from before results recorded the key: not a difference
    older.write_text(json.dumps({**r, "machine": {k: v for k, v in r["machine"].items() if k != "cpu_native_bf16"}}))
    assert quality.earlier_results([older], setup, r["machine"])
    for bad, text in (("junk.json", "{not json"), ("other.json", json.dumps({"benchmark": "memory"}))):
        (tmp_path / bad).write_text(text)
        with pytest.raises(SystemExit, match=f"--merge .*{bad}: not a result of this benchmark"):
            quality.earlier_results([tmp_path / bad], setup, r["machine"])
    with pytest.raises(SystemExit, match="not a result"):
        quality.earlier_results([tmp_path / "missing.json"], setup, r["machine"])


def test_a_run_ends_at_the_first_evaluation_reaching_its_goal(tmp_path, corpus_file, wiki_articles, tokenizer,
                                                                one_torch_thread, monkeypatch):
    import torch

    resets = []  # each run compiles afresh, so no run's time leans on an earlier run's compiled code
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))

    from pocketlm.config import build_train_config

    cfg = build_train_config(None, preset="tiny", data=str(corpus_file), out_dir=str(tmp_path / "run"),
                             cache_dir=str(tmp_path / "cache"), max_steps=4, device="cpu", precision="fp32",
                             compile=False, eval_interval=1 << 40, eval_batches=1)
    score = quality.Scorer(wiki_articles[-1:], tokenizer, 64, 8, torch.device("cpu"), "fp32", tmp_path / "cache")
    reached = quality.pocketlm_run(cfg, score, every=2, stop_at=100.0)  # a real model's loss is below 100
    assert [p["step"] for p in reached["curve"]] == [2] and reached["stopped_at_loss"] == 100.0
    assert reached["steps"] == 4  # its plan, of which it ran half
    assert resets == [1]


def test_swept_and_variant_runs_train_their_own_number_of_seeds():
    args = quality.parse_args(["--seeds", "3", "--sweep-seeds", "1", "--variant-seeds", "2",
                               "--variant", "no ema:recipe=data-limited,ema_decay=0.0"])
    seeds = [7, 8, 9]
    assert quality.seeds_of("seed, lr 0.002", seeds, args) == [7]
    assert quality.seeds_of("no ema", seeds, args) == [7, 8]
    assert quality.seeds_of("data-limited", seeds, args) == quality.seeds_of("hf", seeds, args) == seeds
    unlimited = quality.parse_args(["--variant", "no ema:ema_decay=0.0"])
    assert quality.seeds_of("no ema", seeds, unlimited) == quality.seeds_of("seed, lr 0.002", seeds, unlimited) == seeds


def test_the_report_explains_only_the_runs_it_has():
    r = fake_result()
    assert "The reference is what `run_clm.py` does" in quality.docs_section(r)
    assert "`seed, lr X`" not in quality.docs_section(r)
    r["runs"]["seed, lr 0.002"] = r["runs"]["seed"]
    assert "each `seed, lr X` row" in quality.docs_section(r)
    del r["runs"]["hf"]
    assert "run_clm" not in quality.docs_section(r)


def test_a_merged_run_keeps_its_seeds_and_only_the_missing_ones_train():
    merged = {"settings": {"recipe": "data-limited"}, "seeds": [{"seed": 1337}, {"seed": 1338}]}
    kept = quality.measured_seeds(merged, {"recipe": "data-limited"}, "data-limited")
    assert [s["seed"] for s in kept] == [1337, 1338] and kept is not merged["seeds"]
    assert quality.measured_seeds(None, {"recipe": "seed"}, "seed") == []
    with pytest.raises(SystemExit, match="another label"):  # the same label, other settings: not the same run
        quality.measured_seeds(merged, {"recipe": "data-limited", "ema_decay": 0.995}, "data-limited")


def test_a_report_merged_twice_names_the_command_behind_each_run():
    def result(command, runs, merged=()):
        return {"command": command, "date": "d", "load_average": {"before": 0, "after": 0}, "runtime_s": 1.0,
                "runs": dict.fromkeys(runs, {}), "merged": list(merged)}
    seed_only = result("quality.py --runs seed", ["seed"])
    with_dl = result("quality.py --runs data-limited --merge seed.json", ["seed", "data-limited"],
                     quality.provenance([seed_only]))
    entries = quality.provenance([with_dl])
    assert [(e["command"], e["runs"]) for e in entries] == [
        ("quality.py --runs seed", ["seed"]), ("quality.py --runs data-limited --merge seed.json", ["data-limited"])]
    assert quality.provenance([result("quality.py --update-docs --merge x.json", ["seed"], entries[:1])]) == entries[:1]


def test_a_run_whose_seeds_came_from_two_invocations_names_both():
    def result(command, runs, merged=()):
        return {"command": command, "date": "d", "load_average": {"before": 0, "after": 0}, "runtime_s": 1.0,
                "runs": {label: {"seeds": [{"seed": s} for s in seeds]} for label, seeds in runs.items()},
                "merged": list(merged)}
    first = result("quality.py --seeds 1 --runs seed", {"seed": [1]})
    second = result("quality.py --seeds 2 --runs seed,data-limited --merge first.json",
                    {"seed": [1, 2], "data-limited": [1, 2]}, quality.provenance([first]))
    entries = quality.provenance([second])
    assert [(e["command"], e["seeds"]) for e in entries] == [
        ("quality.py --seeds 1 --runs seed", {"seed": [1]}),
        ("quality.py --seeds 2 --runs seed,data-limited --merge first.json", {"seed": [2], "data-limited": [1, 2]})]
    assert quality.merged_runs(entries[1]) == "seed (2), data-limited (1, 2)"
