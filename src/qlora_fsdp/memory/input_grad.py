"""Make the embedding output require grad, so that the first decoder layer's input does as every other layer's.

Reentrant checkpointing needs an input that requires grad (or its output does not), and compiled layers share one
graph only when their inputs agree on requires_grad. peft's `enable_input_require_grads` does this by calling
`requires_grad_()` on the embedding output, which makes it a leaf: autograd's AccumulateGrad node holds it until the
graph is freed, and backward stores a `.grad` (B, T, H) into it that nothing reads. Here the output passes through an
identity function instead (a copy tied to a zero-element leaf that requires grad): the output requires grad, it is
freed as soon as forward is done with it, and its gradient is dropped in backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import transformers_model


class _RequireGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.clone()  # not a view: compiled layers guard on that, and a view would need a graph of its own

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None  # the embedding is frozen: nothing upstream needs this gradient


_ANCHORS: dict[torch.device, torch.Tensor] = {}


def require_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` as a non-leaf that requires grad; its gradient goes nowhere."""
    if x.requires_grad or not torch.is_grad_enabled():
        return x
    if x.device not in _ANCHORS:
        _ANCHORS[x.device] = torch.empty(0, device=x.device, requires_grad=True)
    return _RequireGrad.apply(x, _ANCHORS[x.device])


def _output_requires_grad(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    return require_grad(out)


def embedding_output_requires_grad(model: nn.Module) -> None:
    """Hook the input embedding of `model` (a transformers causal LM, peft-wrapped or not) so that its output
    requires grad (see the module docstring). Idempotent."""
    emb = transformers_model(model).get_input_embeddings()
    if getattr(emb, "_qlora_output_requires_grad", False):
        return
    emb.register_forward_hook(_output_requires_grad)
    emb._qlora_output_requires_grad = True
