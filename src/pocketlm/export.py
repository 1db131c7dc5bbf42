"""``pocketlm export``: a checkpoint as a Hugging Face ``GPT2LMHeadModel`` folder.

The folder loads with ``transformers`` alone, no pocketlm needed::

    model = AutoModelForCausalLM.from_pretrained(OUT)
    tokenizer = AutoTokenizer.from_pretrained(OUT)

The files are written directly, so exporting does not need ``transformers`` either:

- ``config.json``: a ``GPT2LMHeadModel`` of the checkpoint's shape (``hf.hf_config_dict``);
- ``model.safetensors``: the weights under Hugging Face's names and layout (``hf.to_hf_state_dict``),
  fp32, the tied output layer stored once as ``save_pretrained`` stores it;
- ``generation_config.json``: ``<|endoftext|>`` as beginning and end of text;
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``: the checkpoint's
  tokenizer for ``AutoTokenizer`` (``PreTrainedTokenizerFast``; ``<|endoftext|>`` is bos, eos and
  unk as in GPT-2; no clean-up of spaces, so decoding gives back the exact text);
- ``README.md``: a short model card.

An embedding table padded past the tokenizer (``--tokenizer`` rounds it up to a multiple of 64)
keeps its size: ``vocab_size`` in config.json is the model's, and generation_config.json lists the
padded ids in ``suppress_tokens``, so ``generate`` in transformers never produces them, just as
pocketlm's never does.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import save_file

from pocketlm.checkpoint import load_model
from pocketlm.errors import CheckpointError, ConfigError
from pocketlm.hf import TIED_KEY, hf_config_dict, to_hf_state_dict
from pocketlm.model import GPT
from pocketlm.tokenizer import EOT, TOKENIZER_FILE, Tokenizer

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", TOKENIZER_FILE, "tokenizer_config.json",
            "special_tokens_map.json", "README.md")


@dataclass
class ExportSummary:
    checkpoint: Path
    step: int
    out_dir: Path
    n_params: int
    vocab_size: int
    """Rows of the embedding table (config.json's vocab_size)."""
    tokenizer_vocab: int
    block_size: int
    files: tuple[str, ...] = HF_FILES


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path,
                      say: Callable[[str], None] | None = None) -> ExportSummary:
    """Write the Hugging Face folder ``out_dir`` for ``checkpoint`` (a checkpoint folder, or a run
    folder: its best checkpoint, else its latest; ``say`` hears which). ``out_dir`` must not exist yet, or be an empty folder; it appears whole or
    not at all. A checkpoint with non-finite weights is refused."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} already exists and is not an empty folder; choose a new OUT_DIR "
                          "(nothing was written)")
    model, tokenizer, ckpt = load_model(checkpoint, say=say)  # verifies every file's hash; refuses NaN or inf weights
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_hf_folder(tmp, model, tokenizer, card=model_card(out_dir.name, model, tokenizer, ckpt.step,
                                                               ckpt.meta.get("val_loss"), ckpt.config))
        if out_dir.exists():
            out_dir.rmdir()  # the empty folder the user made for it
        os.rename(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {out_dir} ({exc.strerror or type(exc).__name__}); nothing was "
                              "written") from None
    return ExportSummary(ckpt.path, ckpt.step, out_dir, model.num_parameters(), model.config.vocab_size,
                         tokenizer.vocab_size, model.config.block_size)


def write_hf_folder(folder: Path, model: GPT, tokenizer: Tokenizer, card: str = "") -> None:
    """The files of a Hugging Face ``GPT2LMHeadModel`` folder (see the module docstring)."""
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{config.vocab_size} embedding rows")
    weights = {name: tensor.float() for name, tensor in to_hf_state_dict(model).items() if name != TIED_KEY}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})  # transformers requires "format"
    eot = tokenizer.eot_id
    _write_json(folder / "config.json", hf_config_dict(config, eot_id=eot, dtype="float32"))
    generation: dict[str, Any] = {"bos_token_id": eot, "eos_token_id": eot}
    padded = list(range(tokenizer.vocab_size, config.vocab_size))
    if padded:  # embedding rows that are no token: never to be generated
        generation["suppress_tokens"] = padded
    _write_json(folder / "generation_config.json", generation)
    tokenizer.save(folder)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": config.block_size,
        # transformers' clean-up rewrites " ." as "." when decoding; a byte-level BPE decodes exactly without it
        "clean_up_tokenization_spaces": False})
    _write_json(folder / "special_tokens_map.json", special)
    (folder / "README.md").write_text(card, encoding="utf-8")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def model_card(name: str, model: GPT, tokenizer: Tokenizer, step: int, val_loss: float | None,
               record: dict[str, Any]) -> str:
    """A short README.md: what the model is, how it was trained, how to load it."""
    c = model.config
    train = record.get("train") if isinstance(record.get("train"), dict) else {}
    data = (train.get("dataset") or {}).get("data") or "WikiText-2 (Hugging Face Hub)"
    init = record.get("init") if isinstance(record.get("init"), dict) else None
    start = f"fine-tuned from {init.get('description') or init.get('source')}" if init else "trained from scratch"
    loss = f"; validation loss {val_loss:.4f}" if isinstance(val_loss, (int, float)) else ""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- gpt2
- pocketlm
---

# {name}

A GPT-2-architecture language model ({model.num_parameters() / 1e6:.1f}M parameters: {c.n_layer} layers,
{c.n_head} heads, {c.n_embd} wide, a {c.block_size}-token context, a {tokenizer.vocab_size:,}-token byte-level
BPE), {start} with pocketlm on {data}: {step} optimizer steps{loss}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
ids = tokenizer("The game", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_k=50)[0]))
```
"""


def push_to_hub(folder: Path, repo_id: str, commit_message: str) -> str:
    """Upload an exported folder to the Hugging Face Hub model repository ``repo_id`` (created if
    needed; the login of ``hf auth login`` or ``HF_TOKEN``). Returns the repository's URL."""
    from huggingface_hub import HfApi

    from pocketlm.data import hub_reachable
    from pocketlm.pretrained import hub_offline_requested

    if hub_offline_requested() or not hub_reachable():
        raise CheckpointError(f"cannot push to {repo_id}: the Hugging Face Hub is out of reach (no network, or "
                              f"HF_HUB_OFFLINE set); the export in {folder} is complete, push it later with "
                              f"`hf upload {repo_id} {folder}`")
    try:
        api = HfApi()
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    except Exception as exc:  # no login, no permission, bad name: one line, the export itself stays
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot push {folder} to {repo_id} on the Hugging Face Hub ({reason}); the export "
                              "itself is complete") from None
    return str(url)
