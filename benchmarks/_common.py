"""Helpers the benchmark scripts share: what machine this is, the exact command, best-of-N
timing, and rewriting one section of docs/benchmarks.md (each script owns one section)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DOCS_INTRO = "# Benchmarks\n\nMeasurements of pocketlm, each section written by a script in `benchmarks/`.\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_seconds(*fns: Callable[[], Any], repeats: int, warmup: int = 1, device: Any = None) -> float:
    """Best time of ``repeats`` rounds of calling every ``fn`` in turn, after ``warmup`` untimed
    rounds (oneDNN's first calls, compilation). On a CUDA ``device`` each round is synchronised."""
    import torch

    def sync() -> None:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns:
            fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_line(threads: int) -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {threads} torch thread(s)"


def machine_info(device: Any) -> dict[str, Any]:
    """CPU, cores, library versions, torch threads and the device (and GPU name on CUDA)."""
    import torch

    info = {"cpu": cpu_model(), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": str(device)}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        info["transformers"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def hf_dropouts(model_cfg: Any, dropouts: str = "pocketlm") -> dict[str, float]:
    """``pocketlm``: the model config's own dropouts (attention-probability dropout is
    ``attn_dropout`` where the config has it); ``gpt2``: ``GPT2Config``'s defaults, 0.1 everywhere."""
    if dropouts == "gpt2":
        return {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    if dropouts != "pocketlm":
        raise ValueError(f"dropouts must be pocketlm or gpt2; got {dropouts!r}")
    return {"resid_pdrop": model_cfg.dropout, "embd_pdrop": model_cfg.dropout,
            "attn_pdrop": getattr(model_cfg, "attn_dropout", model_cfg.dropout)}


def exact_command() -> str:
    """How this script was run, relative to the current directory when possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(script)
    return shlex.join(["python", shown, *sys.argv[1:]])


def replace_section(text: str, section: str, heading: str) -> str:
    """Replace ``heading``'s section (up to the next ``## `` heading outside code fences) with
    ``section``; append it when missing."""
    lines = text.splitlines(keepends=True)
    start = end = None
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if start is None and line.rstrip() == heading:
            start = i
        elif start is not None and line.startswith("## "):
            end = i
            break
    body = section.rstrip("\n") + "\n"
    if start is None:
        prefix = text.rstrip("\n")
        return (prefix + "\n\n" if prefix else "") + body
    tail = lines[end:] if end is not None else []
    return "".join(lines[:start]) + body + ("\n" if tail else "") + "".join(tail)


def update_docs(section: str, heading: str, path: Path = DOCS) -> None:
    """Rewrite one section of the benchmarks page atomically; the other sections stay as they are."""
    text = path.read_text(encoding="utf-8") if path.is_file() else DOCS_INTRO
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(replace_section(text, section, heading), encoding="utf-8")
    os.replace(tmp, path)
