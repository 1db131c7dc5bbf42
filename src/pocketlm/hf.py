"""Weight conversion between pocketlm's ``GPT`` and Hugging Face ``GPT2LMHeadModel``.

The parameter names are identical (see model.py). The only difference is the storage of the
four projection matrices: pocketlm uses ``nn.Linear`` (out, in) and Hugging Face uses its
``Conv1D`` (in, out), so those are transposed. ``transformers`` is imported lazily: only
``hf_config`` and ``to_hf_model`` need it; reading a GPT-2 folder (``pocketlm train --init``) and
writing one (``pocketlm export``) work on plain ``config.json`` dicts and state dicts.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

import torch

from pocketlm.config import ModelConfig
from pocketlm.errors import CheckpointError, ConfigError
from pocketlm.model import GPT

if TYPE_CHECKING:  # pragma: no cover
    import transformers

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers (causal masks) that older transformers versions keep in the state dict.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
TIED_KEY = "lm_head.weight"
WTE_KEY = "transformer.wte.weight"
WPE_KEY = "transformer.wpe.weight"
BASE_PREFIX = "transformer."
# GPT2Config's defaults for the keys a config.json may leave out (transformers fills them in the same way).
GPT2_DEFAULTS: dict[str, Any] = {"activation_function": "gelu_new", "n_inner": None, "layer_norm_epsilon": 1e-5,
                                 "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                                 "tie_word_embeddings": True}


def _convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor.clone()


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """A state dict that ``GPT2LMHeadModel.load_state_dict`` accepts (tied ``lm_head`` included)."""
    return {name: _convert(name, t) for name, t in model.state_dict().items()}


def _model_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a pocketlm model's tensors, the tied ``lm_head`` left out (built on the meta
    device: no memory, no initialisation)."""
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name != TIED_KEY}


def weights_from_hf(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, *,
                    tied: bool = True) -> dict[str, torch.Tensor]:
    """pocketlm weights (fp32, the names ``checkpoint.weights_state_dict`` uses: the tied output layer
    left out) from a Hugging Face GPT-2 state dict, checked against ``config`` in one-line errors.

    Accepts the names of ``GPT2LMHeadModel`` and of older files that store the base model's names
    (``h.0.attn...`` without ``transformer.``), drops the causal-mask buffers older versions saved,
    and keeps the first ``block_size`` rows of a longer position table. pocketlm ties its output
    layer to the token embedding, so an ``lm_head`` that differs from it is refused, as is an untied
    model (``tied=False``, from ``tie_word_embeddings``) whose ``lm_head`` is not in the file."""
    sd: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith(HF_BUFFERS):
            continue
        full = name if name.startswith(BASE_PREFIX) or name == TIED_KEY else BASE_PREFIX + name
        sd[full] = _convert(full, tensor).float() if tensor.is_floating_point() else _convert(full, tensor)
    head = sd.pop(TIED_KEY, None)
    if head is None and not tied:
        raise CheckpointError("the Hugging Face model's output layer (lm_head) is not tied to its token embedding "
                              "and is missing from its weights; pocketlm ties them, so it cannot use this model")
    if head is not None and WTE_KEY in sd and not torch.equal(head, sd[WTE_KEY]):
        raise CheckpointError("Hugging Face lm_head.weight differs from transformer.wte.weight (an untied output "
                              "layer); pocketlm ties them, so it cannot start from these weights")
    wpe = sd.get(WPE_KEY)
    if wpe is not None and wpe.size(0) > config.block_size:  # e.g. GPT-2's 1024 positions into a 512 context
        sd[WPE_KEY] = wpe[:config.block_size].clone()
    shapes = _model_shapes(config)
    missing, extra = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"Hugging Face weights do not fit this model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    wrong = [n for n, shape in shapes.items() if tuple(sd[n].shape) != shape]
    if wrong:
        raise CheckpointError(f"Hugging Face weights do not fit this model: shape of {wrong[0]} is "
                              f"{tuple(sd[wrong[0]].shape)}, expected {shapes[wrong[0]]}")
    return sd


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> GPT:
    """A pocketlm ``GPT`` (eval mode, on the CPU) holding the weights of a Hugging Face GPT-2 state dict."""
    model = GPT(config)
    model.load_state_dict(weights_from_hf(state_dict, config), strict=False)  # the tied lm_head is wte
    return model.eval()


def hf_config_dict(config: ModelConfig, eot_id: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The ``config.json`` of a ``GPT2LMHeadModel`` of the same shape (tanh GELU, same context and
    dropouts, tied output layer), as a plain dict. ``eot_id``: the ``<|endoftext|>`` id, GPT-2's
    beginning and end of text (default: the last id, where GPT-2 keeps it)."""
    eot = config.vocab_size - 1 if eot_id is None else eot_id
    values: dict[str, Any] = dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2",
        vocab_size=config.vocab_size, n_positions=config.block_size, n_ctx=config.block_size,
        n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.n_embd,
        activation_function="gelu_new", layer_norm_epsilon=config.layer_norm_eps,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.attn_dropout,
        initializer_range=0.02, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, use_cache=True,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True)
    values.update(overrides)
    return values


def hf_config(config: ModelConfig, **overrides: Any) -> "transformers.GPT2Config":
    """The ``transformers.GPT2Config`` of the same shape (tanh GELU, same context and dropouts)."""
    import transformers

    values = hf_config_dict(config, **overrides)
    del values["architectures"], values["model_type"]  # GPT2Config knows its own
    return transformers.GPT2Config(**values)


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


def _get(hf_cfg: Any, name: str) -> Any:
    """A GPT2Config attribute, or a config.json key (with GPT2Config's default when left out)."""
    if isinstance(hf_cfg, Mapping):
        return hf_cfg.get(name, GPT2_DEFAULTS.get(name))
    return getattr(hf_cfg, name, GPT2_DEFAULTS.get(name))


def model_config_from_hf(hf_cfg: Any, block_size: int | None = None) -> ModelConfig:
    """The pocketlm ``ModelConfig`` matching a ``GPT2Config`` or a GPT-2 ``config.json`` dict. Only
    GPT-2s that compute what pocketlm computes convert: gelu_new, a 4x MLP, attention scaled by
    1/sqrt(head size) alone; anything else is a one-line ``CheckpointError``.

    ``block_size`` may be smaller than ``n_positions``: ``weights_from_hf`` keeps the first rows."""
    model_type = _get(hf_cfg, "model_type")
    if model_type not in (None, "gpt2"):
        raise CheckpointError(f"model_type {model_type!r} is not GPT-2 ('gpt2', GPT2LMHeadModel), the only "
                              "architecture pocketlm can load")
    activation = _get(hf_cfg, "activation_function")
    if activation != "gelu_new":
        raise CheckpointError(f"activation {activation!r} is not GPT-2's gelu_new")
    n_embd = _get(hf_cfg, "n_embd")
    n_inner = _get(hf_cfg, "n_inner")
    if n_inner not in (None, 4 * n_embd):
        raise CheckpointError(f"n_inner {n_inner} is not 4 * n_embd")
    if not _get(hf_cfg, "scale_attn_weights") or _get(hf_cfg, "scale_attn_by_inverse_layer_idx"):
        raise CheckpointError("attention scaled otherwise than GPT-2's (scale_attn_weights / "
                              "scale_attn_by_inverse_layer_idx) is not implemented in pocketlm")
    try:
        return dataclasses.replace(
            ModelConfig(), n_layer=_get(hf_cfg, "n_layer"), n_head=_get(hf_cfg, "n_head"), n_embd=n_embd,
            block_size=block_size or _get(hf_cfg, "n_positions"), vocab_size=_get(hf_cfg, "vocab_size"),
            dropout=float(_get(hf_cfg, "resid_pdrop")), attn_dropout=float(_get(hf_cfg, "attn_pdrop")),
            layer_norm_eps=_get(hf_cfg, "layer_norm_epsilon"))
    except (TypeError, ValueError, ConfigError) as exc:  # a key missing (None) or of the wrong kind
        raise CheckpointError(f"the config does not describe a GPT-2 ({exc})") from None
