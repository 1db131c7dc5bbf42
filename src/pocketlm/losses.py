"""Output layer + cross-entropy, fused and chunked so the full (tokens x vocab) logits never exist.

For the seed workload (2,048 tokens x 50,257 vocabulary) the plain path holds the logits in
bf16 (206 MB), their fp32 copy (412 MB), log-softmax saved for backward (412 MB) and the
gradients flowing back through them, about 1 GiB at once. Here the forward pass walks the
tokens in chunks, computes each chunk's loss *and* its gradients right away, and keeps only
the gradient for the hidden states (tokens x n_embd) and for the output weight (vocab x n_embd)
until backward, which merely scales them.
"""

from __future__ import annotations

from typing import Callable

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in fp32 (128 tokens of GPT-2's vocabulary)


def _compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_tokens: int, weight_grad_sink: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
        dtype = _compute_dtype(hidden.device.type, hidden.dtype)
        need_grads = any(ctx.needs_input_grad[:2])
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, C); a no-op in fp32
            h = hidden.to(dtype)  # (N, C)
            if need_grads:
                grad_hidden = torch.empty_like(h)  # (N, C)
                # Accumulated in the compute dtype by addmm (fp32 accumulation inside each
                # product); the plain autocast path also rounds this gradient to bf16 once.
                grad_weight = torch.zeros_like(w)  # (V, C)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h.size(0), chunk_tokens):
                h_c, t_c = h[start:start + chunk_tokens], targets[start:start + chunk_tokens]
                valid = (t_c != IGNORE_INDEX)[:, None]  # (n, 1)
                safe_t = t_c.clamp(min=0)[:, None]  # (n, 1)
                logits = (h_c @ w.t()).float()  # (n, V)
                # softmax in place: torch.logsumexp would allocate another (n, V) buffer
                row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                target_logit = logits.gather(1, safe_t) - row_max  # (n, 1)
                probs = logits.sub_(row_max).exp_()  # unnormalised, (n, V)
                total = probs.sum(dim=-1, keepdim=True)  # (n, 1)
                loss += torch.where(valid, total.log() - target_logit, 0.0).sum()
                if not need_grads:
                    continue
                # d(sum NLL)/d logits = softmax - one_hot, zero on ignored rows
                probs.div_(total).scatter_add_(1, safe_t, torch.full_like(total, -1.0)).mul_(valid)
                g = probs.to(dtype)
                del logits, probs
                torch.mm(g, w, out=grad_hidden[start:start + chunk_tokens])
                grad_weight.addmm_(g.t(), h_c)
                del g  # before the next chunk's logits exist
        if not need_grads:
            return loss
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype = hidden.dtype
        # A tied weight's gradient would otherwise wait, cast to fp32, in autograd's buffer
        # until the embedding's share arrives at the end of backward (154 MB on gpt2-125m).
        ctx.accumulate_into = weight if weight.is_leaf and weight.requires_grad else None
        ctx.weight_grad_sink = weight_grad_sink
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors  # a second backward fails here: the buffers are freed
        # In place: these buffers are used once, and copies would double their memory.
        grad_hidden.mul_(grad_loss)
        weight = ctx.accumulate_into
        grad_weight.mul_(grad_loss)
        if weight is None:
            return grad_hidden.to(ctx.hidden_dtype), grad_weight, None, None, None
        # Gradient-accumulation fusion (as in Megatron-LM): add straight into .grad, or into
        # the buffer a low-memory optimizer keeps instead.
        if ctx.weight_grad_sink is not None:
            ctx.weight_grad_sink(grad_weight)
        elif weight.grad is None:
            weight.grad = grad_weight.to(weight.dtype)
        else:
            weight.grad.add_(grad_weight)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int | None = None,
                               weight_grad_sink: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Summed NLL of ``softmax(hidden @ weight.T)`` at ``targets`` (IGNORE_INDEX skipped).

    ``hidden`` is (..., C), ``targets`` (...). Equal to ``token_nll_sum(hidden @ weight.T, targets)``
    up to rounding, with the gradients of ``hidden`` and ``weight``, in a fraction of the memory.
    A leaf ``weight``'s gradient is added directly to ``weight.grad`` during ``backward()``, so
    use ``.backward()`` rather than ``torch.autograd.grad`` for it; ``weight_grad_sink``, if
    given, receives that gradient instead.
    """
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.size(0))
    return _FusedLinearCrossEntropy.apply(h, weight, t, chunk_tokens, weight_grad_sink)
