"""Does --low-memory cost quality? The same run with and without it, validation loss side by side.

Trains ``--preset`` on WikiText-2's validation text (the first 90% of its articles for training,
the rest for validation) twice through ``pocketlm.train.train``, with the same seed, data order and
settings, ``low_memory`` off and on (bf16 gradients and AdamW moments, full activation
checkpointing), and compares the validation-loss curves. The target: the low-memory run's final
validation loss within 2% of the default's.

    python benchmarks/low_memory_quality.py --update-docs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import (Stopwatch, Table, Target, add_common_options, add_training_options, entry_point, judge,
                     render_section)

from pocketlm.config import build_train_config
from pocketlm.train import train

SECTION = "## Low-memory quality"
TARGETS = {"relative_difference": Target("`--low-memory`'s final validation loss within 2% of the default's", 0.02,
                                         at_most=True, fmt="{:.2%}")}


def train_once(low_memory: bool, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cfg = build_train_config(None, preset=args.preset, data=str(args.data), out_dir=str(root / str(low_memory)),
                             cache_dir=str(root / "cache"), max_steps=args.steps, eval_interval=args.eval_interval,
                             precision=args.precision, device="cpu", seed=args.seed, low_memory=low_memory, lr=args.lr)
    began = time.perf_counter()
    result = train(cfg, show_progress=False)
    return {"low_memory": low_memory, "final_val_loss": result.val_loss,
            "seconds": round(time.perf_counter() - began, 1),
            "val_loss": {r["step"]: r["val_loss"] for r in result.history if r["event"] == "eval"}}


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("low_memory_quality")
    with tempfile.TemporaryDirectory() as tmp:
        clock.say("default settings")
        default = train_once(False, args, Path(tmp))
        clock.say("--low-memory")
        low = train_once(True, args, Path(tmp))
    difference = low["final_val_loss"] / default["final_val_loss"] - 1
    return clock.envelope(__file__, argv, "cpu", preset=args.preset, steps=args.steps, seed=args.seed,
                          precision=args.precision, lr=args.lr, default=default, low_memory=low,
                          relative_difference=difference,
                          targets=judge(TARGETS, {"relative_difference": abs(difference)}))


def docs_section(r: dict[str, Any]) -> str:
    default, low = r["default"], r["low_memory"]
    table = Table(["step", "validation loss, default", "validation loss, `--low-memory`"],
                  [[step, f"{loss:.4f}", f"{low['val_loss'][step]:.4f}"] for step, loss in default["val_loss"].items()])
    summary = (f"`--low-memory` (bf16 gradients and AdamW moments, full activation checkpointing) against the default "
               f"settings: the same run twice, `{r['preset']}` preset, {r['steps']} steps, seed {r['seed']}, "
               f"{r['precision']}, trained on the first 90% of `wiki.valid.raw`'s articles and evaluated on the rest.")
    notes = [f"Final validation loss: {default['final_val_loss']:.4f} (default) and {low['final_val_loss']:.4f} "
             f"(`--low-memory`), a relative difference of {r['relative_difference']:+.2%}."]
    return render_section(r, SECTION, summary, [table], notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    add_training_options(p, precision="bf16")
    add_common_options(p, SECTION)
    return p.parse_args(argv)


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
