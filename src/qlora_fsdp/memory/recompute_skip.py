"""A checkpointed decoder layer's recomputation without its last matmul, whose output backward never reads.

A Llama-style layer ends with

    out = h + down(act)                       act (T, I), down's base weight W (H, I)

and its backward reads neither `out` nor `down(act)`: the residual add passes the gradient through, down's input
gradient is dY W, and its LoRA reads act and A(act). A reentrant checkpoint recomputes a layer in backward only to
rebuild what the layer's backward reads, then backpropagates from the recomputed output, whose value is not used.
So while it recomputes, the down projection's base matmul is left out: its output is returned unwritten
(nf4_linear(output_needed=False): torch.empty, the same tensors saved for backward), and the layer output computed
from it is never looked at. That is 2 T I H FLOPs a layer, 27% of a Llama 3.1 8B layer's forward matmuls; the
gradients are those of the full recomputation, bit for bit.

    mark_last_projections(model, layers)      # the down projections of these (checkpointed) layers
    with recomputing():                       # activation_checkpointing.py, around a reentrant recomputation
        layer(...)

Only for model types whose layers end in `h + mlp.down_proj(...)` (LAST_PROJECTION_OF; Gemma's post-feedforward norm
reads the MLP output in backward, for one), only NF4 base weights, and only under reentrant checkpointing: the
non-reentrant form recomputes inside autograd's saved-tensor hooks, where a compiled layer's recomputation must
save what its forward saved (not checked for a graph without the matmul).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..model import transformers_model
from ..nf4.linear import nf4_linear
from ..nf4.tensor import NF4Tensor

# model types whose decoder layers end in `hidden + mlp.down_proj(...)` (transformers' Llama, Mistral and Qwen layers)
LAST_PROJECTION_OF = {"llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj",
                      "qwen3": "mlp.down_proj"}  # fmt: skip

_RECOMPUTING = False  # read by compiled layers: Dynamo guards on it (a recomputation graph and a forward graph)


@contextmanager
def recomputing():
    """While on, the marked projections (mark_last_projections) compute no output."""
    global _RECOMPUTING
    before, _RECOMPUTING = _RECOMPUTING, True
    try:
        yield
    finally:
        _RECOMPUTING = before


class OutputFreeInRecomputation(nn.Linear):
    """An nn.Linear (NF4 weight) that runs no matmul while recomputing() is on; otherwise nn.Linear itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _RECOMPUTING and isinstance(self.weight, NF4Tensor):
            return nf4_linear(x, self.weight, self.bias, output_needed=False)  # (..., out), unwritten
        return super().forward(x)


def last_projection(model: nn.Module, layer: nn.Module) -> nn.Linear | None:
    """The base nn.Linear (under a LoRA wrapper, if any) of the projection `layer` (a decoder layer of `model`) ends
    with, for the model types of LAST_PROJECTION_OF; None otherwise."""
    path = LAST_PROJECTION_OF.get(getattr(getattr(transformers_model(model), "config", None), "model_type", None))
    if path is None:
        return None
    module = layer.get_submodule(path) if _has_submodule(layer, path) else None
    base = getattr(module, "base_layer", module)
    return base if isinstance(base, nn.Linear) else None


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def mark_last_projections(model: nn.Module, layers) -> int:
    """Make the last projection of each of `layers` (decoder layers of `model`) compute no output while
    recomputing(); how many were marked. A class swap, as checkpoint_layers does: names and state dicts stay."""
    marked = 0
    for layer in layers:
        linear = last_projection(model, layer)
        if linear is not None and type(linear) in (nn.Linear, OutputFreeInRecomputation):
            linear.__class__ = OutputFreeInRecomputation
            marked += 1
    return marked
