"""Does --low-memory cost quality? The same run with and without it, validation loss side by side.

    python benchmarks/low_memory_quality.py --update-docs

trains the chosen preset on WikiText-2's validation text (first 90% of its articles for
training, the rest for validation, as every offline benchmark here) twice with the same seed,
data order and settings, and prints both validation-loss curves as JSON. The target: the
low-memory run's final validation loss within 2% of the default's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import machine_line, update_docs
from pocketlm.config import build_train_config
from pocketlm.train import train

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
SECTION = "## Low-memory quality"


def run(low_memory: bool, args: argparse.Namespace, root: Path) -> dict:
    cfg = build_train_config(None, preset=args.preset, data=str(args.data), out_dir=str(root / str(low_memory)),
                             cache_dir=str(root / "cache"), max_steps=args.steps, eval_interval=args.eval_interval,
                             precision=args.precision, device="cpu", seed=args.seed, low_memory=low_memory,
                             lr=args.lr)
    began = time.perf_counter()
    result = train(cfg, show_progress=False)
    curve = {r["step"]: r["val_loss"] for r in result.history if r["event"] == "eval"}
    return {"low_memory": low_memory, "val_loss": curve, "final_val_loss": result.val_loss,
            "seconds": round(time.perf_counter() - began, 1)}


def docs_section(result: dict) -> str:
    default, low = result["default"], result["low_memory"]
    rows = "\n".join(f"| {step} | {default['val_loss'][step]:.4f} | {low['val_loss'][step]:.4f} |"
                     for step in default["val_loss"])
    verdict = "held" if result["within_target"] else "not held"
    return f"""{SECTION}

`--low-memory` (bf16 gradients and AdamW moments, full activation checkpointing) against the
default settings: the same run twice, `{result['preset']}` preset, {result['steps']} steps,
seed {result['seed']}, {result['precision']}, trained on the first 90% of `wiki.valid.raw`'s articles
and evaluated on the rest.

- Machine: {result['machine']}; torch {result['torch']}.
- Date: {result['date']}.
- Command: `{result['command']}`.

| step | validation loss, default | validation loss, `--low-memory` |
|---:|---:|---:|
{rows}

Final validation loss: {default['final_val_loss']:.4f} (default) and {low['final_val_loss']:.4f}
(`--low-memory`), a relative difference of {100 * result['relative_difference']:+.2f}%.
Target (within 2%): **{verdict}**.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        default = run(False, args, Path(tmp))
        low = run(True, args, Path(tmp))
    difference = low["final_val_loss"] / default["final_val_loss"] - 1
    result = {"benchmark": "low_memory_quality", "preset": args.preset, "steps": args.steps, "seed": args.seed,
              "precision": args.precision, "default": default, "low_memory": low,
              "relative_difference": difference, "within_target": abs(difference) <= 0.02,
              "machine": machine_line(torch.get_num_threads()),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(["benchmarks/low_memory_quality.py", *sys.argv[1:]])}
    print(json.dumps(result, indent=2))
    if args.update_docs:
        update_docs(docs_section(result), SECTION)


if __name__ == "__main__":
    main()
