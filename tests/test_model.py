"""GPT model: size, masking (causal, padding, packed documents, KV cache), init, loss, HF parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pocketlm.config import PRESETS, ModelConfig
from pocketlm.losses import IGNORE_INDEX, NextTokenLoss, token_nll_sum
from pocketlm.model import GPT
from pocketlm.optim import decay_groups
from pocketlm.parallelize import apply_activation_checkpointing, apply_embedding_grad_fusion, embed_tokens

# Small enough that every forward pass takes milliseconds on a CPU.
SMALL = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=101, dropout=0.0)
ATOL = 1e-5


def make_model(config: ModelConfig = SMALL, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def random_ids(*shape: int, vocab: int = SMALL.vocab_size, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="module")
def gpt2_125m() -> GPT:
    """Built once for the whole module (about a second and 500 MB)."""
    torch.manual_seed(0)
    return GPT(PRESETS["gpt2-125m"])


# ---------------------------------------------------------------------------------------------
# Size and shapes


def test_gpt2_125m_parameter_count(gpt2_125m: GPT) -> None:
    n = gpt2_125m.num_parameters()
    assert n == 124_046_592  # GPT-2 small (124,439,808) less 512 of its 1024 position rows
    assert 123_000_000 <= n <= 125_000_000


def test_tiny_preset_is_a_few_million_parameters() -> None:
    model = GPT(PRESETS["tiny"])
    assert 1_000_000 < model.num_parameters() < 10_000_000


def test_num_parameters_counts_tied_embedding_once(model: GPT) -> None:
    c = SMALL
    per_block = (2 * 2 * c.n_embd  # two LayerNorms
                 + c.n_embd * 3 * c.n_embd + 3 * c.n_embd  # c_attn
                 + c.n_embd * c.n_embd + c.n_embd  # attn.c_proj
                 + c.n_embd * 4 * c.n_embd + 4 * c.n_embd  # c_fc
                 + 4 * c.n_embd * c.n_embd + c.n_embd)  # mlp.c_proj
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert model.num_parameters() == expected


def test_output_shapes(model: GPT) -> None:
    idx = random_ids(3, 11)
    logits = model(idx)
    assert logits.shape == (3, 11, SMALL.vocab_size)
    assert logits.dtype == torch.float32
    assert model.hidden_states(idx).shape == (3, 11, SMALL.n_embd)


def test_longer_than_context_is_rejected(model: GPT) -> None:
    with pytest.raises(ValueError, match="exceeds the context"):
        model(random_ids(1, SMALL.block_size + 1))


# ---------------------------------------------------------------------------------------------
# Masking


@torch.no_grad()
def test_causality_later_tokens_never_change_earlier_logits(model: GPT) -> None:
    T = SMALL.block_size
    idx = random_ids(2, T)
    base = model(idx)
    for t in (0, 5, T // 2, T - 1):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(T - t)) % SMALL.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=ATOL, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-3)  # the change itself shows


@torch.no_grad()
def test_right_padding_does_not_change_real_logits(model: GPT) -> None:
    lengths = [7, 19, 32]
    seqs = [random_ids(n, seed=10 + n) for n in lengths]
    pad_id = 3
    batch = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        batch[r, :len(s)] = s
    batched = model(batch)
    for r, s in enumerate(seqs):
        alone = model(s[None])
        torch.testing.assert_close(batched[r, :len(s)], alone[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_segment_ids_isolate_packed_documents(model: GPT) -> None:
    a, b = random_ids(13, seed=21), random_ids(19, seed=22)
    row = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(13), torch.arange(19)])[None]
    segment_ids = torch.cat([torch.zeros(13), torch.ones(19)]).long()[None]
    packed = model(row, position_ids=position_ids, segment_ids=segment_ids)
    torch.testing.assert_close(packed[0, :13], model(a[None])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[0, 13:], model(b[None])[0], atol=ATOL, rtol=0)
    # Without the segment mask the second document would see the first one.
    leaky = model(row, position_ids=position_ids)
    assert not torch.allclose(leaky[0, 13:], model(b[None])[0], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# KV cache


@torch.no_grad()
def test_kv_cache_incremental_decoding_matches_full_recompute(model: GPT) -> None:
    idx = random_ids(2, 24, seed=5)
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    prefill = 9
    steps = [model(idx[:, :prefill], kv_cache=cache)]
    assert cache.length == prefill
    for t in range(prefill, idx.size(1)):
        steps.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.length == idx.size(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_chunked_prefill_matches_full_recompute(model: GPT) -> None:
    idx = random_ids(1, 20, seed=6)
    cache = model.new_kv_cache(batch_size=1, max_len=20)
    chunks = [model(idx[:, a:b], kv_cache=cache) for a, b in ((0, 6), (6, 13), (13, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx), atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_left_padded_batch_matches_each_row_alone(model: GPT) -> None:
    prompts = [random_ids(n, seed=30 + n) for n in (4, 9, 6)]
    continuation = random_ids(len(prompts), 5, seed=40)  # tokens fed one at a time after the prompt
    B, P = len(prompts), max(len(p) for p in prompts)
    pads = [P - len(p) for p in prompts]
    batch = torch.zeros(B, P, dtype=torch.long)  # left padding with id 0
    for r, p in enumerate(prompts):
        batch[r, pads[r]:] = p
    pad_t = torch.tensor(pads)[:, None]
    cache = model.new_kv_cache(batch_size=B, max_len=P + continuation.size(1))
    for r, n in enumerate(pads):
        cache.key_valid[r, :n] = False
    position_ids = (torch.arange(P)[None] - pad_t).clamp(min=0)
    outputs = [model(batch, position_ids=position_ids, kv_cache=cache)]
    for t in range(continuation.size(1)):
        outputs.append(model(continuation[:, t:t + 1], position_ids=P + t - pad_t, kv_cache=cache))
    logits = torch.cat(outputs, dim=1)
    for r, p in enumerate(prompts):
        alone = model(torch.cat([p, continuation[r]])[None])[0]
        torch.testing.assert_close(logits[r, pads[r]:], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def test_overflowing_a_short_kv_cache_is_a_clear_error(model: GPT) -> None:
    cache = model.new_kv_cache(batch_size=1, max_len=8)
    model(random_ids(1, 6), kv_cache=cache)
    with pytest.raises(ValueError):
        model(random_ids(1, 4), kv_cache=cache)


# ---------------------------------------------------------------------------------------------
# Weights and optimizer groups


def test_embeddings_are_tied(model: GPT) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_init(gpt2_125m: GPT) -> None:
    n_layer = gpt2_125m.config.n_layer
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    seen = 0
    for name, p in gpt2_125m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.03), name
            seen += 1
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.03), name
        elif name.endswith("bias") and "ln_" not in name:
            assert torch.count_nonzero(p) == 0, name
    assert seen == 2 * n_layer


def test_decay_groups_split_by_dimension(model: GPT) -> None:
    decay, no_decay = decay_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    params = dict(model.named_parameters())  # the tied embedding appears once
    by_id = {id(p): n for n, p in params.items()}
    decay_names = {by_id[id(p)] for p in decay["params"]}
    no_decay_names = {by_id[id(p)] for p in no_decay["params"]}
    assert decay_names == {n for n, p in params.items() if p.dim() >= 2}
    assert no_decay_names == {n for n, p in params.items() if p.dim() < 2}
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    assert "transformer.wte.weight" in decay_names and "transformer.wpe.weight" in decay_names
    assert all(n.endswith("bias") or ".ln_" in n or "ln_f" in n for n in no_decay_names)


# ---------------------------------------------------------------------------------------------
# Loss


def test_token_nll_sum_ignores_ignore_index() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    targets[0, 3:] = IGNORE_INDEX
    targets[1, 0] = IGNORE_INDEX
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    expected = -logp[keep].gather(1, targets[keep][:, None]).sum()
    got = token_nll_sum(logits, targets)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    # Changing logits at ignored positions changes nothing.
    logits2 = logits.clone()
    logits2[~keep] += 100 * torch.randn(int((~keep).sum()), 7, generator=g)
    torch.testing.assert_close(token_nll_sum(logits2, targets), got)


def test_token_nll_sum_accepts_sliced_fp32_logits() -> None:
    logits = torch.randn(2, 6, 7)
    targets = torch.randint(0, 7, (2, 6))
    expected = token_nll_sum(logits[:, :-1].contiguous(), targets[:, 1:])
    torch.testing.assert_close(token_nll_sum(logits[:, :-1], targets[:, 1:]), expected)


def test_token_nll_sum_is_fp32_for_half_logits() -> None:
    logits = torch.randn(1, 4, 9).to(torch.bfloat16)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 3]])
    assert token_nll_sum(logits, targets).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Activation checkpointing changes memory, never results


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointing_modes_give_identical_loss_and_gradients(precision) -> None:
    import contextlib

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=97, dropout=0.1)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode, full in (("none", 0), ("selective", 0), ("selective", 2), ("full", 0)):
        torch.manual_seed(0)
        model = GPT(cfg).train()
        apply_activation_checkpointing(model, mode, full)
        torch.manual_seed(1)  # same dropout masks in every mode
        ctx = torch.autocast("cpu", torch.bfloat16, cache_enabled=False) if precision == "bf16" \
            else contextlib.nullcontext()
        with ctx:
            loss = NextTokenLoss(model)(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results[(mode, full)] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_loss, ref_grads = results[("none", 0)]
    for key, (loss, grads) in results.items():
        assert torch.equal(loss, ref_loss), key
        for name, grad in grads.items():
            assert torch.equal(grad, ref_grads[name]), (key, name)


def test_checkpointing_is_inactive_in_eval_and_with_a_cache() -> None:
    from pocketlm.parallelize import block_modes

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, dropout=0.0)
    model = GPT(cfg)
    reference = GPT(cfg)
    reference.load_state_dict(model.state_dict())
    apply_activation_checkpointing(model, "full")
    assert block_modes(2, "full", 0) == ["full", "full"] and block_modes(3, "selective", 2) == ["full", "full", "selective"]
    assert set(model.state_dict()) == set(reference.state_dict())  # parameter names are unchanged
    idx = torch.randint(0, 97, (1, 8))
    model.eval()
    with torch.no_grad():
        cached = model(idx, kv_cache=model.new_kv_cache(1))
    torch.testing.assert_close(cached, model(idx))
    torch.testing.assert_close(model(idx), reference.eval()(idx))
    with pytest.raises(ValueError):
        apply_activation_checkpointing(model, "sometimes")


def test_token_embedding_gradient_goes_straight_into_grad():
    """The fused lookup adds each row's gradient into weight.grad (repeated ids summed, an existing
    gradient kept), exactly what autograd's dense embedding gradient would add."""
    torch.manual_seed(0)
    weight = torch.randn(50, 8, requires_grad=True)
    idx = torch.tensor([[3, 7, 3, 3], [0, 49, 7, 1]])  # repeats on purpose
    upstream = torch.randn(2, 4, 8)
    expected = torch.autograd.grad(F.embedding(idx, weight), weight, upstream)[0]
    (embed_tokens(idx, weight) * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, expected)
    (embed_tokens(idx, weight) * upstream).sum().backward()  # accumulates like autograd
    torch.testing.assert_close(weight.grad, 2 * expected)
    with torch.no_grad():
        assert torch.equal(embed_tokens(idx, weight), F.embedding(idx, weight))


def test_tied_weight_gradient_equals_unfused_autograd():
    """Both fusions (output layer and embedding) write the tied weight's .grad; together they
    must equal what plain autograd computes with neither."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300, dropout=0.0)
    fused = GPT(cfg)
    plain = GPT(cfg)
    plain.load_state_dict(fused.state_dict())
    apply_embedding_grad_fusion(fused)
    assert fused.lm_head.weight is fused.transformer.wte.weight  # still tied
    idx, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    NextTokenLoss(fused)(idx, targets).backward()
    logits = plain(idx)
    wte = plain.transformer.wte.weight
    expected = torch.autograd.grad(token_nll_sum(logits, targets), wte)[0]
    torch.testing.assert_close(fused.transformer.wte.weight.grad, expected, rtol=1e-4, atol=1e-5)
