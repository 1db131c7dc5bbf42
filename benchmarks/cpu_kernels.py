"""Each compiled-CPU training kernel of ``pocketlm.cpu_kernels`` against what it replaces.

Forward + backward at gpt2-125m's shapes for one layer and micro-batch (4 x 512 tokens, bf16),
timed side by side in one run, best of ``--repeats``:

* dropout on the residual stream (4 x 512 x 768): ``torch.compile`` of ``F.dropout`` (inductor's
  Philox) against ``torch.compile`` of ``hashed_dropout``;
* GELU on the MLP activation (4 x 512 x 3072): ``torch.compile`` of ``F.gelu(approximate="tanh")``
  against ``torch.compile`` of ``gelu_tanh`` (its sigmoid form);
* causal attention (4 x 12 heads x 512 x 64): SDPA (the CPU flash kernel, forward and backward)
  against ``torch.compile`` of ``CpuAttention`` with its backward in ``BACKWARD_QUERY_CHUNKS``
  bands of queries (pocketlm's) and in each count of ``--bands`` (1: the whole score matrix).

Prints JSON; ``--update-docs`` rewrites the "CPU kernels" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, best_seconds, exact_command, machine_info, machine_line, update_docs
from pocketlm import cpu_kernels
from pocketlm.cpu_kernels import CpuAttention, gelu_tanh, hashed_dropout

SECTION = "## CPU kernels"


def forward_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    grad = torch.randn_like(fn(*inputs))

    def run() -> None:
        leaves = [t.detach().requires_grad_() for t in inputs]
        fn(*leaves).backward(grad)

    return run


def attention_in_bands(bands: int) -> Callable[..., torch.Tensor]:
    """``CpuAttention`` compiled with its backward walking ``bands`` bands of queries."""
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return CpuAttention.apply(q, k, v, None)

    compiled = torch.compile(attention)

    def run(*qkv: torch.Tensor) -> torch.Tensor:
        kept, cpu_kernels.BACKWARD_QUERY_CHUNKS = cpu_kernels.BACKWARD_QUERY_CHUNKS, bands
        try:  # the constant is read when the backward is traced (the first call) and then baked in
            return compiled(*qkv)
        finally:
            cpu_kernels.BACKWARD_QUERY_CHUNKS = kept

    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16)
    B, T, C, H = args.batch_size, args.seq_len, args.n_embd, args.n_head
    residual = torch.randn(B, T, C, **bf16)
    mlp = torch.randn(B, T, 4 * C, **bf16)
    q, k, v = (torch.randn(B, H, T, C // H, **bf16) for _ in range(3))

    def dropout(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.1, training=True)

    pairs: dict[str, dict[str, Callable[[], None]]] = {
        "dropout": {"inductor": forward_backward(torch.compile(dropout), residual),
                    "pocketlm": forward_backward(torch.compile(lambda x: hashed_dropout(x, 0.1)), residual)},
        "gelu": {"inductor": forward_backward(torch.compile(lambda x: F.gelu(x, approximate="tanh")), mlp),
                 "pocketlm": forward_backward(torch.compile(gelu_tanh), mlp)},
        "attention": {"sdpa_flash": forward_backward(
                          lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v),
                      "pocketlm": forward_backward(attention_in_bands(cpu_kernels.BACKWARD_QUERY_CHUNKS), q, k, v),
                      **{f"pocketlm_{n}_bands": forward_backward(attention_in_bands(n), q, k, v)
                         for n in args.bands if n != cpu_kernels.BACKWARD_QUERY_CHUNKS}},
    }
    results: dict[str, dict[str, Any]] = {}
    for name, variants in pairs.items():
        # two warm-up calls: the first compiles the forward, autograd's backward compiles on its first use
        ms = {variant: round(best_seconds(fn, repeats=args.repeats, warmup=2) * 1e3, 3)
              for variant, fn in variants.items()}
        reference = next(iter(ms))
        results[name] = {"ms": ms, "speedup_vs_" + reference: round(ms[reference] / ms["pocketlm"], 2)}
    return {"benchmark": "cpu_kernels", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": exact_command(), "machine": machine_info(torch.device("cpu")),
            "shape": {"batch_size": B, "seq_len": T, "n_embd": C, "n_head": H, "dtype": "bf16",
                      "bands": cpu_kernels.BACKWARD_QUERY_CHUNKS},
            "repeats": args.repeats, "kernels": results}


def docs_section(r: dict[str, Any]) -> str:
    s, k = r["shape"], r["kernels"]
    lines = [SECTION, "",
             "Forward + backward of each compiled-CPU training kernel (`pocketlm.cpu_kernels`) against what it "
             f"replaces, for one layer and micro-batch ({s['batch_size']} x {s['seq_len']} tokens, {s['n_embd']} wide, "
             f"{s['n_head']} heads, {s['dtype']}; gpt2-125m's shapes by default), best of {r['repeats']} after "
             "warm-up, in one run.", "",
             f"- Machine: {machine_line(r['machine']['torch_threads'])}; torch {r['machine']['torch']}.",
             f"- Date: {r['date']}.", f"- Command: `{r['command']}`.", "",
             "| kernel | PyTorch's (ms) | pocketlm's (ms) | speed-up |", "|---|---:|---:|---:|"]
    labels = {"inductor": "compiled by inductor", "sdpa_flash": "SDPA, CPU flash kernel"}
    for name, row in k.items():
        reference = next(iter(row["ms"]))
        lines.append(f"| {name} | {row['ms'][reference]:.2f} ({labels[reference]}) | {row['ms']['pocketlm']:.2f} | "
                     f"{row['speedup_vs_' + reference]:.2f}x |")
    attention = k["attention"]["ms"]
    by_bands = {s["bands"]: attention["pocketlm"], **{int(name.split("_")[1]): ms for name, ms in attention.items()
                                                      if name.endswith("_bands")}}
    timed = ", ".join(f"{n} band{'s' if n > 1 else ''} {ms:.2f} ms" for n, ms in sorted(by_bands.items()))
    lines += ["", f"Attention forward + backward by the number of query bands its backward walks, each band "
              f"against only the keys it can see ({timed}; 1 is the whole score matrix at once): pocketlm uses "
              f"{s['bands']}. Dropout: inductor draws each CPU random number with a "
              "scalar Philox call; pocketlm hashes the element index under a per-call random seed, which "
              "vectorises. GELU: the same function, x sigmoid(2u) in place of 0.5 x (1 + tanh u)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bands", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2, 8],
                   help="other band counts to time for attention's backward (comma list; default 1,2,8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the '{SECTION}' section")
    p.add_argument("--docs", type=Path, default=DOCS)
    args = p.parse_args(argv)
    if (min(args.batch_size, args.seq_len, args.n_embd, args.n_head, args.repeats, *args.bands) < 1
            or args.n_embd % args.n_head):
        p.error("sizes, --repeats and --bands must be positive, and --n-embd a multiple of --n-head")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.update_docs:
        update_docs(docs_section(result), SECTION, args.docs)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
