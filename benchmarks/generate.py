"""Generation speed: pocketlm (prompt lookup, one token per pass, ``--no-cache``) vs Hugging Face ``generate``.

``--preset`` (gpt2-125m) with random (seeded) weights, the very same weights copied into
``transformers.GPT2LMHeadModel`` (``pocketlm.hf``), fp32 on the CPU, batch 1, greedy, exactly
``--new-tokens`` new tokens after a fixed 16-token prompt. Each timing is the best of ``--repeats``
runs after one warm-up run, the decoders taking turns so background load hits all alike; decoding
without the cache (``Generator(recompute=True)``, what ``pocketlm generate --no-cache`` runs) is
slow and runs once.

At batch 1 a pass reads every fp32 weight, so one token per pass is bound by memory bandwidth:
the "ceiling" times every Linear on a single token (the weight reads alone). Prompt lookup checks
guessed tokens in the same pass. With random weights greedy output soon loops, which lookup
predicts best; so the script also replays the decoder's guessing policy (``lookup.PromptLookup``)
on stretches of real text (``--text``) and prices each pass at this machine's measured pass times:
an estimate of the gain on text that repeats itself as little as WikiText does.

    python benchmarks/generate.py --update-docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import WIKI_VALID, Stopwatch, Table, Target, add_common_options, best_seconds, judge, \
    render_section, entry_point, steps_in_turns

from pocketlm.config import PRESETS
from pocketlm.generate import Generator
from pocketlm.hf import to_hf_model
from pocketlm.lookup import DEFAULT_PROMPT_LOOKUP, LOOKUP_PROBE, PromptLookup, agreed_prefix
from pocketlm.model import GPT
from pocketlm.tokenizer import gpt2_tokenizer

SECTION = "## Generation"
PROMPT = "The history of the city begins in the early Middle Ages, when a fishing village"  # 16 tokens
TARGETS = {"ratio_vs_hf": Target("pocketlm's default decoder at least 1.5x Hugging Face `generate`", 1.5,
                                 fmt="{:.2f}x"),
           "real_text_ratio_vs_hf": Target("the same on text like WikiText's (estimated from the replay)", 1.5,
                                           fmt="{:.2f}x")}


@torch.inference_mode()
def matvec_floor(model: GPT, repeats: int = 5) -> float:
    """Seconds for one pass of every Linear on a single token: each fp32 weight read once."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, m.in_features) for m in linears}
    return best_seconds(*(lambda m=m: m(inputs[m.in_features]) for m in linears), repeats=repeats)


@torch.inference_mode()
def pass_seconds(model: GPT, n_tokens: int, cached: int = 272, repeats: int = 5) -> float:
    """Best time of one cached pass over ``n_tokens`` new tokens (output layer on all of them, as
    prompt lookup needs) after ``cached`` tokens in the cache."""
    cached = min(cached, model.config.block_size - n_tokens)
    best = float("inf")
    for _ in range(repeats + 1):
        cache = model.new_kv_cache(1, cached + n_tokens)
        model.hidden_states(torch.randint(0, model.config.vocab_size, (1, cached)), kv_cache=cache)
        t0 = time.perf_counter()
        model.lm_head(model.hidden_states(torch.randint(0, model.config.vocab_size, (1, n_tokens)), kv_cache=cache))
        best = min(best, time.perf_counter() - t0)
    return best


def lookup_on_real_text(tokens: list[int], context: int, new_tokens: int, max_guesses: int,
                        pass_cost: Callable[[int], float], spans: int = 20) -> dict[str, Any]:
    """Had a model written ``spans`` stretches of real text (``new_tokens`` after ``context`` of the
    same text) greedily, how many passes the decoder's proposer would need, priced per pass."""
    step = max(1, (len(tokens) - context - new_tokens) // spans)
    passes, seconds = [], []
    for start in range(0, step * spans, step):
        seq = tokens[start:start + context + new_tokens]
        done, n, t = context, 0, 0.0
        lookup = PromptLookup(max_guesses)
        while done < len(seq):
            draft = lookup.propose(seq[:done], len(seq) - done - 1)
            agreed = agreed_prefix(draft, seq[done:])
            lookup.accept(agreed)
            done += agreed + 1  # the confirmed guesses and the model's own next token
            n += 1
            t += pass_cost(1 + len(draft))
        passes.append(n)
        seconds.append(t)
    return {"spans": spans, "context_tokens": context, "new_tokens": new_tokens,
            "mean_passes": round(statistics.mean(passes), 1),
            "tokens_per_pass": round(new_tokens / statistics.mean(passes), 2),
            "speed_vs_one_token_per_pass": round(pass_cost(1) * new_tokens / statistics.mean(seconds), 3)}


class PassCounter:
    """Counts the model's forward passes (prefills and decoding passes)."""

    def __init__(self, model: GPT) -> None:
        self.calls, self._inner = 0, model.hidden_states
        model.hidden_states = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self._inner(*args, **kwargs)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("generate")
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(args.seed)
    model = GPT(PRESETS[args.preset]).eval()
    hf = to_hf_model(model)
    cached, recompute = (Generator(model, tokenizer, "cpu", "fp32", recompute=r) for r in (False, True))
    prompt_ids = torch.tensor([tokenizer.encode(PROMPT)])
    n = args.new_tokens
    passes = PassCounter(model)

    def ours(lookup: int = DEFAULT_PROMPT_LOOKUP, generator: Generator = cached) -> list[int]:
        sample = generator.generate(PROMPT, max_new_tokens=n, temperature=0, stop_tokens=(), prompt_lookup=lookup)[0]
        return sample.token_ids

    @torch.inference_mode()
    def theirs(lookup: int | None = None) -> list[int]:
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        out = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, use_cache=True, pad_token_id=tokenizer.eot_id, **extra)
        return out[0, prompt_ids.size(1):].tolist()

    decoders = {"pocketlm": ours, "pocketlm_one_token_per_pass": lambda: ours(lookup=0), "hf": theirs,
                "hf_prompt_lookup": lambda: theirs(DEFAULT_PROMPT_LOOKUP)}
    forward_passes: dict[str, int] = {}

    def counted(name: str) -> Callable[[int], list[int]]:
        def decode(_: int) -> list[int]:
            passes.calls = 0
            tokens = decoders[name]()
            forward_passes[name] = passes.calls
            return tokens
        return decode

    clock.say(f"{len(decoders)} decoders, {n} tokens, best of {args.repeats} after a warm-up, taking turns")
    log = steps_in_turns({name: counted(name) for name in decoders}, rounds=1 + args.repeats, warmup=1,
                         seed=args.seed)
    best = {name: min(entry["step_s"]) for name, entry in log.items()}
    outputs = {name: entry["outputs"][-1] for name, entry in log.items()}
    uncached_s = uncached = None
    if not args.skip_uncached:
        clock.say("pocketlm without the cache (once)")
        t0 = time.perf_counter()
        uncached = ours(generator=recompute)
        uncached_s = time.perf_counter() - t0
    clock.say("pass times and the replay on real text")
    pass_times: dict[int, float] = {}

    def pass_cost(tokens: int) -> float:
        if tokens not in pass_times:
            pass_times[tokens] = pass_seconds(model, tokens)
        return pass_times[tokens]

    for tokens in (1, 1 + LOOKUP_PROBE, 1 + DEFAULT_PROMPT_LOOKUP):
        pass_cost(tokens)
    real_text = None
    if args.text.is_file():
        real_text = lookup_on_real_text(tokenizer.encode(args.text.read_text(encoding="utf-8")), context=256,
                                        new_tokens=n, max_guesses=DEFAULT_PROMPT_LOOKUP, pass_cost=pass_cost)
        real_text["source"] = args.text.name
    sample = outputs["pocketlm"]
    tokens_per_s = {name: round(n / t, 2) for name, t in best.items()}
    ratios = {"ratio_vs_hf": round(best["hf"] / best["pocketlm"], 3),
              "ratio_one_token_per_pass_vs_hf": round(best["hf"] / best["pocketlm_one_token_per_pass"], 3),
              "ratio_vs_hf_prompt_lookup": round(best["hf_prompt_lookup"] / best["pocketlm"], 3),
              "ratio_cached_vs_uncached": round(uncached_s / best["pocketlm_one_token_per_pass"], 2)
              if uncached_s else None}
    real_ratio = (round(real_text["speed_vs_one_token_per_pass"] * ratios["ratio_one_token_per_pass_vs_hf"], 3)
                  if real_text else None)
    return clock.envelope(
        __file__, argv, "cpu", model=f"{args.preset} (random init, seed {args.seed}), {model.num_parameters():,} "
                                     "parameters",
        prompt_tokens=prompt_ids.size(1), new_tokens=n, batch_size=1, precision="fp32", repeats=args.repeats,
        prompt_lookup_tokens=DEFAULT_PROMPT_LOOKUP, lookup_probe=LOOKUP_PROBE, tokens_per_s=tokens_per_s,
        uncached_tokens_per_s=round(n / uncached_s, 2) if uncached_s else None, **ratios,
        forward_passes={k: v for k, v in forward_passes.items() if k.startswith("pocketlm")},
        cpu_share={name: round(min(c / (s * torch.get_num_threads()) for c, s in zip(e["cpu_s"], e["step_s"])), 2)
                   for name, e in log.items()},
        fp32_matvec_ceiling_tokens_per_s=round(1 / matvec_floor(model), 2),
        pass_seconds_by_tokens={k: round(v, 4) for k, v in sorted(pass_times.items())},
        first_repeated_token_at=next((i for i in range(1, len(sample)) if sample[i] in sample[:i]), None),
        distinct_tokens_in_output=len(set(sample)), greedy_tokens_match_hf=sample == outputs["hf"],
        all_decoders_same_tokens=all(out == sample for out in outputs.values()),
        uncached_tokens_match_cached=uncached == sample if uncached is not None else None,
        lookup_on_real_text=real_text,
        targets=judge(TARGETS, {"ratio_vs_hf": ratios["ratio_vs_hf"], "real_text_ratio_vs_hf": real_ratio}))


def docs_section(r: dict[str, Any]) -> str:
    n, k, ceiling = r["new_tokens"], r["prompt_lookup_tokens"], r["fp32_matvec_ceiling_tokens_per_s"]
    tps = {name: f"{rate:.2f}" for name, rate in r["tokens_per_s"].items()}
    uncached = f"{r['uncached_tokens_per_s']:.2f}" if r["uncached_tokens_per_s"] else "not run"
    rows = [[f"**pocketlm** (default: KV cache + prompt lookup, up to {k} guesses per pass)", tps["pocketlm"],
             r["forward_passes"]["pocketlm"]],
            ["pocketlm, KV cache, one token per pass (`--prompt-lookup 0`)", tps["pocketlm_one_token_per_pass"],
             r["forward_passes"]["pocketlm_one_token_per_pass"]],
            ["pocketlm, no cache (`--no-cache`: full recomputation each step)", uncached, n],
            ["Hugging Face `generate`", tps["hf"], n],
            [f"Hugging Face `generate(prompt_lookup_num_tokens={k})`", tps["hf_prompt_lookup"], ""],
            ["ceiling of one token per pass: the fp32 weight reads alone", f"{ceiling:.2f}", ""]]
    notes = [f"Same tokens from every decoder: {str(r['all_decoders_same_tokens']).lower()} (pocketlm and Hugging "
             f"Face: {str(r['greedy_tokens_match_hf']).lower()}). One token per pass pocketlm runs at "
             f"{r['ratio_one_token_per_pass_vs_hf']:.2f}x Hugging Face and "
             f"{r['tokens_per_s']['pocketlm_one_token_per_pass'] / ceiling:.0%} of the weight-read ceiling; with "
             "prompt lookup at "
             f"{r['ratio_vs_hf']:.2f}x, and {r['ratio_vs_hf_prompt_lookup']:.2f}x Hugging Face's own prompt lookup.",
             f"Read with care: with random weights greedy output loops (first repeated token at position "
             f"{r['first_repeated_token_at']}, {r['distinct_tokens_in_output']} distinct tokens in {n}), which "
             "lookup predicts best. Pass times by tokens in the pass: "
             + ", ".join(f"{t} {1000 * s:.0f} ms" for t, s in r["pass_seconds_by_tokens"].items()) + "."]
    t = r["lookup_on_real_text"]
    if t:
        notes.append(f"Replayed on {t['spans']} stretches of {t['source']} ({t['new_tokens']} tokens after "
                     f"{t['context_tokens']} of context), the same guessing policy needs {t['mean_passes']} passes "
                     f"({t['tokens_per_pass']} tokens per pass): {t['speed_vs_one_token_per_pass']:.2f}x the "
                     "one-token decoder at the measured pass times (the second target's estimate).")
    summary = (f"Greedy decoding of {n} new tokens after a {r['prompt_tokens']}-token prompt, batch 1, fp32, on "
               f"{r['model']}; Hugging Face `GPT2LMHeadModel.generate` runs on the very same weights. Best of "
               f"{r['repeats']} runs after a warm-up, the decoders taking turns; the no-cache run is a single one.")
    method = ("tokens/s is new tokens over the best wall time; the ceiling times every Linear on one token. "
              "See `benchmarks/generate.py`.")
    return render_section(r, SECTION, summary, [Table(["decoder", "tokens/s", "forward passes"], rows)], notes, method)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-125m")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-uncached", action="store_true", help="leave out the slow no-cache run")
    p.add_argument("--text", type=Path, default=WIKI_VALID, help="real text for the lookup replay")
    add_common_options(p, SECTION)
    return p.parse_args(argv)


main = entry_point(parse_args, run, SECTION, docs_section)


if __name__ == "__main__":
    sys.exit(main())
