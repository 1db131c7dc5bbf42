"""`pocketlm export`: a Hugging Face folder that transformers loads alone; a padded vocabulary that
neither pocketlm nor transformers ever generates; refusals in one line; the Hub upload's wiring."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pocketlm.checkpoint import save_checkpoint, weights_state_dict
from pocketlm.config import ModelConfig, build_train_config
from pocketlm.generate import Generator
from pocketlm.hf import model_config_from_hf
from pocketlm.model import GPT
from pocketlm.tokenizer import Tokenizer, gpt2_tokenizer, train_bpe
from pocketlm.train import open_run
from test_cli import assert_one_line_error, run_cli

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS, ROWS = 300, 320  # a 300-token BPE in a table padded to a multiple of 64


@pytest.fixture(scope="module")
def bpe300(wiki_articles: list[str]) -> Tokenizer:
    return train_bpe(wiki_articles[:6], TOKENS)


def save_model(out_dir: Path, model: GPT, tokenizer: Tokenizer, step: int = 7) -> Path:
    config = {"model": dataclasses.asdict(model.config), "train": {"dataset": {"data": "corpus.txt"}}}
    return save_checkpoint(out_dir, step, weights_state_dict(model), tokenizer, config, {}, val_loss=3.25)


def rigged_padded_model() -> GPT:
    """A model whose padding rows (ids 300-319, no token at all) hold by far the largest logits: a
    decoder that does not rule them out picks them at every step."""
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=ROWS, dropout=0.0)
    model = GPT(config).eval()
    direction = torch.randn(config.n_embd)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)  # every position's final hidden state is `direction`
        model.transformer.wte.weight[TOKENS:] = 20 * direction / direction.norm() ** 2
        model.transformer.wte.weight[:TOKENS].normal_(0.0, 0.02)
    return model


def test_padded_vocabulary_is_never_generated(capsys, tmp_path, bpe300) -> None:
    model = rigged_padded_model()
    prompt = "The game"
    ids = torch.tensor([bpe300.encode(prompt)])
    with torch.no_grad():
        assert int(model(ids)[0, -1].argmax()) >= TOKENS  # the rigging works: unmasked, padding wins
    ours = Generator(model, bpe300, "cpu")
    for sample in ours.generate(prompt, max_new_tokens=12, temperature=0) + \
            ours.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=0, seed=1, num_samples=4):
        assert sample.token_ids and max(sample.token_ids) < TOKENS

    save_model(tmp_path / "run", model, bpe300)
    code, out, err = run_cli(capsys, "export", tmp_path / "run", tmp_path / "hf")
    assert code == 0, err
    assert f"vocabulary {TOKENS}" in out and f"{ROWS} embedding rows" in out
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(TOKENS, ROWS))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == ROWS and len(hf_tok) == TOKENS
    with torch.no_grad():
        greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=bpe300.eot_id)[0, ids.size(1):]
        sampled = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True, top_k=0,
                              pad_token_id=bpe300.eot_id)[0, ids.size(1):]
    assert max(greedy.tolist()) < TOKENS and max(sampled.tolist()) < TOKENS
    assert greedy.tolist()[:len(ours.generate(prompt, max_new_tokens=12, temperature=0)[0].token_ids)] == \
        ours.generate(prompt, max_new_tokens=12, temperature=0)[0].token_ids
    hf_tok.decode(greedy)  # decodable text


def test_export_round_trips_through_init(capsys, tmp_path, bpe300, corpus_file) -> None:
    """pocketlm -> Hugging Face folder -> pocketlm (--init) gives back the same model, padded
    vocabulary and tokenizer included; the config.json is a GPT-2 config of the same shape."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=ROWS, dropout=0.1,
                            layer_norm_eps=1e-6)).eval()
    save_model(tmp_path / "run", model, bpe300)
    code, _, err = run_cli(capsys, "export", tmp_path / "run", tmp_path / "hf")
    assert code == 0, err
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["architectures"] == ["GPT2LMHeadModel"] and raw["eos_token_id"] == raw["bos_token_id"] == bpe300.eot_id
    assert model_config_from_hf(raw) == model.config
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and "7 optimizer steps; validation loss 3.2500" in card
    cfg = build_train_config(None, preset="tiny", init=str(tmp_path / "hf"), data=str(corpus_file),
                             out_dir=str(tmp_path / "again"), device="cpu", precision="fp32", compile=False)
    run = open_run(cfg)
    assert run.cfg.model_config() == dataclasses.replace(model.config, dropout=0.1, layer_norm_eps=1e-6)
    assert run.tokenizer.encode("The game began") == bpe300.encode("The game began")
    for name, tensor in model.state_dict().items():
        assert torch.equal(run.state.model.state_dict()[name], tensor), name


def test_export_refusals_are_one_line_and_write_nothing(capsys, tmp_path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257, dropout=0.0))
    save_model(tmp_path / "good", model, gpt2_tokenizer())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", tmp_path / "good", tmp_path / "taken")
    assert_one_line_error(code, err, "already exists and is not an empty folder")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]

    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_model(tmp_path / "nan", model, gpt2_tokenizer())
    code, _, err = run_cli(capsys, "export", tmp_path / "nan", tmp_path / "out")
    assert_one_line_error(code, err, "not finite")
    code, _, err = run_cli(capsys, "export", tmp_path / "nowhere", tmp_path / "out")
    assert_one_line_error(code, err, "not found")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]

    (tmp_path / "empty").mkdir()  # an empty folder made for the export is fine
    code, _, err = run_cli(capsys, "export", tmp_path / "good", tmp_path / "empty")
    assert code == 0, err
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_push_to_hub_uploads_the_exported_folder(capsys, tmp_path, monkeypatch) -> None:
    """The upload's wiring, against a stand-in for huggingface_hub's HfApi (no network in tests)."""
    import huggingface_hub
    from huggingface_hub import constants

    import pocketlm.data

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            assert (Path(kwargs["folder_path"]) / "model.safetensors").is_file()

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257, dropout=0.0))
    save_model(tmp_path / "run", model, gpt2_tokenizer())
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pocketlm.data, "hub_reachable", lambda timeout=3.0: True)
    code, out, err = run_cli(capsys, "export", tmp_path / "run", tmp_path / "hf", "--push-to-hub", "me/tiny")
    assert code == 0, err
    assert [c[:2] for c in calls] == [("create_repo", "me/tiny"), ("upload_folder", "me/tiny")]
    assert calls[0][2]["exist_ok"] is True and calls[1][2]["folder_path"] == str(tmp_path / "hf")
    assert "pushed to https://huggingface.co/me/tiny" in out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "export", tmp_path / "run", tmp_path / "hf2", "--push-to-hub", "me/tiny")
    assert_one_line_error(code, err, "cannot push to me/tiny", "out of reach", "export in")
    assert (tmp_path / "hf2" / "model.safetensors").is_file()  # the export itself is complete
