"""Quality per compute (issue #17): held-out quality of the same model trained from the same text
for the same number of tokens, three ways, on one evaluation protocol.

Data: WikiText-2's validation text from ``../shared/data``. Its first 90% of articles are the
training text and its last 10% are held out (written as ``wiki.train.raw`` / ``wiki.valid.raw`` of a
WikiText folder in a temporary directory, so pocketlm trains on all of the first and validates on
the second). The held-out articles are only ever evaluated.

Runs, each for ``--epochs`` passes over the training text (or ``--max-steps`` steps) and for each of
``--seeds`` seeds:

- ``hf``: a Hugging Face ``run_clm``-style reference, written here: ``GPT2LMHeadModel`` of the same
  shape, the training text tokenized and concatenated with no document boundaries and cut into
  blocks of the context length (``labels = input_ids``), shuffled each epoch, 16 blocks per step,
  AdamW (lr 3e-4, weight decay 0.1 on matrices and embeddings, betas 0.9/0.95), gradient clipping 1,
  the seed's schedule (warmup of min(100, 10% of the steps), cosine to 10% of the peak).
- ``seed``: ``pocketlm.train.train`` with the seed recipe (``python train.py``'s settings).
- ``data-limited``: the same with ``--recipe data-limited``.
- ``seed, lr X``: with ``--lr-sweep``, the seed recipe at other peak learning rates (each for the
  first ``--sweep-seeds`` seeds).
- with ``--variant LABEL:key=value,...``: pocketlm with those settings, for trying a lever alone
  (each for the first ``--variant-seeds`` seeds).
  A variant of a named recipe (``recipe=...`` among its settings) is compared with that recipe's run
  at equal tokens and at equal training time, in the report's table of levers.
  ``--runs`` picks which runs happen (``hf``, ``seed``, ``data-limited``, ``sweep``, the labels).

A measurement too long for one sitting (``gpt2-125m`` on a CPU) can be split: ``--json-out`` keeps
one invocation's result and ``--merge`` joins its runs to a later one's report, on the same machine
and setup only; a merged run asked for again keeps its seeds and trains only the missing ones
(with the same settings only). ``--stop-at-seed`` ends every run but the seed recipe's and the reference's at the
first evaluation at or below the seed recipe's final held-out loss at the same seed: all the second
target needs, and the run then says nothing about the other targets, which leave it out; a lever
measured so is compared at equal tokens where both its runs got to, and by each one's time to that
loss.

Every run is scored by the same function, ``pocketlm.evaluate.evaluate_sliding`` (sliding windows of
the context length, ``--stride``, default half of it) on the held-out articles: the Hugging Face
model through its weights converted to a pocketlm ``GPT`` (``hf.weights_from_hf``). It is scored
every ``--eval-every`` steps and at the end, so each run has a curve of
held-out loss against training tokens and against training wall time (evaluations excluded; each
pocketlm run compiles for itself, as a user's run does).
The reported figures are each run's last point. A pocketlm run uses its weight average when its
recipe keeps one (``ema_decay``) and the trainer holds it as ``run.state.ema``.

    python benchmarks/quality.py --model tiny --max-steps 4 --seeds 1 --stride 128     # smoke test
    # the measurement in docs/benchmarks.md (about 90 minutes on 2 cores)
    python benchmarks/quality.py --model tiny --seeds 3 --sweep-seeds 1 --lr-sweep 3e-4,1e-3,2e-3 --threads 2
    # one lever alone, two seeds
    python benchmarks/quality.py --model tiny --variant-seeds 2 --runs wd --variant "wd:recipe=data-limited,weight_decay=0.8"
    # a longer budget than the seed's (its own section and plot)
    python benchmarks/quality.py --model tiny --epochs 6 --seeds 1 --runs hf,seed,data-limited --threads 2
    # the gpt2-125m headline in two sittings
    python benchmarks/quality.py --model gpt2-125m --seeds 1 --runs seed --eval-every 20 --threads 2 --json-out seed.json
    python benchmarks/quality.py --model gpt2-125m --seeds 1 --runs data-limited --merge seed.json --stop-at-seed \
        --eval-every 12 --threads 2 --update-docs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import (REPO, WIKI_VALID, Stopwatch, Table, Target, add_common_options, judge, machine_info,
                     render_section, script_main)

from pocketlm.config import PRESETS, ModelConfig, TrainConfig, build_train_config
from pocketlm.data import WIKITEXT_FILES, hold_out, load_corpus, split_wikitext_articles
from pocketlm.device import autocast, resolve_device, resolve_precision
from pocketlm.ema import WeightEMA
from pocketlm.evaluate import EvalReport, evaluate_sliding
from pocketlm.hf import hf_config, weights_from_hf
from pocketlm.model import GPT
from pocketlm.optim import CosineSchedule, decay_groups
from pocketlm.tokenizer import Tokenizer, gpt2_tokenizer

SECTION = "## Quality per compute"
"""The ``tiny`` measurement's section at the seed's budget; every other model and budget has its own
(``section_heading``)."""
MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "tiny": ("tiny", {}),
    "gpt2-125m": ("gpt2-125m", {}),
    "small": ("gpt2-125m", {"n_layer": 6, "n_head": 6, "n_embd": 384}),  # 6 layers, 384 wide, 512 context
}
HELD_OUT_FRACTION = 0.1
TARGETS = {
    "seed_vs_hf": Target("pocketlm's seed recipe at least as good as the Hugging Face reference (held-out bits per "
                         "byte, reference minus seed, plus one standard error of that difference: a gap within the "
                         "seeds' noise counts as equal)", 0.0, fmt="{:+.4f}"),
    "data_limited_time_to_seed": Target("`--recipe data-limited` reaches the seed recipe's final held-out loss in "
                                        "at most half the seed recipe's training time (its time there, each seed "
                                        "against the seed recipe's loss at the same seed, over the seed recipe's "
                                        "whole time)", 0.5, at_most=True, fmt="{:.2f}x"),
    "data_limited_vs_tuned": Target("`--recipe data-limited`'s held-out word perplexity at least 15% below the "
                                    "seed recipe's at its best learning rate of the sweep (1 - ratio)", 0.15,
                                    fmt="{:.1%}"),
}
SWEEP = "seed, lr "
"""The label prefix of the seed recipe's runs at swept learning rates."""
SEED_RUNS = ("seed", SWEEP)
"""Labels of runs that are the seed recipe (at its own or a swept learning rate)."""


SAME_SETUP = ("model", "model_config", "precision", "epochs", "max_steps", "stride", "context", "train_articles",
              "held_out_articles", "recipe_data_limited")
"""What a merged result must share with this one for their runs to be compared: its runs name
recipes, so a recipe changed between the sittings would mix two recipes under one label."""
# A key an earlier result lacks (it predates the key) is not counted as a difference.
SAME_MACHINE = ("cpu", "cpu_native_bf16", "usable_cores", "torch", "torch_threads", "device", "gpu")


def budget_name(epochs: int, max_steps: int | None) -> str:
    """A run length other than the seed's 3 epochs, as a section and a plot name's suffix ("" for the seed's)."""
    if max_steps is not None:
        return f"{max_steps} steps"
    return "" if epochs == TrainConfig().optim.epochs else f"{epochs} epochs"


def report_parts(model: str, budget: str = "") -> list[str]:
    """What tells one report from another: the model (``tiny`` is the unnamed default) and a budget
    other than the seed's."""
    return [part for part in (model if model != "tiny" else "", budget) if part]


def section_heading(model: str, budget: str = "") -> str:
    """Each model and each budget other than the seed's has its own section: a measurement at
    one never overwrites another's."""
    return ", ".join([SECTION, *report_parts(model, budget)])


def plot_path(model: str, budget: str = "") -> Path:
    name = "-".join(["quality", *(part.replace(" ", "-") for part in report_parts(model, budget))])
    return REPO / "docs" / f"{name}.png"


def stopped(run: dict[str, Any]) -> bool:
    """Whether any seed of ``run`` ended at ``--stop-at-seed``'s goal rather than its budget."""
    return any(s.get("stopped_at_loss") is not None for s in run["seeds"])


def time_to_reach(curve: list[dict[str, Any]], loss: float) -> float | None:
    """Training seconds at which ``curve`` first reaches ``loss`` (linear between evaluations), else None."""
    previous = None
    for point in curve:
        if point["loss"] <= loss:
            if previous is None or previous["loss"] == point["loss"]:
                return point["seconds"]
            share = (previous["loss"] - loss) / (previous["loss"] - point["loss"])
            return previous["seconds"] + share * (point["seconds"] - previous["seconds"])
        previous = point
    return None


def loss_at(curve: list[dict[str, Any]], seconds: float, by: str = "seconds") -> float | None:
    """Held-out loss ``curve`` had reached after ``seconds`` of training (or as many training
    tokens, ``by="tokens"``; linear between evaluations, its last loss after its end), None before
    its first evaluation."""
    if seconds < curve[0][by]:
        return None
    for before, after in zip(curve, curve[1:]):
        if seconds <= after[by]:
            share = (seconds - before[by]) / max(after[by] - before[by], 1e-9)
            return before["loss"] + share * (after["loss"] - before["loss"])
    return curve[-1]["loss"]


def seed_goal(runs: dict[str, dict[str, Any]], seed: int) -> float:
    """The loss ``--stop-at-seed`` ends a run at and the second target times: the seed recipe's
    final held-out loss at the same seed (a paired comparison), its mean where it lacks that seed."""
    same = [s["curve"][-1]["loss"] for s in runs["seed"]["seeds"] if s["seed"] == seed]
    return same[0] if same else runs["seed"]["summary"]["loss"]["mean"]


def mean_time_to_goal(runs: dict[str, dict[str, Any]], seeds: list[dict[str, Any]]) -> float | None:
    """Mean over ``seeds`` of the training time each took to reach its ``seed_goal``; None if one never did."""
    times = [time_to_reach(s["curve"], seed_goal(runs, s["seed"])) for s in seeds]
    return None if None in times else statistics.fmean(times)


def lever_comparisons(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant of a named recipe against that recipe's run, on the seeds both have (all the
    recipe's seeds where they share none): final held-out loss at equal tokens, and each one's
    loss at the shorter of their mean training times. Positive differences: the recipe is ahead.
    Where a run ended at ``--stop-at-seed``'s goal, equal tokens is each seed's shorter run's last
    tokens, and each one's mean time to that goal is compared too."""
    rows = []
    for label, x in runs.items():
        base_label = x.get("settings", {}).get("recipe")
        if label in LABELS or label.startswith(SWEEP) or base_label not in runs:
            continue
        variant_seeds = x["seeds"]
        shared = {s["seed"] for s in variant_seeds}
        base_seeds = [s for s in runs[base_label]["seeds"] if s["seed"] in shared] or runs[base_label]["seeds"]
        loss, base_loss = (statistics.fmean(s["curve"][-1]["loss"] for s in seeds) for seeds in (variant_seeds,
                                                                                               base_seeds))
        seconds, base_seconds = (statistics.fmean(s["seconds"] for s in seeds) for seeds in (variant_seeds, base_seeds))
        at = min(seconds, base_seconds)
        variant_at, base_at = ([loss_at(s["curve"], at) for s in seeds] for seeds in (variant_seeds, base_seeds))
        row = {"label": label, "recipe": base_label, "seeds": sorted(shared),
               "changed": {k: v for k, v in x["settings"].items() if k != "recipe"},
               "loss": loss, "recipe_loss": base_loss, "seconds": seconds, "recipe_seconds": base_seconds,
               "equal_tokens": loss - base_loss, "equal_time_at": at,
               "equal_time": (None if None in variant_at + base_at else
                              statistics.fmean(variant_at) - statistics.fmean(base_at))}
        if stopped(x) or stopped(runs[base_label]):
            row.update(stopped_lever(runs, variant_seeds, base_seeds))
        rows.append(row)
    return rows


def stopped_lever(runs: dict[str, dict[str, Any]], variant_seeds: list[dict[str, Any]],
                  base_seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """A lever's figures where its runs ended at the seed recipe's loss, so at unequal tokens:
    both at each seed's shorter run's last tokens, and each one's time to that loss."""
    base_by_seed = {s["seed"]: s for s in base_seeds}
    pairs = [(s, base_by_seed[s["seed"]]) for s in variant_seeds if s["seed"] in base_by_seed]
    tokens = [min(v["curve"][-1]["tokens"], b["curve"][-1]["tokens"]) for v, b in pairs]
    losses = [(loss_at(v["curve"], t, "tokens"), loss_at(b["curve"], t, "tokens")) for (v, b), t in zip(pairs, tokens)]
    differences = [mine - theirs for mine, theirs in losses if None not in (mine, theirs)]
    return {"equal_tokens": statistics.fmean(differences) if differences else None,
            "equal_tokens_at": statistics.fmean(tokens) if tokens else None,
            "time_to_goal": mean_time_to_goal(runs, [v for v, _ in pairs]),
            "recipe_time_to_goal": mean_time_to_goal(runs, [b for _, b in pairs])}


def target_values(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The figures TARGETS judge, each None when a run it needs was not part of this measurement."""
    values: dict[str, float | None] = {}
    if "hf" in runs and "seed" in runs:
        hf, seed = runs["hf"]["summary"]["bpb"], runs["seed"]["summary"]["bpb"]
        n_hf, n_seed = len(runs["hf"]["seeds"]), len(runs["seed"]["seeds"])
        error = math.sqrt(hf["std"] ** 2 / n_hf + seed["std"] ** 2 / n_seed)
        values["seed_vs_hf"] = hf["mean"] - seed["mean"] + error
    if "seed" in runs and "data-limited" in runs:
        time = mean_time_to_goal(runs, runs["data-limited"]["seeds"])
        values["data_limited_time_to_seed"] = (None if time is None else
                                               time / runs["seed"]["summary"]["seconds"]["mean"])
    tuned = [r["summary"]["word_ppl"]["mean"] for label, r in runs.items() if label.startswith(SEED_RUNS)]
    if "data-limited" in runs and tuned and not stopped(runs["data-limited"]):
        values["data_limited_vs_tuned"] = 1 - runs["data-limited"]["summary"]["word_ppl"]["mean"] / min(tuned)
    return values


# ---------------------------------------------------------------------------------------------
# Data and evaluation


@dataclass
class Split:
    train: list[str]
    held_out: list[str]
    folder: Path
    """A WikiText folder: wiki.train.raw holds ``train``, wiki.valid.raw ``held_out``."""


def split_data(source: Path, root: Path) -> Split:
    """The first 90% of ``source``'s articles for training, the rest held out, as a WikiText folder."""
    articles = split_wikitext_articles(source.read_text(encoding="utf-8"))
    train, held = hold_out(articles, HELD_OUT_FRACTION, str(source))
    folder = root / "wikitext"
    folder.mkdir(parents=True)
    (folder / WIKITEXT_FILES["train"]).write_text("".join(train), encoding="utf-8")
    (folder / WIKITEXT_FILES["validation"]).write_text("".join(held), encoding="utf-8")
    corpus = load_corpus(str(folder))  # pocketlm must read back exactly these articles
    assert corpus.splits["train"] == train and corpus.splits["validation"] == held, "the split did not round-trip"
    return Split(train, held, folder)


@dataclass
class Scorer:
    """Held-out evaluation, one protocol for every run."""

    docs: list[str]
    tokenizer: Tokenizer
    stride: int | None  # None: half the context
    batch_size: int
    device: torch.device
    precision: str
    cache_dir: Path

    def __call__(self, model: GPT) -> EvalReport:
        stride = self.stride or max(1, model.config.block_size // 2)
        return evaluate_sliding(model, self.tokenizer, self.docs, stride=stride, wikitext=True,
                                batch_size=self.batch_size, device=self.device, precision=self.precision,
                                cache_dir=self.cache_dir)


@dataclass
class Curve:
    """Held-out figures against training progress; ``seconds`` is training time, evaluations excluded."""

    points: list[dict[str, Any]] = field(default_factory=list)
    began: float = 0.0
    paused: float = 0.0
    held_out_tokens: int = 0

    def start(self) -> None:
        self.began, self.paused = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.began - self.paused

    def record(self, step: int, tokens: int, evaluate: Callable[[], EvalReport]) -> None:
        seconds, stopped = self.seconds(), time.perf_counter()
        report = evaluate()
        self.held_out_tokens = report.tokens
        self.points.append({"step": step, "tokens": tokens, "seconds": round(seconds, 2), "loss": report.loss,
                            "bpb": report.bpb, "word_ppl": report.word_ppl})
        self.paused += time.perf_counter() - stopped


def wanted(step: int, total: int, every: int) -> bool:
    return step % every == 0 or step == total


# ---------------------------------------------------------------------------------------------
# pocketlm runs


@contextlib.contextmanager
def run_opened(callback: Callable[[Any], None]) -> Iterator[None]:
    """``pocketlm.train.train`` builds its ``Run`` (model, optimizer, schedule) inside and gives
    ``on_step`` only the step number; the benchmark scores the live model between steps, so it is
    handed the ``Run`` as ``open_run`` returns it."""
    import pocketlm.train as trainer

    original = trainer.open_run

    def opening(cfg: TrainConfig, *args: Any, **kwargs: Any) -> Any:
        run = original(cfg, *args, **kwargs)
        callback(run)
        return run

    trainer.open_run = opening
    try:
        yield
    finally:
        trainer.open_run = original


def scored_weights(run: Any) -> contextlib.AbstractContextManager:
    """The weights a run is judged by: its average where it keeps one, else its own."""
    ema = getattr(run.state, "ema", None)
    return ema.applied(run.state.model) if isinstance(ema, WeightEMA) else contextlib.nullcontext()


class ReachedGoal(Exception):
    """Raised between steps to end a run at ``--stop-at-seed``'s goal."""


def pocketlm_run(cfg: TrainConfig, score: Scorer, every: int | None, stop_at: float | None = None) -> dict[str, Any]:
    """One training run scored as it goes; with ``stop_at``, it ends at the first evaluation at or
    below that held-out loss."""
    from pocketlm.train import train

    curve, opened = Curve(), {}

    def on_open(run: Any) -> None:
        opened["run"] = run
        opened["every"] = every or max(1, run.plan.total_steps // 10)
        curve.start()

    def on_step(step: int) -> None:
        run = opened["run"]
        if wanted(step, run.plan.total_steps, opened["every"]):
            with scored_weights(run):
                curve.record(step, run.state.progress.tokens_seen, lambda: score(run.state.model))
            if stop_at is not None and curve.points[-1]["loss"] <= stop_at:
                raise ReachedGoal

    reached = False
    # Every run compiles for itself, as a user's run does: otherwise only the first run of this
    # process pays for compiling and the later ones reuse its code, which skews equal-time comparisons.
    torch._dynamo.reset()
    with run_opened(on_open):
        try:
            train(cfg, on_step=on_step, show_progress=False)
        except ReachedGoal:
            reached = True
    run = opened["run"]
    ema = getattr(run.state, "ema", None)
    used = {"optimizers": [type(o).__name__ for o in run.state.optimizer.optimizers],
            "schedule": type(run.schedule).__name__, "ema": isinstance(ema, WeightEMA),
            "precision": run.plan.precision, "compiled": run.plan.compiled}
    asked = {"muon": cfg.optim.optimizer == "muon", "wsd": cfg.optim.schedule == "wsd", "ema": cfg.optim.ema_decay > 0}
    acted = {"muon": any(isinstance(o, torch.optim.Muon) for o in run.state.optimizer.optimizers),
             "wsd": used["schedule"] == "WSDSchedule", "ema": used["ema"]}
    missing = [lever for lever, on in asked.items() if on and not acted[lever]]
    if missing:  # a config field the trainer does not act on yet: the row would be mislabelled
        print(f"quality: warning: the trainer ignored {', '.join(missing)} of recipe {cfg.optim.recipe}",
              file=sys.stderr)
    return {"n_params": run.state.model.num_parameters(), "steps": run.plan.total_steps,
            "warmup_steps": run.plan.warmup_steps, "used": used, "ignored": missing, "curve": curve.points,
            "seconds": curve.points[-1]["seconds"], "held_out_tokens": curve.held_out_tokens,
            "stopped_at_loss": stop_at if reached else None}


# ---------------------------------------------------------------------------------------------
# The Hugging Face reference


def concatenated_blocks(docs: list[str], tokenizer: Tokenizer, block_size: int) -> torch.Tensor:
    """run_clm's grouping: every document's tokens end to end (no separator), cut into blocks of
    ``block_size``; the remainder that fills no block is dropped."""
    ids = [t for doc in tokenizer.encode_batch(docs) for t in doc]
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[:n_blocks * block_size], dtype=torch.int64).view(n_blocks, block_size)


def hf_run(model_cfg: ModelConfig, seed_cfg: TrainConfig, split: Split, tokenizer: Tokenizer, score: Scorer,
           *, seed: int, epochs: int, max_steps: int | None, every: int | None, micro_batch: int,
           dropouts: str) -> dict[str, Any]:
    import transformers
    from workloads import hf_dropouts

    device, precision, o = score.device, score.precision, seed_cfg.optim
    blocks = concatenated_blocks(split.train, tokenizer, model_cfg.block_size)
    per_step = o.batch_size * o.grad_accum  # the seed's 16 sequences per optimizer step
    steps_per_epoch = math.ceil(len(blocks) / per_step)
    total = max_steps or epochs * steps_per_epoch
    warmup = min(o.warmup_steps, total // 10)  # the seed's rule (plan.run_length)
    schedule = CosineSchedule(o.lr, total, warmup, o.min_lr_ratio)
    every = every or max(1, total // 10)

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_config(model_cfg, **hf_dropouts(model_cfg, dropouts))).to(device).train()
    optimizer = torch.optim.AdamW(decay_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  fused=device.type in ("cpu", "cuda"))
    judged = GPT(model_cfg).to(device).eval()  # the HF weights, converted, for the shared evaluation

    def evaluate() -> EvalReport:
        judged.load_state_dict(weights_from_hf(model.state_dict(), model_cfg), strict=False)  # lm_head is tied
        return score(judged)

    order_rng = torch.Generator().manual_seed(seed)
    curve, tokens = Curve(), 0
    curve.start()
    for step in range(total):
        epoch_step = step % steps_per_epoch
        if epoch_step == 0:
            order = torch.randperm(len(blocks), generator=order_rng)
        rows = blocks[order[epoch_step * per_step:(epoch_step + 1) * per_step]]
        for lr_group in optimizer.param_groups:
            lr_group["lr"] = schedule.lr(step)
        for micro in rows.split(micro_batch):
            micro = micro.to(device, non_blocking=True)
            with autocast(device, precision):
                loss = model(input_ids=micro, labels=micro).loss  # mean over the block's predictions
            (loss * len(micro) / len(rows)).backward()  # every block is full: the mean over the step's blocks
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += len(rows) * (model_cfg.block_size - 1)  # predictions, as pocketlm counts its tokens
        if wanted(step + 1, total, every):
            curve.record(step + 1, tokens, evaluate)
    return {"n_params": sum(p.numel() for p in model.parameters()), "steps": total, "warmup_steps": warmup,
            "blocks": len(blocks), "used": {"optimizers": ["AdamW"], "schedule": "CosineSchedule", "ema": False,
                                            "precision": precision, "compiled": False, "dropouts": dropouts},
            "ignored": [], "curve": curve.points, "seconds": curve.points[-1]["seconds"],
            "held_out_tokens": curve.held_out_tokens}


# ---------------------------------------------------------------------------------------------
# The benchmark


def summary(seeds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation over seeds of each final figure."""
    out = {}
    for key in ("loss", "bpb", "word_ppl", "seconds"):
        values = [s["curve"][-1][key] if key != "seconds" else s["seconds"] for s in seeds]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def earlier_results(paths: list[Path], setup: dict[str, Any], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """``--merge``'s results, each checked to come from this setup on this machine (else the times
    and losses would not compare), before anything trains."""
    results = []
    for path in paths:
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
            differ = [k for k in SAME_SETUP if earlier.get(k, setup[k]) != setup[k]]
            differ += [f"machine {k}" for k in SAME_MACHINE
                       if earlier["machine"].get(k, machine.get(k)) != machine.get(k)]
            if not isinstance(earlier["runs"], dict):
                raise TypeError("its runs are not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"quality: error: --merge {path}: not a result of this benchmark ({e})") from None
        if differ:
            raise SystemExit(f"quality: error: --merge {path} was measured otherwise ({', '.join(differ)} differ); "
                             "merge only results of the same options on the same machine")
        results.append(earlier)
    return results


def provenance(earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which invocation measured which of ``--merge``'s runs, seed by seed (``seeds``: label to
    seeds). A merged result that itself merged others passes their entries on and is named only
    for the seeds it added, so a report merged twice still names the command behind each one."""
    entries = []
    for result in earlier:
        inherited = list(result.get("merged", []))
        passed_on = {(label, seed) for entry in inherited for label, seeds in entry_seeds(entry, result).items()
                     for seed in seeds}
        entries += inherited
        own = {label: [seed for seed in seeds if (label, seed) not in passed_on]
               for label, seeds in entry_seeds({"runs": list(result["runs"])}, result).items()}
        own = {label: seeds for label, seeds in own.items() if seeds}
        if own:
            entries.append({k: result[k] for k in ("command", "date", "load_average", "runtime_s")}
                           | {"runs": list(own), "seeds": own})
    return entries


def entry_seeds(entry: dict[str, Any], result: dict[str, Any]) -> dict[str, list[Any]]:
    """A provenance entry's seeds by label; an entry from before seeds were named covers all of
    its runs' seeds in ``result`` (None where the run names none)."""
    if "seeds" in entry:
        return entry["seeds"]
    return {label: [s["seed"] for s in result["runs"].get(label, {}).get("seeds", [])] or [None]
            for label in entry["runs"]}


def seeds_of(label: str, seeds: list[int], args: argparse.Namespace) -> list[int]:
    """The seeds run ``label`` trains: the first ``--sweep-seeds`` for a swept learning rate, the
    first ``--variant-seeds`` for a ``--variant``, all of ``seeds`` otherwise."""
    if label.startswith(SWEEP):
        return seeds[:args.sweep_seeds]
    if label in {name for name, _ in args.variant}:
        return seeds[:args.variant_seeds]
    return seeds


def measured_seeds(merged: dict[str, Any] | None, settings: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """The seeds a ``--merge``d result already measured for run ``label``, which this invocation
    keeps and does not train again; refused unless they were measured with the same settings."""
    if merged is None:
        return []
    if merged.get("settings") != settings:
        raise SystemExit(f"quality: error: the merged run {label!r} was measured with {merged.get('settings')}, "
                         f"not {settings}; give this run another label")
    return list(merged["seeds"])


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("quality")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    preset, overrides = MODELS[args.model]
    model_cfg = dataclasses.replace(PRESETS[preset], **overrides)
    seeds = [args.seed + i for i in range(args.seeds)]
    tokenizer = gpt2_tokenizer()
    context = model_cfg.block_size
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split = split_data(args.data, root)
        setup = {"model": args.model, "model_config": dataclasses.asdict(model_cfg), "precision": precision,
                 "epochs": args.epochs, "max_steps": args.max_steps, "stride": args.stride or context // 2,
                 "context": context, "train_articles": len(split.train), "held_out_articles": len(split.held_out),
                 "recipe_data_limited": build_train_config(None, recipe="data-limited").flat()}
        earlier = earlier_results(args.merge, setup, machine_info(device))
        for result in earlier:
            runs.update(result["runs"])
        score = Scorer(split.held_out, tokenizer, args.stride, args.eval_batch_size, device, precision, root / "cache")
        clock.say(f"{len(split.train)} training articles, {len(split.held_out)} held out; {args.model} on {device}, "
                  f"{precision}; seeds {seeds}")

        def pocketlm_config(seed: int, name: str, **settings: Any) -> TrainConfig:
            return build_train_config(
                None, preset=preset, model=overrides, data=str(split.folder),
                out_dir=str(root / "runs" / name / str(seed)), cache_dir=str(root / "cache"), epochs=args.epochs,
                max_steps=args.max_steps, seed=seed, device=device.type, precision=precision,
                compile={"auto": None, "on": True, "off": False}[args.compile],
                # its own validation and saves only at the start and the end, and cheap: the benchmark scores
                eval_interval=1 << 40, eval_batches=1, save_interval=1 << 40, keep_checkpoints=1, **settings)

        plans: list[tuple[str, dict[str, Any]]] = [("hf", {}), ("seed", {"recipe": "seed"}),
                                                   ("data-limited", {"recipe": "data-limited"})]
        plans += [(f"{SWEEP}{lr:g}", {"recipe": "seed", "lr": lr}) for lr in args.lr_sweep
                  if lr != TrainConfig().optim.lr]
        plans += args.variant
        plans = [(label, settings) for label, settings in plans if args.runs is None or label in args.runs
                 or (label.startswith(SWEEP) and "sweep" in args.runs)]
        if args.stop_at_seed and "seed" not in runs and "seed" not in dict(plans):
            raise SystemExit("quality: error: --stop-at-seed needs the seed recipe's run: add seed to --runs "
                             "or --merge a result that has it")
        kept = {label: measured_seeds(runs.get(label), settings, label) for label, settings in plans}
        for label, settings in plans:
            results = kept[label]
            for seed in [s for s in seeds_of(label, seeds, args) if s not in {r["seed"] for r in results}]:
                goal = (seed_goal(runs, seed)
                        if args.stop_at_seed and label != "hf" and not label.startswith(SEED_RUNS) else None)
                clock.say(f"{label}, seed {seed}" + (f", until held-out loss {goal:.4f}" if goal else ""))
                if label == "hf":
                    result = hf_run(model_cfg, TrainConfig(), split, tokenizer, score, seed=seed, epochs=args.epochs,
                                    max_steps=args.max_steps, every=args.eval_every, micro_batch=args.micro_batch,
                                    dropouts=args.hf_dropouts)
                else:
                    result = pocketlm_run(pocketlm_config(seed, label, **settings), score, args.eval_every, goal)
                last = result["curve"][-1]
                clock.say(f"{label}, seed {seed}: held-out loss {last['loss']:.4f}, {last['bpb']:.4f} bits/byte, "
                          f"word ppl {last['word_ppl']:.1f}, {result['seconds']:.0f} s of training")
                results.append({"seed": seed, **result})
            runs[label] = {"settings": settings, "seeds": results, "summary": summary(results)}
    first = next(iter(runs.values()))["seeds"][0]
    return clock.envelope(
        __file__, argv, device, **setup, seeds=sorted({s["seed"] for x in runs.values() for s in x["seeds"]}),
        held_out_tokens=first["held_out_tokens"],
        plot=(args.plot or plot_path(args.model, budget_name(args.epochs, args.max_steps))).name,
        merged=provenance(earlier),
        notes=[note for e in earlier for note in e.get("notes", [])] + args.note,
        runs=runs,
        targets=judge(TARGETS, target_values(runs)), levers=lever_comparisons(runs))


# ---------------------------------------------------------------------------------------------
# Report


def spread(stat: dict[str, float], fmt: str) -> str:
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


LABELS = {"hf": "Hugging Face run_clm-style reference", "seed": "pocketlm, seed recipe",
          "data-limited": "pocketlm, `--recipe data-limited`"}


def docs_section(r: dict[str, Any]) -> str:
    rows = []
    for label, x in r["runs"].items():
        s, first = x["summary"], x["seeds"][0]
        tokens = first["curve"][-1]["tokens"]
        ignored = f" (trainer ignored: {', '.join(first['ignored'])})" if first["ignored"] else ""
        ignored += " (stopped at the seed recipe's final held-out loss)" if stopped(x) else ""
        rows.append([LABELS.get(label, f"pocketlm, {label}") + ignored, str(len(x["seeds"])), f"{first['steps']:,}",
                     f"{tokens:,}", spread(s["loss"], "{:.4f}"), spread(s["bpb"], "{:.4f}"),
                     spread(s["word_ppl"], "{:.1f}"), spread(s["seconds"], "{:.0f}") + " s"])
    table = Table(["run", "seeds", "steps", "training tokens", "held-out loss", "held-out bits per byte",
                   "held-out word ppl", "training time"], rows,
                  caption=f"Each figure is the mean ± sample standard deviation over the run's seeds (the first "
                          f"of {', '.join(map(str, r['seeds']))}), after the last step.")
    length = f"{r['max_steps']} steps" if r["max_steps"] else f"{r['epochs']} epochs"
    summary = (f"The `{r['model']}` model ({r['model_config']['n_layer']} layers, {r['model_config']['n_embd']} wide, "
               f"context {r['context']}) trained for {length} on the first {r['train_articles']} articles of "
               f"`wiki.valid.raw` and scored on the last {r['held_out_articles']}, which no run trains on, by one "
               f"protocol for all: sliding windows of {r['context']} tokens, stride {r['stride']} "
               f"(`pocketlm eval --stride {r['stride']}`; {r['held_out_tokens']:,} tokens), {r['precision']}.")
    dl = ", ".join(f"{k} {v}" for k, v in r["recipe_data_limited"].items()
                   if k in ("optimizer", "muon_lr", "muon_weight_decay", "schedule", "decay_fraction",
                            "min_lr_ratio", "weight_decay", "ema_decay", "lr", "batch_size", "grad_accum"))
    reference = ("The reference is what `run_clm.py` does with this text: documents concatenated with no separator and "
              "cut into full blocks, each block predicting its own tokens from position 0, with the seed's optimizer, "
              "schedule and batch of 16 sequences. pocketlm frames each article with `<|endoftext|>` and never lets a "
              "prediction cross one. The reference never saw `<|endoftext|>`, so its held-out token loss includes "
              f"{r['held_out_articles']} badly predicted separators; bits per byte and word perplexity leave them out.")
    swept = ("; each `seed, lr X` row is the seed recipe with only its peak learning rate changed (the sweep the "
             "third target compares against)" if any(label.startswith(SWEEP) for label in r["runs"]) else "")
    notes = [f"![Held-out loss against training tokens and training time]({r['plot']})"]
    notes += [reference] if "hf" in r["runs"] else []
    notes += [f"`data-limited` is {dl}{swept}.",
              "Training time excludes the held-out evaluations and includes everything else a run does "
              "(data loading after its cache, its own compilation where the trainer chose it, its own end-of-run "
              "validation and checkpoint)."]
    notes += [f"Merged here (`--merge`) from an earlier invocation on the same machine and setup: "
              f"{merged_runs(m)}, by `{m['command']}` ({m['date']}, {m['runtime_s']:.0f} s in all; load average "
              f"{m['load_average']['before']} before, {m['load_average']['after']} after)."
              for m in r.get("merged", [])]
    notes += r.get("notes", [])
    tables = [table] + ([levers_table(r["levers"])] if r.get("levers") else [])
    heading = section_heading(r["model"], budget_name(r["epochs"], r["max_steps"]))
    return render_section(r, heading, summary, tables, notes)


def merged_runs(entry: dict[str, Any]) -> str:
    """A provenance entry's runs, with their seeds where it names them: ``seed (1338), hf``."""
    seeds = entry.get("seeds", {})
    return ", ".join(label + (f" ({', '.join(map(str, seeds[label]))})" if seeds.get(label) and
                              None not in seeds[label] else "") for label in entry["runs"])


def levers_table(levers: list[dict[str, Any]]) -> Table:
    to_goal = any("time_to_goal" in lever for lever in levers)  # a column only where runs stopped at the goal
    rows = []
    for lever in levers:
        at_tokens = f" at {lever['equal_tokens_at']:,.0f} tokens" if lever.get("equal_tokens_at") else ""
        rows.append([lever["label"], lever["recipe"], ", ".join(f"{k} {v}" for k, v in lever["changed"].items()),
                     ", ".join(map(str, lever["seeds"])), f"{lever['loss']:.4f}", f"{lever['recipe_loss']:.4f}",
                     "n/a" if lever["equal_tokens"] is None else f"{lever['equal_tokens']:+.4f}{at_tokens}",
                     "n/a" if lever["equal_time"] is None else
                     f"{lever['equal_time']:+.4f} at {lever['equal_time_at']:.0f} s",
                     f"{lever['seconds']:.0f} s / {lever['recipe_seconds']:.0f} s"]
                    + ([time_to_goal_ratio(lever)] if to_goal else []))
    return Table(["variant", "of recipe", "changed", "seeds", "held-out loss", "recipe's", "variant minus recipe, "
                  "equal tokens", "the same, equal training time", "training time, variant / recipe"]
                 + (["time to the seed recipe's final loss, variant / recipe"] if to_goal else []), rows,
                 caption="Levers: each variant changes one setting of a recipe and is compared with that recipe's "
                         "run on the same seeds. A positive difference means the recipe is ahead: for a variant "
                         "that removes a lever, that the lever wins. Equal training time compares both curves at "
                         "the shorter run's end (linear between evaluations). That favours the shorter run where "
                         "the longer one's schedule still has its decay ahead (wsd decays in its last fifth): a "
                         "lever that wins there would win by more against a run planned for that time.")


def time_to_goal_ratio(lever: dict[str, Any]) -> str:
    """``--stop-at-seed``'s lever column: each run's mean time to the seed recipe's final loss."""
    variant, recipe = lever.get("time_to_goal"), lever.get("recipe_time_to_goal")
    if variant is None or recipe is None:
        return "n/a"
    return f"{variant:.0f} s / {recipe:.0f} s = {variant / recipe:.2f}x"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    levers = {lever["label"] for lever in r.get("levers", [])}  # dashed: each differs from its recipe in one setting
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, x) in enumerate(r["runs"].items()):
        style = {"color": colours[index % len(colours)], "alpha": 0.8, "marker": ".",
                 "linestyle": "--" if label in levers else "-"}
        for i, seed in enumerate(x["seeds"]):
            points = seed["curve"]
            name = LABELS.get(label, f"pocketlm, {label}").replace("`", "") if i == 0 else None
            by_tokens.plot([p["tokens"] for p in points], [p["loss"] for p in points], label=name, **style)
            by_time.plot([p["seconds"] for p in points], [p["loss"] for p in points], **style)
    by_tokens.set(xlabel="training tokens", ylabel=f"held-out loss (sliding window, stride {r['stride']})")
    by_time.set(xlabel="training time (s)")
    by_tokens.legend(fontsize=8)
    fig.suptitle(f"{r['model']} on WikiText-2 (validation text: 90% train, 10% held out)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def variant(text: str) -> tuple[str, dict[str, Any]]:
    """``LABEL:key=value,...`` as (label, settings); numbers become numbers."""
    label, sep, pairs = text.partition(":")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL:key=value,..., got {text!r}")
    settings: dict[str, Any] = {}
    for pair in filter(None, pairs.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {pair!r}")
        try:
            settings[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            settings[key] = value
    return label, settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="small",
                   help="tiny, gpt2-125m, or small (6 layers, 384 wide, 512 context; default)")
    p.add_argument("--epochs", type=int, default=TrainConfig().optim.epochs, help="passes over the training text "
                   "(default the seed's 3)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps instead")
    p.add_argument("--seeds", type=int, default=3, help="seeds per run (default 3)")
    p.add_argument("--seed", type=int, default=1337, help="the first seed")
    p.add_argument("--lr-sweep", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                   help="also the seed recipe at these peak learning rates, e.g. 3e-4,1e-3,2e-3")
    p.add_argument("--sweep-seeds", type=int, default=None, help="seeds per --lr-sweep point (default --seeds)")
    p.add_argument("--variant-seeds", type=int, default=None, help="seeds per --variant run (default --seeds); "
                   "a lever is compared with its recipe's run on the seeds both have")
    p.add_argument("--runs", type=lambda s: set(s.split(",")), default=None,
                   help="only these runs, e.g. seed,sweep (of hf, seed, data-limited, sweep and --variant labels)")
    p.add_argument("--variant", type=variant, action="append", default=[],
                   help="also a pocketlm run with these settings, LABEL:key=value,...  "
                        "(e.g. 'dl lr 1e-3:recipe=data-limited,lr=1e-3'); repeatable")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations "
                   "(default a tenth of each run)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default half the context)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="windows per evaluation pass")
    p.add_argument("--micro-batch", type=int, default=4, help="the reference's sequences per forward pass")
    p.add_argument("--hf-dropouts", choices=("pocketlm", "gpt2"), default="pocketlm",
                   help="the reference's dropouts: the model config's (default) or GPT2Config's stock 0.1")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="for every run and every evaluation (default: as "
                   "pocketlm train would choose)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="pocketlm runs' --compile")
    p.add_argument("--data", type=Path, default=WIKI_VALID)
    p.add_argument("--merge", type=Path, action="append", default=[], help="an earlier --json-out result of the "
                   "same options on this machine, whose runs join this report; repeatable")
    p.add_argument("--stop-at-seed", action="store_true", help="end each run but the seed recipe's and the "
                   "reference's at the first evaluation reaching the seed recipe's final held-out loss at the "
                   "same seed")
    p.add_argument("--note", action="append", default=[], help="a sentence for the report, e.g. what else shared "
                   "the machine; it stays with the result when merged; repeatable")
    p.add_argument("--plot", type=Path, default=None, help="where --update-docs draws the curves (default "
                   "docs/quality(-MODEL)(-BUDGET).png: no MODEL for tiny, no BUDGET for the seed's 3 epochs, "
                   "e.g. docs/quality-6-epochs.png)")
    add_common_options(p, f"{SECTION} (, MODEL)(, BUDGET)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def section(result: dict[str, Any]) -> str:
        plot(result, args.plot or plot_path(args.model, budget))
        return docs_section(result)

    args = parse_args(argv)
    budget = budget_name(args.epochs, args.max_steps)
    return script_main(argv, lambda _: args, run, section_heading(args.model, budget), section)


if __name__ == "__main__":
    sys.exit(main())
