"""Weight conversion between pocketlm's ``GPT`` and Hugging Face ``GPT2LMHeadModel``.

The parameter names are identical (see model.py). The only difference is the storage of the
four projection matrices: pocketlm uses ``nn.Linear`` (out, in) and Hugging Face uses its
``Conv1D`` (in, out), so those are transposed. ``transformers`` is imported lazily: only
``hf_config`` and ``to_hf_model`` need it.

This is what the generation benchmark needs to run both implementations on the same weights;
a user-facing export/import command can build on it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from pocketlm.config import ModelConfig
from pocketlm.errors import CheckpointError
from pocketlm.model import GPT

if TYPE_CHECKING:  # pragma: no cover
    import transformers

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers (causal masks) that older transformers versions keep in the state dict.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
TIED_KEY = "lm_head.weight"


def _convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor.clone()


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """A state dict that ``GPT2LMHeadModel.load_state_dict`` accepts (tied ``lm_head`` included)."""
    return {name: _convert(name, t) for name, t in model.state_dict().items()}


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> GPT:
    """A pocketlm ``GPT`` (eval mode, on the CPU) holding the weights of a Hugging Face GPT-2 state dict."""
    sd = {name: _convert(name, t) for name, t in state_dict.items() if not name.endswith(HF_BUFFERS)}
    sd.setdefault(TIED_KEY, sd.get("transformer.wte.weight"))  # tied: some exports leave it out
    wpe = sd.get("transformer.wpe.weight")
    if wpe is not None and wpe.size(0) > config.block_size:  # e.g. GPT-2's 1024 positions into a 512 context
        sd["transformer.wpe.weight"] = wpe[:config.block_size].clone()
    model = GPT(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise CheckpointError(f"Hugging Face weights do not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    wrong = [n for n, t in model.state_dict().items() if tuple(sd[n].shape) != tuple(t.shape)]
    if wrong:
        raise CheckpointError(f"Hugging Face weights do not fit this model: shape of {wrong[0]} is "
                              f"{tuple(sd[wrong[0]].shape)}, expected {tuple(model.state_dict()[wrong[0]].shape)}")
    if TIED_KEY in state_dict and not torch.equal(state_dict[TIED_KEY], state_dict["transformer.wte.weight"]):
        raise CheckpointError("Hugging Face lm_head.weight differs from transformer.wte.weight; pocketlm ties them")
    model.load_state_dict(sd)
    return model.eval()


def hf_config(config: ModelConfig, **overrides: Any) -> "transformers.GPT2Config":
    """The ``transformers.GPT2Config`` of the same shape (tanh GELU, same context and dropouts)."""
    import transformers

    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_ctx=config.block_size,
        n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.n_embd,
        activation_function="gelu_new", layer_norm_epsilon=config.layer_norm_eps,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.attn_dropout,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1, tie_word_embeddings=True)
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


def to_hf_model(model: GPT, **config_overrides: Any) -> "transformers.GPT2LMHeadModel":
    """A ``GPT2LMHeadModel`` (eval mode, fp32, same device) with exactly this model's weights."""
    import transformers

    hf = transformers.GPT2LMHeadModel(hf_config(model.config, **config_overrides))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [n for n in missing if not n.endswith(HF_BUFFERS)]
    if missing or unexpected:  # pragma: no cover - a transformers version with other names
        raise CheckpointError(f"cannot load into GPT2LMHeadModel (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf.tie_weights()
    return hf.to(model.lm_head.weight.device).eval()


def model_config_from_hf(hf_cfg: Any, block_size: int | None = None) -> ModelConfig:
    """The pocketlm ``ModelConfig`` matching a ``GPT2Config`` (only gelu_new GPT-2s convert exactly).

    ``block_size`` may be smaller than ``n_positions``: ``from_hf_state_dict`` keeps the first rows."""
    if getattr(hf_cfg, "activation_function", "gelu_new") != "gelu_new":
        raise CheckpointError(f"activation {hf_cfg.activation_function!r} is not GPT-2's gelu_new")
    n_inner = getattr(hf_cfg, "n_inner", None)
    if n_inner not in (None, 4 * hf_cfg.n_embd):
        raise CheckpointError(f"n_inner {n_inner} is not 4 * n_embd")
    return dataclasses.replace(
        ModelConfig(), n_layer=hf_cfg.n_layer, n_head=hf_cfg.n_head, n_embd=hf_cfg.n_embd,
        block_size=block_size or hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size,
        dropout=float(hf_cfg.resid_pdrop), attn_dropout=float(hf_cfg.attn_pdrop),
        layer_norm_eps=hf_cfg.layer_norm_epsilon)
