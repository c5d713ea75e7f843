"""A checkpointed decoder layer's recomputation without its last matmul, whose output backward never reads.

A Llama-style layer ends with

    out = h + down(act)                       act (T, I), down's base weight W (H, I)

and its backward reads neither `out` nor `down(act)`: the residual add passes the gradient through, down's input
gradient is dY W, and its LoRA reads act and A(act). A checkpoint recomputes a layer in backward only to rebuild
what the layer's backward reads (the reentrant form then backpropagates from the recomputed output, whose value is
not used; the non-reentrant form takes the saved tensors alone). So while it recomputes, the down projection's base
matmul is left out: its output is returned unwritten (nf4_linear(skippable=True) under outputs_unused():
torch.empty, the same tensors saved for backward), and the layer output computed from it is never looked at. The
flag is read when the matmul runs, not when a compiled layer is traced, so forward and recomputation run one graph
and save the same tensors (what the non-reentrant form checks). That is 2 T I H FLOPs a layer, 27% of a Llama 3.1 8B
layer's forward matmuls (about 9% of a checkpointed step's base matmuls); the gradients are those of the full
recomputation, bit for bit.

    mark_last_projections(model, layers)      # the down projections of these (checkpointed) layers
    with outputs_unused():                    # activation_checkpointing.py, around a layer's recomputation
        layer(...)
    checkpoint(fn, x, use_reentrant=False, context_fn=recomputation_contexts)

The same holds for a chunk of a sequence-chunked MLP (chunked_mlp.py), whose output only its layer reads: its
recomputation skips the down projection too (where the model type is one of LAST_PROJECTION_OF).

Only for model types whose layers end in `h + mlp.down_proj(...)` (LAST_PROJECTION_OF; Gemma's post-feedforward norm
reads the MLP output in backward, for one), and only NF4 base weights.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..model import transformers_model
from ..nf4.linear import nf4_linear, outputs_unused
from ..nf4.tensor import NF4Tensor

# model types whose decoder layers end in `hidden + mlp.down_proj(...)` (transformers' Llama, Mistral and Qwen layers)
LAST_PROJECTION_OF = {"llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj",
                      "qwen3": "mlp.down_proj"}  # fmt: skip


def recomputation_contexts() -> tuple[nullcontext, outputs_unused]:
    """torch.utils.checkpoint's non-reentrant `context_fn`: the (forward, recomputation) contexts, the second
    outputs_unused() (the marked projections compute no output)."""
    return nullcontext(), outputs_unused()


class OutputFreeInRecomputation(nn.Linear):
    """An nn.Linear whose NF4 weight's matmul does not run while outputs_unused() is on (nf4_linear(skippable=True)); a
    dense weight runs as in nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, NF4Tensor):
            return nf4_linear(x, self.weight, self.bias, skippable=True)
        return super().forward(x)


def last_projection(model: nn.Module, layer: nn.Module) -> nn.Linear | None:
    """The base nn.Linear (under a LoRA wrapper, if any) of the projection `layer` (a decoder layer of `model`) ends
    with, for the model types of LAST_PROJECTION_OF; None otherwise."""
    path = LAST_PROJECTION_OF.get(getattr(getattr(transformers_model(model), "config", None), "model_type", None))
    if path is None:
        return None
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return None
    base = getattr(module, "base_layer", module)
    return base if isinstance(base, nn.Linear) else None


def mark_last_projections(model: nn.Module, layers) -> int:
    """Make the last projection of each of `layers` (decoder layers of `model`) compute no output while
    outputs_unused(); how many were marked. A class swap, as checkpoint_layers does: names and state dicts stay."""
    marked = 0
    for layer in layers:
        linear = last_projection(model, layer)
        if linear is not None and type(linear) in (nn.Linear, OutputFreeInRecomputation):
            linear.__class__ = OutputFreeInRecomputation
            marked += 1
    return marked
