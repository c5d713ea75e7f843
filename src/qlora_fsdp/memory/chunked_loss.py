"""A memory-lean "lm_head + cross-entropy": the training loss without the (B, T, V) logits tensor.

    loss_sum = causal_lm_loss_sum(model, input_ids, labels, attention_mask)  # token_loss_sum(model(...).logits, ...)
                                                                             # (FSDP2-sharded models too)
    loss_sum = linear_cross_entropy_sum(hidden, lm_head.weight, labels)  # token_loss_sum(hidden @ W.T, labels)

For Llama 3.1 (V = 128,256) the fp32 logits of 8192 tokens take 4.2 GB, and autograd keeps them (or their 16-bit
twin and the softmax) until backward. Here the tokens go through the vocabulary `chunk_tokens` rows at a time, and
each chunk's gradient with respect to the hidden states is computed in forward, right after its loss, while its
logits are at hand: backward is then a multiplication by the incoming scalar. The lm_head weight is frozen in QLoRA,
so no gradient flows to it and nothing of size V outlives a chunk.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..kernels.cross_entropy_rows import IGNORE_INDEX, cross_entropy_rows, cross_entropy_rows_
from ..model import transformers_model


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             chunk_tokens: int | None = None) -> torch.Tensor:  # fmt: skip
    """`token_loss_sum(hidden @ weight.T, labels)` (compile.py), without materialising the logits; fp32 scalar.

    hidden (B, T, H) (requires grad), weight (V, H) (frozen: ValueError if it requires grad), labels (B, T): position
    t predicts labels[:, t + 1], -100 is ignored, no bias. The logits are computed in the autocast dtype when autocast
    is on for hidden's device (as `lm_head` would be), else in hidden's dtype (which must then be weight's).

    Math, per token n with logits z = h_n W^T (V,) and target y:
        loss_n = logsumexp(z) - z_y
        d loss_n / d h_n = (softmax(z) - onehot(y)) W        (zero for an ignored token)
    Every position, the last of each row included, is one row of the flattened hidden (N, H) with N = B * T: the
    shifted targets put -100 at the last position (it predicts nothing), so it gets zero gradient, and the gradient
    buffer is (B, T, H) as it stands, with no slicing or padding.

    Memory beyond the inputs: one chunk's logits, chunk_tokens x V in the compute dtype, which the loss kernel
    (kernels/cross_entropy_rows.py) overwrites with their gradient for the gradient matmul (the PyTorch fallback off the GPU
    adds an fp32 copy), and the gradient buffer N x H in hidden's dtype, the only thing saved for backward.
    chunk_tokens=None takes `default_chunk_tokens(V)`: for Llama 3.1 in bf16, 512 tokens, 131 MB transient and
    64 MB saved with 8192 tokens, instead of 4.2 GB of fp32 logits and more.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_sum: weight must not require grad (no gradient is computed for it)")
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy_sum: hidden (B, T, H) and weight (V, H) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")  # fmt: skip
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"linear_cross_entropy_sum: labels {tuple(labels.shape)} do not match hidden "
                         f"{tuple(hidden.shape)}")  # fmt: skip
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy_sum: chunk_tokens must be positive, got {chunk_tokens}")
    with_grad = hidden.requires_grad and torch.is_grad_enabled()  # evaluation: the loss alone, half the matmuls
    return _LinearCrossEntropySum.apply(hidden, weight, labels, chunk_tokens, with_grad)


def causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                       chunk_tokens: int | None = None) -> torch.Tensor:  # fmt: skip
    """`token_loss_sum(model(...).logits, labels)` for a transformers causal LM (peft-wrapped or not, sharded with
    FSDP2 or not), through linear_cross_entropy_sum: the model runs as usual except that its lm_head returns its
    input, and the head's weight is used inside the chunked loss. The head must be a plain bias-free nn.Linear
    (ValueError otherwise)."""
    with head_returns_hidden(model) as head:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits  # fmt: skip  (B, T, H): the final norm's output
        # under FSDP2 the head's unit gathered its weight in its forward and keeps it until backward
        # (apply_fsdp: reshard_after_forward=False for the head)
        weight = head.weight
    return linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk_tokens)


CHUNK_ELEMENTS = 2**26  # logits per chunk by default: 128 MiB in bf16


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that a chunk has about CHUNK_ELEMENTS logits: a multiple of 128 (whole matmul tiles), at
    least 128. The lm_head matmul of a chunk stays large (512 x 4096 x 128,256 for Llama 3.1), so small chunks cost
    little speed, and the transient memory no longer grows with the batch."""
    return max(128, CHUNK_ELEMENTS // vocab_size // 128 * 128)


@contextmanager
def head_returns_hidden(model: nn.Module):
    """Within: `model`'s output head returns its input, so `model(...).logits` are the final hidden states; the
    head's module hooks (FSDP2's all-gather) still run. Yields the head."""
    base = transformers_model(model)
    head = base.get_output_embeddings()
    _check_plain_head(base, head)
    head.forward = _identity  # an instance attribute over the class's forward, removed on exit
    try:
        yield head
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _check_plain_head(base: nn.Module, head: nn.Module | None) -> None:
    """ValueError unless the logits are exactly `head(hidden)` with `head` a bias-free nn.Linear."""
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"causal_lm_loss_sum: the output head must be a bias-free nn.Linear, got {head!r}")
    for scaling in ("final_logit_softcapping", "logit_scale"):  # e.g. Gemma 2, Cohere: logits are not head(hidden)
        if getattr(base.config, scaling, None) not in (None, 1.0):
            raise ValueError(f"causal_lm_loss_sum: config.{scaling} is set; the chunked loss does not apply it")


class _LinearCrossEntropySum(torch.autograd.Function):
    """Forward: the loss sum, and (with_grad) its gradient w.r.t. hidden into a buffer; backward: grad_output *
    buffer."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                with_grad: bool):  # fmt: skip
        dtype = _compute_dtype(hidden, weight)
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, H), N = B * T
        targets = _shifted_targets(labels).reshape(-1)  # (N,)
        w = weight.to(dtype)  # (V, H): a no-op when the weight is already in the compute dtype
        grad = torch.empty(h.shape, dtype=hidden.dtype, device=hidden.device) if with_grad else None  # (N, H)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                chunk_loss, chunk_grad = _chunk_loss_and_grad(h[rows].to(dtype), w, targets[rows], with_grad)
                loss += chunk_loss
                if with_grad:
                    grad[rows] = chunk_grad
        ctx.save_for_backward(grad)
        ctx.hidden_shape = hidden.shape
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors  # (N, H)
        # the product in fp32: a 16-bit cast of grad_loss (e.g. an fp16 loss scale of 2**16) could overflow alone
        grad_hidden = (grad.float() * grad_loss).to(grad.dtype).view(ctx.hidden_shape)  # (B, T, H)
        return grad_hidden, None, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `lm_head(hidden)` would multiply in: autocast's when it is on, else the inputs' (equal) dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy_sum: hidden is {hidden.dtype} and weight {weight.dtype} "
                         "outside autocast")  # fmt: skip
    return hidden.dtype


def _shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the token each position predicts, labels[:, t + 1]; -100 at the last position."""
    targets = torch.full_like(labels, IGNORE_INDEX)  # (B, T)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _chunk_loss_and_grad(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, with_grad: bool):
    """Loss sum (fp32 scalar) and its gradient w.r.t. h, (n, H) in w's dtype (None unless with_grad), of one chunk:
    h (n, H), w (V, H), targets (n,) with -100 ignored."""
    logits = h @ w.T  # (n, V) in the compute dtype, as lm_head; the loss math is fp32, as token_loss_sum
    if not with_grad:
        return cross_entropy_rows(logits, targets)[0].sum(), None
    loss = cross_entropy_rows_(logits, targets)  # (n,); logits now hold softmax - onehot (kernels/cross_entropy_rows.py)
    return loss.sum(), logits @ w  # (n, H)
