"""Each compiled-CPU training kernel of ``pocketlm.cpu_kernels`` against what it replaces: the
modules ``parallelize.apply_cpu_kernels`` swaps into a compiled CPU run against PyTorch's own.

Forward + backward at gpt2-125m's shapes for one layer and micro-batch (4 x 512 tokens, bf16),
timed side by side in one run, best of ``--repeats`` after two warm-up calls (the first compiles
the forward, autograd's backward compiles on its first use):

* dropout on the residual stream (4 x 512 x 768): compiled ``nn.Dropout`` (inductor draws each
  CPU random number with a scalar Philox call) against compiled ``cpu_kernels.Dropout`` (an
  integer hash of the element index under a per-call seed, which vectorises);
* GELU on the MLP activation (4 x 512 x 3072): compiled ``nn.GELU("tanh")`` against compiled
  ``cpu_kernels.GELUTanh`` (the same function as x sigmoid(2u));
* causal attention (4 x 12 heads x 512 x 64): SDPA (the CPU flash kernel) against compiled
  ``cpu_kernels.BandedAttention`` with its backward in ``BACKWARD_QUERY_CHUNKS`` bands of queries
  (pocketlm's) and in each count of ``--bands`` (1: the whole score matrix at once).

    python benchmarks/cpu_kernels.py --update-docs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import Stopwatch, Table, Target, add_common_options, best_seconds, judge, render_section, entry_point

from pocketlm import cpu_kernels

SECTION = "## CPU kernels"
REFERENCE = {"dropout": "inductor", "gelu": "inductor", "attention": "sdpa_flash"}
TARGETS = {name: Target(f"pocketlm's {name} faster than PyTorch's ({ref})", 1.0, fmt="{:.2f}x")
           for name, ref in REFERENCE.items()}


def forward_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    grad = torch.randn_like(fn(*inputs))

    def run() -> None:
        fn(*[t.detach().requires_grad_() for t in inputs]).backward(grad)

    return run


def attention_in_bands(bands: int) -> Callable[..., torch.Tensor]:
    """``BandedAttention`` compiled for training, its backward walking ``bands`` bands of queries."""
    attention = cpu_kernels.BandedAttention(0.0).train()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, None, True))

    def run(*qkv: torch.Tensor) -> torch.Tensor:
        kept, cpu_kernels.BACKWARD_QUERY_CHUNKS = cpu_kernels.BACKWARD_QUERY_CHUNKS, bands
        try:  # the constant is read when the backward is traced (the first call) and then baked in
            return compiled(*qkv)
        finally:
            cpu_kernels.BACKWARD_QUERY_CHUNKS = kept

    return run


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("cpu_kernels")
    torch.manual_seed(0)
    B, T, C, H = args.batch_size, args.seq_len, args.n_embd, args.n_head
    bf16 = dict(dtype=torch.bfloat16)
    residual, mlp = torch.randn(B, T, C, **bf16), torch.randn(B, T, 4 * C, **bf16)
    q, k, v = (torch.randn(B, H, T, C // H, **bf16) for _ in range(3))
    ours = cpu_kernels.BACKWARD_QUERY_CHUNKS
    variants: dict[str, dict[str, Callable[[], None]]] = {
        "dropout": {"inductor": forward_backward(torch.compile(torch.nn.Dropout(0.1).train()), residual),
                    "pocketlm": forward_backward(torch.compile(cpu_kernels.Dropout(0.1).train()), residual)},
        "gelu": {"inductor": forward_backward(torch.compile(torch.nn.GELU(approximate="tanh")), mlp),
                 "pocketlm": forward_backward(torch.compile(cpu_kernels.GELUTanh()), mlp)},
        "attention": {"sdpa_flash": forward_backward(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True),
                                                     q, k, v),
                      "pocketlm": forward_backward(attention_in_bands(ours), q, k, v),
                      **{f"pocketlm_{n}_bands": forward_backward(attention_in_bands(n), q, k, v)
                         for n in args.bands if n != ours}},
    }
    kernels = {}
    for name, fns in variants.items():
        clock.say(f"{name}: {', '.join(fns)}")
        ms = {variant: round(best_seconds(fn, repeats=args.repeats, warmup=2) * 1e3, 3) for variant, fn in fns.items()}
        speedup = round(ms[REFERENCE[name]] / ms["pocketlm"], 2)
        kernels[name] = {"ms": ms, "reference": REFERENCE[name], "speedup": speedup}
    shape = {"batch_size": B, "seq_len": T, "n_embd": C, "n_head": H, "dtype": "bf16", "bands": ours}
    return clock.envelope(__file__, argv, "cpu", shape=shape, repeats=args.repeats, kernels=kernels,
                          targets=judge(TARGETS, {name: row["speedup"] for name, row in kernels.items()}))


def docs_section(r: dict[str, Any]) -> str:
    s, k = r["shape"], r["kernels"]
    labels = {"inductor": "compiled by inductor", "sdpa_flash": "SDPA, CPU flash kernel"}
    table = Table(["kernel", "PyTorch's (ms)", "pocketlm's (ms)", "speed-up"],
                  [[name, f"{row['ms'][row['reference']]:.2f} ({labels[row['reference']]})",
                    f"{row['ms']['pocketlm']:.2f}", f"{row['speedup']:.2f}x"] for name, row in k.items()])
    by_bands = {s["bands"]: k["attention"]["ms"]["pocketlm"],
                **{int(name.split("_")[1]): ms for name, ms in k["attention"]["ms"].items() if name.endswith("_bands")}}
    bands = ", ".join(f"{n} band{'s' if n > 1 else ''} {ms:.2f} ms" for n, ms in sorted(by_bands.items()))
    notes = [f"Attention forward + backward by the number of query bands its backward walks, each band against only "
             f"the keys it can see: {bands} (1 is the whole score matrix at once); pocketlm uses {s['bands']}."]
    summary = (f"Forward + backward of each compiled-CPU training kernel (`pocketlm.cpu_kernels`) against what it "
               f"replaces, for one layer and micro-batch ({s['batch_size']} x {s['seq_len']} tokens, {s['n_embd']} "
               f"wide, {s['n_head']} heads, {s['dtype']}), best of {r['repeats']} after warm-up, in one run.")
    method = ("dropout: inductor's scalar Philox draws against a vectorised hash of the element index; GELU: "
              "x sigmoid(2u) in place of 0.5 x (1 + tanh u). See `benchmarks/cpu_kernels.py`.")
    return render_section(r, SECTION, summary, [table], notes, method)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bands", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2, 8],
                   help="other band counts to time for attention's backward (comma list; default 1,2,8)")
    add_common_options(p, SECTION)
    args = p.parse_args(argv)
    if (min(args.batch_size, args.seq_len, args.n_embd, args.n_head, args.repeats, *args.bands) < 1
            or args.n_embd % args.n_head):
        p.error("sizes, --repeats and --bands must be positive, and --n-embd a multiple of --n-head")
    return args


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
