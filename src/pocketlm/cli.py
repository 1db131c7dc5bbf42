"""The ``pocketlm`` command: each subcommand is a plain typed function.

Errors in the user's input (bad flags, missing files, offline Hub, foreign checkpoints, NaN
losses) print one line, ``pocketlm: error: ...``, and exit with status 2. SIGINT/SIGTERM during
training save a checkpoint and exit with 128 + the signal number.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import click
import typer

from pocketlm import __version__
from pocketlm.config import optional_type, field_docs, flag_name, type_hints
from pocketlm.errors import PocketLMError

# Typer >= 0.20 vendors its own click; older releases raise the click package's exceptions.
_USAGE_ERRORS = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train a GPT-2-class model from scratch, evaluate it, generate text.")


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _print_version(value: bool) -> None:
    if value:
        print(f"pocketlm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    """Train a GPT-2-class model from scratch, evaluate it, generate text."""


def _option_type(hint: Any) -> Any:
    kind, _ = optional_type(hint)
    if typing.get_origin(kind) is typing.Literal:
        return str
    return kind


def _help(doc: str, default: Any) -> str:
    text = " ".join(doc.split("\n\n")[0].split())
    if default is not None and default is not dataclasses.MISSING and not isinstance(default, dict):
        shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
        text += f" (default {shown})"
    return text


def train_parameters() -> list[inspect.Parameter]:
    """One typer option per config field (``TrainConfig``'s sections and ``ModelConfig``), from
    the field's type and docstring: each field is written once, in config.py."""
    from pocketlm.config import PRESETS, SECTIONS, ModelConfig, TrainConfig

    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="YAML file of config fields (flat, or in "
                                               "sections dataset/optim/memory/run and model); flags override it.")),
        inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--preset", help=f"Model preset: {' or '.join(PRESETS)} "
                                               f"(default {TrainConfig.preset}).")),
    ]
    groups = [(cls, field_docs(cls)) for cls in SECTIONS.values()] + [(ModelConfig, field_docs(ModelConfig))]
    for cls, docs in groups:
        hints = type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = _option_type(hints[f.name])
            if cls is ModelConfig:
                doc = f"Model: {docs.get(f.name, '')} Default: the preset's."
                default = None
            else:
                doc = docs.get(f.name, "")
            if kind is bool:
                decls = [f"{flag_name(f.name)}/--no-{f.name.replace('_', '-')}"] if f.name == "compile" \
                    else [flag_name(f.name)]
            else:
                decls = [flag_name(f.name)]
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                            default=typer.Option(None, *decls, help=_help(doc, default))))
    return params


def train_command(**values: Any) -> None:
    """Train (or resume) a model. The same command again resumes; --resume branches from a checkpoint."""
    from pocketlm.config import given_settings
    from pocketlm.data import check_source
    from pocketlm.rundir import resolve_settings
    from pocketlm.train import train

    given = given_settings(values.pop("config"), **values)
    result = train(resolve_settings(given, check_data=check_source))
    if not result.main:  # under torchrun, rank 0 reports
        return
    where = result.final_checkpoint or result.out_dir
    loss = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"done: step {result.step}{loss}; checkpoint {where}")


train_command.__signature__ = inspect.Signature(train_parameters())  # type: ignore[attr-defined]
train_command.__annotations__ = {p.name: p.annotation for p in train_command.__signature__.parameters.values()}
app.command("train")(train_command)


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory, or a run directory (its best checkpoint, else its latest)."),
    data: str = typer.Option(..., help="Text to evaluate: a WikiText folder, a text file, a folder of .txt files, "
                                       "or hf:NAME[:CONFIG] for a Hub dataset with a text column."),
    split: str = typer.Option("auto", help="auto (test if present, else validation), train, validation, test or all."),
    batch_size: int = typer.Option(4, min=1, help="Micro-batch size."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("fp32", help="fp32, bf16, fp16 or auto."),
    stride: Optional[int] = typer.Option(None, help="Sliding-window evaluation (Hugging Face's perplexity guide): "
                                                    "the text as one stream, windows of the context length every N "
                                                    "tokens, each token scored once with at least context - N tokens "
                                                    "of history. Default: each document on its own."),
) -> None:
    """Report loss, perplexity, bits per byte and (WikiText) word-level perplexity. The last line is JSON."""
    from pocketlm.checkpoint import load_model
    from pocketlm.device import resolve_device, resolve_precision
    from pocketlm.evaluate import check_stride, choose_split, evaluate_documents, evaluate_sliding
    from pocketlm.errors import TrainingError
    from pocketlm.rundir import saved_train_config

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model, tokenizer, ckpt = load_model(checkpoint, dev, say=_note)
    context = model.config.block_size
    if stride is not None:
        check_stride(stride, context)  # before the data is read
    val_fraction = saved_train_config(ckpt.config, ckpt.path / "config.json").dataset.val_fraction
    docs, wikitext, chosen = choose_split(data, split, val_fraction)
    if stride is None:
        report = evaluate_documents(model, tokenizer, docs, wikitext=wikitext, batch_size=batch_size,
                                    device=dev, precision=prec)
        how = "per-document: each document scored on its own, in pieces of the context length"
    else:
        report = evaluate_sliding(model, tokenizer, docs, stride=stride, wikitext=wikitext, batch_size=batch_size,
                                  device=dev, precision=prec)
        how = (f"sliding window of {context} tokens, stride {stride}: each token scored once, with at least "
               f"{context - stride} tokens of history after the first window")
    if not math.isfinite(report.loss):
        raise TrainingError(f"checkpoint {ckpt.path} gives a non-finite loss ({report.loss}) on this text in "
                            f"{prec}; try --precision fp32, or an earlier checkpoint")
    print(f"checkpoint {ckpt.path} (step {ckpt.step}) on the {chosen} split of {data}: "
          f"{report.tokens:,} tokens, {report.bytes:,} bytes, {report.words:,} words", file=sys.stderr)
    print(f"protocol: {how}", file=sys.stderr)
    word = f", word ppl {report.word_ppl:.2f}" if report.word_ppl is not None else ""
    print(f"loss {report.loss:.4f}, ppl {report.ppl:.2f}, bits/byte {report.bpb:.4f}{word}", file=sys.stderr)
    print(json.dumps(report.as_dict()))


@app.command("plan")
def plan_command(
    preset: str = typer.Option("gpt2-125m", help="Model preset."),
    batch_size: int = typer.Option(4, min=1, help="Micro-batch size in sequences."),
    grad_accum: int = typer.Option(4, min=1, help="Micro-batches per optimizer step."),
    seq_len: Optional[int] = typer.Option(None, min=1, help="Tokens per sequence (default: the context length)."),
    precision: str = typer.Option("auto", help="auto (as training would choose on --device), bf16, fp16 or fp32."),
    checkpointing: str = typer.Option("selective", help="selective, full or none."),
    full_checkpoint_blocks: int = typer.Option(2, min=0, help="Blocks recomputed fully on top of selective."),
    vram: Optional[str] = typer.Option(None, help="Memory budget, e.g. 4GB: also print settings that fit it."),
    device: str = typer.Option("auto", help="Device the plan is for: auto (this machine's: cuda, then mps, then "
                                            "cpu), cpu, cuda or mps. A GPU plan leaves room for its context."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Plan for --low-memory training."),
    optimizer: str = typer.Option("adamw", help="adamw, or muon (one momentum for the blocks' matrices, as "
                                               "--recipe data-limited trains)."),
    ema: bool = typer.Option(False, "--ema", help="Count an fp32 weight average (--ema-decay above 0, as "
                                                  "--recipe data-limited keeps)."),
) -> None:
    """Predict a training step's peak memory; with --vram, choose settings that fit. Last line is JSON."""
    import torch

    from pocketlm.config import Checkpointing, Device, OptimizerName, Precision, check_value, model_preset
    from pocketlm.device import resolve_device, resolve_precision
    from pocketlm.planner import GiB, fit_to_budget, format_plan, parse_size, predict_peak

    check_value("checkpointing", checkpointing, Checkpointing)
    check_value("precision", precision, Precision)
    check_value("device", device, Device)
    check_value("optimizer", optimizer, OptimizerName)
    if device == "auto":
        device = resolve_device("auto").type
    if precision == "auto":
        precision = resolve_precision("auto", torch.device(device))
    config = model_preset(preset)
    plan = predict_peak(config, batch_size, seq_len, precision=precision, checkpointing=checkpointing,
                        full_blocks=full_checkpoint_blocks, device=device, low_memory=low_memory,
                        optimizer=optimizer, ema=ema)
    settings = ("low-memory (bf16 gradients and moments, full checkpointing)" if low_memory else
                f"{checkpointing} checkpointing ({full_checkpoint_blocks} full blocks)")
    print(f"{preset} on {device}, micro-batch {batch_size} x {seq_len or config.block_size} tokens, {precision}, "
          f"{settings}, {'Muon and AdamW' if optimizer == 'muon' else 'AdamW'}"
          f"{', weight average' if ema else ''}:")
    print(format_plan(plan))
    result: dict = {"device": device, "precision": precision, "plan": plan.as_dict()}
    if vram:
        budget = parse_size(vram)
        choice = fit_to_budget(config, budget, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                               precision=precision, device=device, low_memory=low_memory, optimizer=optimizer,
                               ema=ema)
        print(f"fits {budget / GiB:.2f} GiB: --batch-size {choice.batch_size} --grad-accum {choice.grad_accum} "
              f"--checkpointing {choice.checkpointing} --full-checkpoint-blocks {choice.full_checkpoint_blocks} "
              f"(effective batch {choice.batch_size * choice.grad_accum}, predicted {choice.plan.total / GiB:.2f} GiB)")
        result["fit"] = {"batch_size": choice.batch_size, "grad_accum": choice.grad_accum,
                         "checkpointing": choice.checkpointing,
                         "full_checkpoint_blocks": choice.full_checkpoint_blocks, "plan": choice.plan.as_dict()}
    print(json.dumps(result))


@app.command("generate")
def generate_command(
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint or run directory (its best checkpoint, else its latest). Default: runs/gpt2-125m."),
    prompt: Optional[str] = typer.Option(None, help="Text to continue."),
    prompt_file: Optional[Path] = typer.Option(None, help="File with one prompt per line, generated as a batch."),
    max_new_tokens: int = typer.Option(128, help="Tokens to generate per sample at most; <|endoftext|> stops earlier."),
    temperature: float = typer.Option(0.8, help="Softmax temperature; 0 means greedy decoding."),
    top_k: int = typer.Option(50, help="Sample among the k most likely tokens only (0 disables)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: the most likely tokens holding this much probability (1 disables)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty (> 1) for tokens already in the prompt or completion (1 disables)."),
    num_samples: int = typer.Option(1, help="Samples per prompt."),
    seed: Optional[int] = typer.Option(None, help="Seed; the same seed and flags give the same text (default: a fresh one)."),
    batch_size: int = typer.Option(16, help="Samples decoded side by side."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("fp32", help="fp32, bf16, fp16 or auto."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per sample instead of streaming text."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole context at every step (slow; for checking)."),
    prompt_lookup: int = typer.Option(15, help="Greedy decoding of one prompt: at most this many tokens guessed from the text so far and checked in one pass (0 disables; same output either way)."),
) -> None:
    """Generate text from a checkpoint: streams to the terminal, or JSON lines with --json."""
    from pocketlm.checkpoint import latest_checkpoint
    from pocketlm.errors import CheckpointError, ConfigError
    from pocketlm.console import DEFAULT_PROMPT, OrderedPrinter, iter_interactive, read_prompt_file
    from pocketlm.generate import Generator
    from pocketlm.sampling import validate_sampling

    validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      repetition_penalty=repetition_penalty, num_samples=num_samples, batch_size=batch_size,
                      prompt_lookup=prompt_lookup)
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    prompts = read_prompt_file(prompt_file) if prompt_file is not None else None
    if checkpoint is None:
        checkpoint = Path("runs") / "gpt2-125m"
        if latest_checkpoint(checkpoint) is None:
            raise CheckpointError(
                f"no checkpoint in {checkpoint}: train one with `python train.py`, or a quick one with "
                "`pocketlm train --preset tiny --data FILE` and pass --checkpoint runs/tiny")
    gen = Generator.from_checkpoint(checkpoint, device=device, precision=precision, recompute=no_cache, say=_note,
                                    warn=lambda msg: print(f"pocketlm: warning: {msg}", file=sys.stderr))
    if seed is None and temperature > 0:
        import secrets

        seed = secrets.randbits(31)  # printed below, so a good sample can be had again
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, num_samples=num_samples, seed=seed,
                    batch_size=batch_size, prompt_lookup=prompt_lookup)

    def run(batch: list[str]) -> None:
        if json_output:
            for sample in gen.generate(batch, **settings):
                print(json.dumps(sample.as_dict(), ensure_ascii=False))
            return
        n = len(batch) * num_samples
        many = n > 1
        printer = OrderedPrinter(
            n, header=lambda r: (f"--- prompt {r // num_samples + 1}, sample {r % num_samples + 1} ---\n" if many else "")
            + batch[r // num_samples],
            footer=lambda r: "\n" + ("\n" if many and r < n - 1 else ""))
        samples = gen.generate(batch, stream=printer, **settings)
        tokens = sum(s.completion_tokens for s in samples)
        seconds = max(s.seconds for s in samples)
        seed_note = f", seed {seed}" if temperature > 0 else ""
        print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s{seed_note}]",
              file=sys.stderr)

    if prompts is not None:
        run(prompts)
    elif prompt is not None:
        run([prompt])
    elif sys.stdin is not None and sys.stdin.isatty():
        print(f"loaded {checkpoint}; type a prompt (Ctrl-D or `exit` to quit)", file=sys.stderr)
        for line in iter_interactive():
            try:
                run([line])
            except KeyboardInterrupt:
                print("\n[interrupted]", file=sys.stderr)
    else:
        run([DEFAULT_PROMPT])


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder, or a run folder (its best checkpoint, else its latest)."),
    out_dir: Path = typer.Argument(..., help="New folder for the Hugging Face model (must not exist, or be empty)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO_ID",
                                              help="Also upload the folder to this Hugging Face Hub model repository "
                                                   "(created if needed; needs `hf auth login` or HF_TOKEN)."),
) -> None:
    """Write a checkpoint as a Hugging Face GPT2LMHeadModel folder that transformers loads without pocketlm."""
    from pocketlm.export import export_checkpoint
    from pocketlm.export import push_to_hub as push_folder

    done = export_checkpoint(checkpoint, out_dir, say=_note)
    padding = done.vocab_size - done.tokenizer_vocab
    rows = (f" ({done.vocab_size:,} embedding rows; generation_config suppresses the {padding} padding ids)"
            if padding else "")
    print(f"exported {done.checkpoint} (step {done.step}) to {done.out_dir}: GPT2LMHeadModel, "
          f"{done.n_params / 1e6:.1f}M parameters, context {done.block_size}, "
          f"vocabulary {done.tokenizer_vocab:,}{rows}")
    print(f"files: {', '.join(done.files)}")
    print(f'load it with transformers: AutoModelForCausalLM.from_pretrained("{done.out_dir}"), '
          f'AutoTokenizer.from_pretrained("{done.out_dir}")')
    if push_to_hub:
        url = push_folder(done.out_dir, push_to_hub, f"pocketlm export of {done.checkpoint.name} (step {done.step})")
        print(f"pushed to {url}")


@app.command("plot")
def plot_command(
    runs: list[Path] = typer.Argument(..., help="Run folders (the --out-dir of pocketlm train) or their "
                                                "metrics.jsonl."),
    out: Path = typer.Option(..., "--out", help="Image to write: .png, .svg or .pdf."),
) -> None:
    """Draw training and validation loss and the learning rate against tokens seen, one colour per run."""
    from pocketlm.plot import plot_runs

    curves = plot_runs(runs, out)
    print(f"wrote {out}: {len(curves)} run{'s' if len(curves) > 1 else ''}")
    for c in curves:
        val = f"; validation {c.val_loss[0]:.3f} -> {c.val_loss[-1]:.3f}" if len(c.val_loss) else ""
        print(f"  {c.name}: {int(c.steps[-1]):,} steps, {int(c.tokens[-1]):,} tokens; training loss "
              f"{c.loss[0]:.3f} -> {c.loss[-1]:.3f}{val}")


tokenizer_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                            help="Tokenizers: learn a byte-level BPE from your own text.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train_command(
    data: str = typer.Option(..., help="Text to learn from, as pocketlm train's --data takes it (a WikiText folder, "
                                       "a text file, a folder of .txt files, or hf:NAME[:CONFIG]); only its "
                                       "training split is read."),
    vocab_size: int = typer.Option(..., help="Tokens to learn, counting <|endoftext|> and the 256 byte tokens "
                                             "(at least 257)."),
    out: Path = typer.Option(..., help="Folder to write tokenizer.json into (created; an existing tokenizer.json "
                                       "is never overwritten)."),
    val_fraction: float = typer.Option(0.1, help="Share of documents held out when the source has no validation "
                                                 "split: give the run's --val-fraction, so the tokenizer never sees "
                                                 "the text the run validates on."),
) -> None:
    """Train a byte-level BPE on the training split of --data; then use it: pocketlm train --tokenizer OUT."""
    import time

    from pocketlm.config import DataConfig
    from pocketlm.data import load_corpus
    from pocketlm.tokenizer import bytes_per_token, gpt2_tokenizer, new_tokenizer_path, save_new_tokenizer, train_bpe

    DataConfig(val_fraction=val_fraction)  # the range pocketlm train's --val-fraction has
    new_tokenizer_path(out)  # refuse an existing tokenizer before spending time on training
    corpus = load_corpus(data, val_fraction)  # the same documents, and the same split, as training sees
    train_docs, held_out = corpus.splits["train"], corpus.splits.get("validation") or []
    began = time.perf_counter()
    tokenizer = train_bpe(train_docs, vocab_size)
    seconds = time.perf_counter() - began
    path = save_new_tokenizer(tokenizer, out)
    n_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
    print(f"trained a byte-level BPE of {tokenizer.vocab_size:,} tokens in {seconds:.1f} s on the training split of "
          f"{corpus.description} ({len(train_docs):,} documents, {n_bytes:,} bytes); <|endoftext|> is id "
          f"{tokenizer.eot_id}")
    if tokenizer.vocab_size < vocab_size:
        print(f"the text has too few distinct merges for {vocab_size:,} tokens: learned {tokenizer.vocab_size:,}")
    print(f"wrote {path}")
    ours, gpt2 = bytes_per_token(tokenizer, held_out), bytes_per_token(gpt2_tokenizer(), held_out)
    if ours is not None and gpt2 is not None:
        print(f"held-out text ({len(held_out):,} documents): {ours:.2f} bytes per token (GPT-2's BPE: {gpt2:.2f})")
    print(f"train with it: pocketlm train --tokenizer {out} --data {data}")
    print(json.dumps({"path": str(path), "vocab_size": tokenizer.vocab_size, "asked_vocab_size": vocab_size,
                      "eot_id": tokenizer.eot_id, "train_documents": len(train_docs), "train_bytes": n_bytes,
                      "seconds": round(seconds, 2), "held_out_bytes_per_token": ours,
                      "gpt2_held_out_bytes_per_token": gpt2}))


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status instead of calling sys.exit itself."""
    from torch.distributed import DistError

    from pocketlm.checkpoint import DISK_ERRNOS
    from pocketlm.train import Interrupted

    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = command.main(args=args or ["--help"], prog_name="pocketlm", standalone_mode=False)
    except _EXIT as exc:  # --help, or a command that asked to exit
        return getattr(exc, "exit_code", getattr(exc, "code", 0))
    except _USAGE_ERRORS as exc:  # bad flag values, unknown options: one line
        print(f"pocketlm: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except PocketLMError as exc:
        print(f"pocketlm: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        saved = f"saved {exc.checkpoint}" if exc.checkpoint is not None else "rank 0 saved the checkpoint"
        print(f"pocketlm: {exc}; {saved}; run the same command again to resume", file=sys.stderr)
        return 128 + exc.signum
    except DistError as exc:  # another rank died mid-collective (torchrun stops the rest)
        print(f"pocketlm: error: lost contact with another rank ({str(exc).splitlines()[0][:160]}); the checkpoints "
              "already saved are intact: run the same torchrun command again to resume", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that refuses a write outside a checkpoint save (log, config, cache)
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"pocketlm: error: cannot write{where}: {exc.strerror}; checkpoints already saved are intact: free "
              "some space or make the folder writable, then run the same command again (a run resumes from its "
              "last checkpoint)", file=sys.stderr)
        return 2
    except _ABORT:  # Ctrl-C outside the training loop
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
