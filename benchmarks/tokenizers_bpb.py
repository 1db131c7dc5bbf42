"""Own tokenizer or GPT-2's? Held-out bits per byte of the same model trained on the same number of tokens.

On WikiText-2's validation text (the first 90% of its articles for training, the last 10% held out,
as ``--data wiki.valid.raw`` splits it), this script learns an 8,192-token byte-level BPE from the
training articles only (``pocketlm tokenizer train``'s code), then trains ``--preset`` twice through
``pocketlm.train.train`` with the same seed, schedule and number of training tokens: once with
GPT-2's 50,257-token BPE, once with its own tokenizer (``--tokenizer``). Packed batches (``--batching
pack``) make every optimizer step exactly micro-batch x accumulation x context tokens, so both runs
see the same number of tokens (not of bytes: a token of the smaller vocabulary carries fewer bytes).

Per-token losses of different tokenizers cannot be compared; bits per byte can: the held-out
articles' total NLL over their UTF-8 bytes (``pocketlm eval``'s ``bpb``). Lower wins.

    python benchmarks/tokenizers_bpb.py --update-docs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import (Stopwatch, Table, add_common_options, add_training_options, entry_point, render_section)

from pocketlm.checkpoint import load_model
from pocketlm.config import build_train_config
from pocketlm.data import load_corpus
from pocketlm.evaluate import evaluate_documents
from pocketlm.tokenizer import bytes_per_token, gpt2_tokenizer, save_new_tokenizer, train_bpe
from pocketlm.train import train

SECTION = "## Tokenizers: own vocabulary against GPT-2's"


def train_and_score(name: str, tokenizer_dir: Path | None, args: argparse.Namespace, root: Path,
                    held_out: list[str]) -> dict[str, Any]:
    """Train one model, then score the held-out articles with its final checkpoint."""
    cfg = build_train_config(None, preset=args.preset, data=str(args.data), out_dir=str(root / name),
                             cache_dir=str(root / "cache"), tokenizer=str(tokenizer_dir) if tokenizer_dir else None,
                             batching="pack", max_steps=args.steps, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps,
                             eval_interval=args.steps, save_interval=args.steps, precision=args.precision,
                             device="cpu", compile=False, seed=args.seed)
    began = time.perf_counter()
    result = train(cfg, show_progress=False)
    train_seconds = time.perf_counter() - began
    model, tokenizer, ckpt = load_model(result.final_checkpoint)
    report = evaluate_documents(model, tokenizer, held_out, wikitext=True, batch_size=args.batch_size,
                                cache_dir=root / "cache")
    steps = [r for r in result.history if r["event"] == "step"]
    start = next(r for r in result.history if r["event"] == "start")
    return {"tokenizer": name, "tokenizer_vocab": tokenizer.vocab_size, "model_vocab": model.config.vocab_size,
            "n_params": model.num_parameters(), "tokens_seen": steps[-1]["tokens_seen"],
            "train_tokens_per_epoch": start["train_tokens"], "final_train_loss": steps[-1]["loss"],
            "final_val_loss": result.val_loss, "train_seconds": round(train_seconds, 1),
            "held_out_bpb": report.bpb, "held_out_token_loss": report.loss, "held_out_word_ppl": report.word_ppl,
            "held_out_tokens": report.tokens, "held_out_bytes": report.bytes, "step": ckpt.step}


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("tokenizers_bpb")
    corpus = load_corpus(str(args.data), 0.1)
    train_docs, held_out = corpus.splits["train"], corpus.splits["validation"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clock.say(f"learning a {args.vocab_size}-token BPE from {len(train_docs)} training articles")
        began = time.perf_counter()
        own = train_bpe(train_docs, args.vocab_size)
        bpe_seconds = time.perf_counter() - began
        save_new_tokenizer(own, root / "own")
        compression = {name: {"train": bytes_per_token(tok, train_docs), "held_out": bytes_per_token(tok, held_out)}
                       for name, tok in (("gpt2", gpt2_tokenizer()), ("own", own))}
        runs = {}
        for name, folder in (("gpt2", None), ("own", root / "own")):
            clock.say(f"training {args.preset} for {args.steps} steps with the {name} tokenizer")
            runs[name] = train_and_score(name, folder, args, root, held_out)
            runs[name]["bytes_per_token"] = compression[name]
            runs[name]["train_bytes_seen"] = round(runs[name]["tokens_seen"] * compression[name]["train"])
            clock.say(f"{name}: held-out {runs[name]['held_out_bpb']:.4f} bits per byte")
    gpt2_bpb, own_bpb = runs["gpt2"]["held_out_bpb"], runs["own"]["held_out_bpb"]
    winner = "own" if own_bpb < gpt2_bpb else "gpt2"
    return clock.envelope(__file__, argv, "cpu", preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                          precision=args.precision, vocab_size=args.vocab_size,
                          bpe_train_seconds=round(bpe_seconds, 2), train_articles=len(train_docs),
                          held_out_articles=len(held_out), runs=runs, winner=winner,
                          bpb_difference=gpt2_bpb - own_bpb, relative_difference=(gpt2_bpb - own_bpb) / gpt2_bpb)


def docs_section(r: dict[str, Any]) -> str:
    runs = r["runs"]
    label = {"gpt2": "GPT-2's BPE", "own": "own BPE, learned from the training articles"}
    table = Table(
        ["tokenizer", "tokens", "parameters", "bytes per token (held out)", "training tokens", "training bytes seen",
         "training time", "held-out loss per token", "held-out bits per byte"],
        [[label[name], f"{x['tokenizer_vocab']:,}", f"{x['n_params']:,}",
          f"{x['bytes_per_token']['held_out']:.2f}", f"{x['tokens_seen']:,}", f"{x['train_bytes_seen']:,}",
          f"{x['train_seconds']:.0f} s", f"{x['held_out_token_loss']:.4f}", f"**{x['held_out_bpb']:.4f}**"]
         for name, x in runs.items()])
    better, worse = ("own", "gpt2") if r["winner"] == "own" else ("gpt2", "own")
    fewer = 1 - runs[better]["held_out_bpb"] / runs[worse]["held_out_bpb"]
    name = {"gpt2": "GPT-2's 50,257-token BPE", "own": f"the own {runs['own']['tokenizer_vocab']:,}-token BPE"}
    verdict = (f"At {runs['gpt2']['tokens_seen']:,} training tokens each, {name[better]} wins: "
               f"{runs[better]['held_out_bpb']:.4f} bits per byte on the held-out articles against "
               f"{runs[worse]['held_out_bpb']:.4f}, {fewer:.1%} fewer bits.")
    summary = (f"`{r['preset']}` trained {r['steps']} steps ({r['batch_size']} x {r['grad_accum']} packed rows of "
               f"its context per step, lr {r['lr']}, seed {r['seed']}, {r['precision']}) on the first "
               f"{r['train_articles']} articles of `wiki.valid.raw`, once with GPT-2's tokenizer and once with a BPE "
               f"of {r['vocab_size']:,} tokens learned from those same articles in {r['bpe_train_seconds']:.1f} s; "
               f"both scored on the last {r['held_out_articles']} articles. " + verdict)
    ratio = runs["gpt2"]["model_vocab"] / runs["own"]["model_vocab"]
    notes = [f"Equal tokens are not equal text: a token of the smaller vocabulary carries fewer bytes, so that run saw "
             f"less text (the 'training bytes seen' column) and its context of {r['preset']}'s length spans fewer "
             f"bytes; but its embedding table and output layer are {ratio:.1f}x smaller, so each step is cheaper (the "
             "'training time' column) and the model has fewer parameters.",
             "Bits per byte count only the text's own tokens (a document's closing `<|endoftext|>` is left out), so "
             "they compare across tokenizers; the per-token losses do not."]
    return render_section(r, SECTION, summary, [table], notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    # 200 steps of 2,048 tokens: about 1.8 passes over the training articles in GPT-2's tokens. On a 2-core
    # CPU in fp32 a step takes about 1.2-1.5 s with GPT-2's vocabulary and 0.25 s with 8,192 tokens: about
    # 7 minutes in all, evaluations included.
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each run (default 200)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens of the learned BPE (default 8192)")
    add_training_options(p, precision="fp32")
    add_common_options(p, SECTION)
    return p.parse_args(argv)


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
