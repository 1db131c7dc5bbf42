"""Starting from existing weights (`pocketlm train --init`): a Hugging Face GPT-2 folder fine-tuned,
exported and read back by transformers (same logits, same greedy tokens, the source's exact loss at
the first step); tied and untied heads; the Hub through its cache and offline; pocketlm checkpoints
as sources; resuming an --init run with the same command; every one-line error."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pocketlm.batching import collate
from pocketlm.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint, weights_state_dict
from pocketlm.config import build_train_config
from pocketlm.data import load_dataset
from pocketlm.generate import Generator
from pocketlm.hf import from_hf_state_dict, model_config_from_hf
from pocketlm.losses import IGNORE_INDEX
from pocketlm.state import BatchStream
from pocketlm.tokenizer import EOT, gpt2_tokenizer
from pocketlm.train import open_run, train
from test_cli import assert_one_line_error, run_cli

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_POSITIONS = 64
# The run's settings, as flags and as config fields; dropout off so that step 1's loss is the
# source model's own loss on that batch.
SETTINGS = {"batch_size": 2, "grad_accum": 2, "precision": "fp32", "device": "cpu", "eval_batches": 2,
            "log_interval": 1, "seed": 3, "dropout": 0.0, "lr": 1e-3, "warmup_steps": 0, "compile": False}


def flags(**settings) -> list[str]:
    out = []
    for key, value in {**SETTINGS, **settings}.items():
        if isinstance(value, bool):
            out.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        else:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def save_hf_gpt2(folder: Path, *, tied: bool = True, vocab_size: int = 50257, seed: int = 0,
                 model_type_override: str | None = None) -> "transformers.GPT2LMHeadModel":
    """A small random GPT2LMHeadModel saved with save_pretrained, with GPT-2's tokenizer saved by
    transformers beside it. Every weight random (LayerNorms too), the embedding wide, so that a
    wrong mapping shows and greedy decoding has clear winners."""
    from tokenizers import Tokenizer as HFTokenizer

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=N_POSITIONS, vocab_size=vocab_size,
                                     tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        model.transformer.wte.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    backend = HFTokenizer.from_str(gpt2_tokenizer().backend.to_str())  # a copy: transformers may change its object
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT).save_pretrained(folder)
    if model_type_override:
        config_path = folder / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": model_type_override,
                                           "architectures": ["LlamaForCausalLM"]}))
    return model


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-source")
    return folder, save_hf_gpt2(folder)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def source_loss_on_first_step(hf_model, corpus_file: Path, cache: Path) -> float:
    """The source model's mean NLL over the micro-batches of the run's first optimizer step: the
    same examples (documents framed by <|endoftext|>, cut at the context), the same targets, the
    same padding left out of the mean."""
    data = load_dataset(str(corpus_file), gpt2_tokenizer(), N_POSITIONS, cache_dir=cache)
    stream = BatchStream("bucket", data.train.lengths, SETTINGS["batch_size"], N_POSITIONS, SETTINGS["seed"])
    total, count = 0.0, 0
    for batch in stream.next_group(SETTINGS["grad_accum"]):
        mb = collate(data.train, batch, gpt2_tokenizer().eot_id)
        logits = hf_model(mb.input_ids).logits
        total += F.cross_entropy(logits.flatten(0, 1), mb.targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += mb.real_tokens
    return total / count


def test_fine_tune_export_and_reload_in_transformers(capsys, tmp_path, corpus_file, hf_source) -> None:
    folder, hf_model = hf_source
    run, exported = tmp_path / "run", tmp_path / "hf"
    code, out, err = run_cli(capsys, "train", *flags(max_steps=3), "--init", folder, "--data", corpus_file,
                             "--out-dir", run)
    assert code == 0, err
    assert f"starting from the weights of Hugging Face folder {folder.resolve()}" in err
    assert "model from " in err

    # where the weights came from: config.json and the log's start line
    record = json.loads((run / "config.json").read_text())
    assert record["init"] == {"source": str(folder), "kind": "huggingface",
                              "description": f"Hugging Face folder {folder.resolve()}"}
    assert record["train"]["run"]["init"] == str(folder)
    assert {k: record["model"][k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")} == \
        {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 50257, "block_size": N_POSITIONS}  # min(512, 64)
    log = metrics(run)
    start = next(r for r in log if r["event"] == "start")
    assert start["init"] == record["init"] and start["start_step"] == 0
    assert next(r for r in log if r["event"] == "step")["step"] == 1  # progress starts fresh

    # step 1's loss is the loss of the untouched source model on that step's batches
    first = next(r for r in log if r["event"] == "step" and r["step"] == 1)
    assert first["loss"] == pytest.approx(source_loss_on_first_step(hf_model, corpus_file, tmp_path / "c"), rel=1e-5)

    code, out, err = run_cli(capsys, "export", run, exported)
    assert code == 0, err
    assert "GPT2LMHeadModel" in out
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "README.md"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    ours, tokenizer, _ = load_model(run)
    text = "The history of the game, in 1998: “quotes”\nand  spaces"
    ids = tokenizer.encode(text)
    assert hf_tok(text).input_ids == ids and hf_tok.decode(ids) == text
    assert hf_tok.eos_token == hf_tok.bos_token == EOT
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)
    # the fine-tuned weights moved away from the source's
    assert not torch.allclose(hf(x).logits, hf_model(x).logits, atol=1e-3)

    # greedy decoding: pocketlm's (with and without prompt lookup) and transformers' agree
    prompt = "The history of the"
    completions = []
    for lookup in ("15", "0"):
        code, out, err = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", prompt, "--temperature", "0",
                                 "--max-new-tokens", "20", "--prompt-lookup", lookup, "--json")
        assert code == 0, err
        completions.append(json.loads(out.strip().splitlines()[-1])["completion"])
    p = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        generated = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=20, do_sample=False,
                                pad_token_id=tokenizer.eot_id)
    ours_ids = Generator(ours, tokenizer, "cpu").generate(prompt, max_new_tokens=20, temperature=0)[0].token_ids
    assert generated[0, p.size(1):].tolist()[:len(ours_ids)] == ours_ids
    assert completions[0] == completions[1] == hf_tok.decode(generated[0, p.size(1):], skip_special_tokens=True)


def test_resuming_an_init_run_with_the_same_command_needs_no_source(capsys, tmp_path, corpus_file, hf_source) -> None:
    """Crashed after its step-2 checkpoint, an --init run resumed by the same command (with the
    source gone by then) ends bit-identical to one never interrupted."""
    source = tmp_path / "source"
    shutil.copytree(hf_source[0], source)
    settings = {**SETTINGS, "init": str(source), "data": str(corpus_file), "max_steps": 4, "save_interval": 2,
                "dropout": 0.1}
    straight = train(build_train_config(None, **{**settings, "out_dir": str(tmp_path / "straight")}),
                     show_progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(step: int) -> None:
        if step == 3:
            raise Crash

    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(build_train_config(None, **{**settings, "out_dir": str(run)}), on_step=crash_at_3, show_progress=False)
    assert latest_checkpoint(run).name == "step-00000002"
    shutil.rmtree(source)
    args = flags(max_steps=4, save_interval=2, dropout=0.1)
    code, out, err = run_cli(capsys, "train", *args, "--init", source, "--data", corpus_file, "--out-dir", run)
    assert code == 0, err
    assert "resuming at step 2" in err and "done: step 4" in out
    final = latest_checkpoint(run)
    assert (final / "model.safetensors").read_bytes() == (straight.final_checkpoint / "model.safetensors").read_bytes()
    assert json.loads((run / "config.json").read_text())["init"]["source"] == str(source)
    # the same config from Python (its model shape not filled in yet) finds the finished run as it is
    again = train(build_train_config(None, **{**settings, "out_dir": str(run)}), show_progress=False)
    assert again.step == 4 and again.final_checkpoint == final
    # a flag that contradicts the run is still refused
    code, _, err = run_cli(capsys, "train", *args, "--init", tmp_path / "elsewhere", "--data", corpus_file,
                           "--out-dir", run)
    assert_one_line_error(code, err, "--init")


def test_pocketlm_checkpoint_as_source_with_a_shorter_context(tmp_path, corpus_file, hf_source) -> None:
    """A pocketlm run folder as --init: its shape and tokenizer, its weights exactly, the position
    table cut to a shorter --block-size; progress, optimizer and schedule fresh."""
    model = from_hf_state_dict(hf_source[1].state_dict(), model_config_from_hf(hf_source[1].config))
    record = {"model": dataclasses.asdict(model.config), "train": {}}
    save_checkpoint(tmp_path / "first", 5, weights_state_dict(model), gpt2_tokenizer(), record, {})
    cfg = build_train_config(None, **{**SETTINGS, "init": str(tmp_path / "first"), "data": str(corpus_file),
                                      "max_steps": 1, "block_size": 32, "out_dir": str(tmp_path / "second")})
    run = open_run(cfg)
    assert run.cfg.model_config().block_size == 32 and run.cfg.model_config().n_embd == 32
    assert run.state.progress.step == 0 and run.resumed_from is None
    assert run.record["init"]["kind"] == "pocketlm" and "(step 5)" in run.record["init"]["description"]
    started = run.state.model.state_dict()
    for name, tensor in weights_state_dict(model).items():
        expected = tensor[:32] if name == "transformer.wpe.weight" else tensor
        assert torch.equal(started[name], expected), name
    assert torch.equal(started["lm_head.weight"], started["transformer.wte.weight"])


def test_hub_model_from_the_local_cache_offline(capsys, tmp_path, corpus_file, hf_source, monkeypatch) -> None:
    """`--init gpt2` through huggingface_hub's cache with the Hub offline: the snapshot's weights,
    and for OpenAI's GPT-2 family the built-in tokenizer (no tokenizer files needed)."""
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_source[0] / name, snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # default run folder: runs/from-gpt2 under it
    code, out, err = run_cli(capsys, "train", *flags(max_steps=1), "--init", "gpt2", "--data", corpus_file)
    assert code == 0, err
    run = tmp_path / "runs" / "from-gpt2"
    record = json.loads((run / "config.json").read_text())
    assert record["init"]["kind"] == "hub" and record["init"]["description"] == "Hub model gpt2 (revision 0123456789ab)"
    assert load_checkpoint(run).tokenizer.identity == gpt2_tokenizer().identity
    # hf: forces the Hub even with a local folder of that name
    (tmp_path / "distilgpt2").mkdir()
    code, _, err = run_cli(capsys, "train", *flags(max_steps=1), "--init", "hf:distilgpt2", "--data", corpus_file)
    assert_one_line_error(code, err, "--init hf:distilgpt2", "out of reach", "not in the local cache")


def test_hub_offline_or_unreachable_fails_fast_in_one_line(capsys, tmp_path, corpus_file, monkeypatch) -> None:
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still respected
    code, _, err = run_cli(capsys, "train", *flags(max_steps=1), "--init", "distilgpt2", "--data", corpus_file,
                           "--out-dir", tmp_path / "run")
    assert_one_line_error(code, err, "--init distilgpt2", "out of reach", "pass a local folder")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    began = time.perf_counter()
    code, _, err = run_cli(capsys, "train", *flags(max_steps=1), "--init", "someone/gpt2-finetuned", "--data",
                           corpus_file, "--out-dir", tmp_path / "run")
    assert time.perf_counter() - began < 10
    assert_one_line_error(code, err, "someone/gpt2-finetuned", "out of reach")
    assert not (tmp_path / "run").exists()


def test_untied_head_is_refused_in_one_line(capsys, tmp_path, corpus_file) -> None:
    save_hf_gpt2(tmp_path / "untied", tied=False)
    code, _, err = run_cli(capsys, "train", *flags(max_steps=1), "--init", tmp_path / "untied", "--data", corpus_file,
                           "--out-dir", tmp_path / "run")
    assert_one_line_error(code, err, "--init", "untied", "pocketlm ties them")
    assert latest_checkpoint(tmp_path / "run") is None


def test_source_errors_are_one_line(capsys, tmp_path, corpus_file, hf_source) -> None:
    folder = hf_source[0]
    base = ["train", *flags(max_steps=1), "--data", corpus_file, "--out-dir", tmp_path / "run"]
    save_hf_gpt2(tmp_path / "llama", model_type_override="llama")
    save_hf_gpt2(tmp_path / "small-vocab", vocab_size=1000)  # GPT-2's 50,257-token tokenizer beside it
    (tmp_path / "empty").mkdir()
    cases = [
        (["--init", tmp_path / "llama"], ["model_type 'llama'", "GPT-2"]),
        (["--init", folder, "--block-size", "128"], ["--block-size 128", f"{N_POSITIONS} positions"]),
        (["--init", folder, "--n-layer", "3"], ["--n-layer 3", "contradicts"]),
        (["--init", tmp_path / "small-vocab"], ["vocab_size 1000 is smaller than the tokenizer's 50257"]),
        (["--init", folder, "--tokenizer", folder], ["--tokenizer cannot be combined with --init"]),
        (["--init", tmp_path / "empty"], ["neither a pocketlm checkpoint", "nor a Hugging Face model folder"]),
        (["--init", "./no/such/folder"], ["no such file or folder"]),
        (["--init", folder / "config.json"], ["is a file"]),
    ]
    for extra, needles in cases:
        code, _, err = run_cli(capsys, *base, *extra)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_block_size_may_shrink_to_fit_the_source(tmp_path, corpus_file, hf_source) -> None:
    cfg = build_train_config(None, **{**SETTINGS, "init": str(hf_source[0]), "data": str(corpus_file),
                                      "block_size": 16, "out_dir": str(tmp_path / "run")})
    run = open_run(cfg)
    assert torch.equal(run.state.model.transformer.wpe.weight,
                       hf_source[1].transformer.wpe.weight[:16])
