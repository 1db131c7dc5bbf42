"""One Muon optimizer step on the CPU: ``torch.optim.Muon`` (its Newton-Schulz iteration in bf16)
against ``pocketlm.optim.FP32Muon`` forced to its fp32 iteration (the same update), side by side in
one run, best of ``--repeats`` after one warm-up step each, and whether the iteration pocketlm
chooses on this CPU (fp32 exactly where bf16 is emulated) is the faster one.

The matrices are those of ``--blocks`` transformer blocks of a model ``--n-embd`` wide (per block
c_attn 3C x C, attention c_proj C x C, c_fc 4C x C and the MLP's c_proj C x 4C), with random
gradients; gpt2-125m has 12 such blocks of width 768. Also reported: how far apart the two steps
leave the weights (relative to the step's size), which is bf16's rounding of the iteration.

    python benchmarks/muon_step.py --threads 2 --update-docs
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import Stopwatch, Table, Target, add_common_options, best_seconds, entry_point, judge, render_section

from pocketlm.optim import FP32Muon

SECTION = "## Muon on the CPU"
TARGETS = {"chosen_over_fastest": Target("the iteration pocketlm chooses on this CPU is the faster one (its step's "
                                         "time over the faster step's)", 1.0, at_most=True, fmt="{:.2f}x")}


def block_shapes(n_embd: int) -> list[tuple[int, int]]:
    """A GPT-2 block's weight matrices as torch stores them (out x in)."""
    return [(3 * n_embd, n_embd), (n_embd, n_embd), (4 * n_embd, n_embd), (n_embd, 4 * n_embd)]


def muon_step(optimizer_class: Callable[..., torch.optim.Optimizer], weights: list[torch.Tensor],
              grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    params = [w.clone().requires_grad_() for w in weights]
    for p, g in zip(params, grads):
        p.grad = g
    optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                adjust_lr_fn="original")
    return params, optimizer


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("muon_step")
    generator = torch.Generator().manual_seed(0)
    shapes = block_shapes(args.n_embd) * args.blocks
    weights = [torch.randn(s, generator=generator) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    steps, seconds = {}, {}
    fp32_muon = functools.partial(FP32Muon, fp32_iteration=True)
    for name, make in (("bf16", torch.optim.Muon), ("fp32", fp32_muon)):
        clock.say(f"{name}: {len(shapes)} matrices, {sum(a * b for a, b in shapes):,} weights")
        _, optimizer = muon_step(make, weights, grads)
        seconds[name] = best_seconds(optimizer.step, repeats=args.repeats, warmup=1)
        once, fresh = muon_step(make, weights, grads)
        fresh.step()
        steps[name] = once
    moved = sum((a.detach() - w).norm() ** 2 for a, w in zip(steps["bf16"], weights)) ** 0.5
    apart = sum((a.detach() - b.detach()).norm() ** 2 for a, b in zip(steps["bf16"], steps["fp32"])) ** 0.5
    chosen = "fp32" if muon_step(FP32Muon, weights[:1], grads[:1])[1].fp32_iteration else "bf16"
    ratio = round(seconds[chosen] / min(seconds.values()), 2)
    return clock.envelope(__file__, argv, "cpu", n_embd=args.n_embd, blocks=args.blocks, matrices=len(shapes),
                          repeats=args.repeats, seconds={k: round(v, 4) for k, v in seconds.items()},
                          fp32_speedup=round(seconds["bf16"] / seconds["fp32"], 2), chosen=chosen,
                          relative_difference=float(apart / moved),
                          targets=judge(TARGETS, {"chosen_over_fastest": ratio}))


def docs_section(r: dict[str, Any]) -> str:
    s = r["seconds"]
    mark = {name: " (pocketlm's choice here)" if name == r["chosen"] else "" for name in s}
    table = Table(["optimizer", "Newton-Schulz in", "one step (s)"],
                  [["`torch.optim.Muon`" + mark["bf16"], "bf16", f"{s['bf16']:.3f}"],
                   ["`pocketlm.optim.FP32Muon(fp32_iteration=True)`" + mark["fp32"], "fp32", f"{s['fp32']:.3f}"]])
    faster = "fp32" if r["fp32_speedup"] >= 1 else "bf16"
    factor = max(r["fp32_speedup"], 1 / r["fp32_speedup"])
    summary = (f"One Muon step over the weight matrices of {r['blocks']} GPT-2 block(s) {r['n_embd']} wide "
               f"({r['matrices']} matrices, random gradients), best of {r['repeats']} after a warm-up step, in one "
               f"run: **{factor:.1f}x** faster with the iteration in {faster} on this CPU; pocketlm chooses "
               f"{r['chosen']}. The two steps' weights differ by {r['relative_difference']:.2%} of the step's size "
               f"(bf16's rounding of the iteration).")
    notes = ["torch runs Muon's Newton-Schulz iteration in bf16, cheap on GPUs and on CPUs with bf16 matrix "
             "instructions (AVX512-BF16, AMX); a CPU without them emulates it. pocketlm's `FP32Muon` iterates in "
             "fp32 on such a CPU and is torch's own Muon everywhere else. See `benchmarks/muon_step.py`."]
    return render_section(r, SECTION, summary, [table], notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-embd", type=int, default=768, help="model width (default gpt2-125m's 768)")
    p.add_argument("--blocks", type=int, default=1, help="blocks whose matrices one step updates (default 1)")
    p.add_argument("--repeats", type=int, default=2)
    add_common_options(p, SECTION)
    args = p.parse_args(argv)
    if min(args.n_embd, args.blocks, args.repeats) < 1:
        p.error("--n-embd, --blocks and --repeats must be positive")
    return args


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
