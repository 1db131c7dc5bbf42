"""Weight conversion to and from Hugging Face GPT2LMHeadModel: round trip, logits and greedy parity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pocketlm.config import ModelConfig
from pocketlm.errors import CheckpointError
from pocketlm.hf import (CONV1D_WEIGHTS, from_hf_state_dict, hf_config, model_config_from_hf, to_hf_model,
                         to_hf_state_dict)
from pocketlm.model import GPT

transformers = pytest.importorskip("transformers")

CONFIG = ModelConfig(n_layer=3, n_head=4, n_embd=32, block_size=32, vocab_size=101, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_model(config: ModelConfig = CONFIG, seed: int = 0) -> GPT:
    """Every parameter random (LayerNorm gains and biases too), so a wrong mapping shows."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def ids(*shape: int, vocab: int = CONFIG.vocab_size, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_state_dict_names_and_layouts() -> None:
    model = random_model()
    sd = to_hf_state_dict(model)
    hf = transformers.GPT2LMHeadModel(hf_config(CONFIG))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items() if k in hf_shapes} == hf_shapes
    assert set(hf_shapes) <= set(sd)
    for name, tensor in model.state_dict().items():
        if name.endswith(CONV1D_WEIGHTS):
            assert torch.equal(sd[name], tensor.t())  # Conv1D stores (in, out)
        else:
            assert torch.equal(sd[name], tensor)


def test_round_trip_gives_back_the_same_weights() -> None:
    model = random_model()
    back = from_hf_state_dict(to_hf_state_dict(model), CONFIG)
    original = model.state_dict()
    assert set(back.state_dict()) == set(original)
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert back.lm_head.weight is back.transformer.wte.weight  # still tied


def test_hf_config_matches_the_model_config() -> None:
    c = dataclasses.replace(CONFIG, dropout=0.1, attn_dropout=0.05, layer_norm_eps=1e-6)
    hc = hf_config(c)
    assert (hc.n_layer, hc.n_head, hc.n_embd, hc.n_positions, hc.vocab_size) == (3, 4, 32, 32, 101)
    assert hc.activation_function == "gelu_new" and hc.layer_norm_epsilon == 1e-6
    assert hc.resid_pdrop == hc.embd_pdrop == 0.1 and hc.attn_pdrop == 0.05
    assert model_config_from_hf(hc) == c


@torch.no_grad()
def test_logits_match_hugging_face() -> None:
    model = random_model()
    hf = to_hf_model(model)
    x = ids(2, CONFIG.block_size, seed=3)
    torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)
    # And the other direction: HF's own (randomised) weights into a pocketlm model.
    for p in hf.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
    ours = from_hf_state_dict(hf.state_dict(), CONFIG)
    torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_hugging_face_generate(tokenizer) -> None:
    from pocketlm.generate import Generator

    config = dataclasses.replace(CONFIG, vocab_size=tokenizer.vocab_size, n_layer=2)
    model = random_model(config, seed=4)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 1.0)  # well-separated logits
    hf = to_hf_model(model)
    prompt = "The history of the world"
    prompt_ids = torch.tensor([tokenizer.encode(prompt)])
    n_new = 20
    expected = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                           max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tokenizer.eot_id)
    ours = Generator(model, tokenizer, "cpu").generate(prompt, max_new_tokens=n_new, temperature=0)[0]
    assert ours.token_ids == expected[0, prompt_ids.size(1):].tolist()


def test_longer_hf_position_table_is_cut_to_the_context() -> None:
    long_cfg = dataclasses.replace(CONFIG, block_size=64)
    sd = to_hf_state_dict(random_model(long_cfg))
    model = from_hf_state_dict(sd, CONFIG)
    assert torch.equal(model.transformer.wpe.weight, sd["transformer.wpe.weight"][:CONFIG.block_size])


def test_weights_that_do_not_fit_raise_one_line_errors() -> None:
    sd = to_hf_state_dict(random_model())
    with pytest.raises(CheckpointError, match="shape of"):
        from_hf_state_dict(sd, dataclasses.replace(CONFIG, n_embd=64, n_head=4))
    del sd["transformer.ln_f.bias"]
    with pytest.raises(CheckpointError, match="missing"):
        from_hf_state_dict(sd, CONFIG)
    sd = to_hf_state_dict(random_model())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="ties"):
        from_hf_state_dict(sd, CONFIG)


# --------------------------------------------------------------------------------------------
# config.json dicts and the state dicts of files on disk (pocketlm train --init, pocketlm export)


def test_config_json_dict_round_trip_and_refusals() -> None:
    from pocketlm.hf import hf_config_dict

    raw = hf_config_dict(CONFIG, eot_id=7)
    assert raw["architectures"] == ["GPT2LMHeadModel"] and raw["bos_token_id"] == raw["eos_token_id"] == 7
    assert model_config_from_hf(raw) == CONFIG
    assert transformers.GPT2Config(**raw).n_positions == CONFIG.block_size
    # keys a config.json may leave out take GPT2Config's defaults
    minimal = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 99}
    assert model_config_from_hf(minimal) == ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=99,
                                                        dropout=0.1, attn_dropout=0.1, layer_norm_eps=1e-5)
    for change, needle in [({"model_type": "llama"}, "model_type 'llama'"), ({"activation_function": "relu"}, "gelu_new"),
                           ({"n_inner": 100}, "n_inner"), ({"scale_attn_by_inverse_layer_idx": True}, "scaled"),
                           ({"n_layer": None}, "does not describe a GPT-2")]:
        with pytest.raises(CheckpointError, match=needle):
            model_config_from_hf({**minimal, **change})


def test_weights_from_files_with_base_model_names_and_mask_buffers() -> None:
    """OpenAI's original GPT-2 files name the base model's tensors without ``transformer.`` and
    carry causal-mask buffers; fp16 files are read as fp32."""
    from pocketlm.hf import weights_from_hf

    model = random_model()
    sd = {name.removeprefix("transformer."): t.half() for name, t in to_hf_state_dict(model).items()
          if name != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    sd["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    weights = weights_from_hf(sd, CONFIG)
    assert set(weights) == set(model.state_dict()) - {"lm_head.weight"}
    assert all(t.dtype == torch.float32 for t in weights.values())
    torch.testing.assert_close(weights["transformer.h.1.mlp.c_fc.weight"],
                               model.transformer.h[1].mlp.c_fc.weight.detach().half().float())


def test_tied_and_untied_heads() -> None:
    from pocketlm.hf import weights_from_hf

    sd = to_hf_state_dict(random_model())
    assert "lm_head.weight" not in weights_from_hf(sd, CONFIG)  # tied and stored: fine, stored once
    # declared untied but equal to the embedding: the same function, accepted
    assert set(weights_from_hf(sd, CONFIG, tied=False)) == set(weights_from_hf(sd, CONFIG))
    untied = {**sd, "lm_head.weight": sd["lm_head.weight"] + 0.5}
    with pytest.raises(CheckpointError, match="untied"):
        weights_from_hf(untied, CONFIG, tied=False)
    no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match="not tied .* missing"):
        weights_from_hf(no_head, CONFIG, tied=False)
