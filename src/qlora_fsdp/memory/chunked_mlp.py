"""Sequence-chunked MLPs: each decoder layer's MLP runs over the tokens a chunk at a time, each chunk checkpointed.

    chunk_mlps(model, chunk_tokens=16384)   # in place; before torch.compile (compile_model(fullgraph=False))

An MLP is tokenwise, out[t] = mlp(x[t]), so running it on row blocks of the (B*T, H) input gives the same result.
What it bounds is the memory of its (T, I) tensors. Training a Llama 3.1 8B layer (I = 14,336, bf16) holds gate
and up for backward and, there, the activation and three gradients of that width: about 6 x 28 KB a token, 70 GB at
400k tokens, the most of any part of the step once layers are checkpointed. Chunked:
    forward     each chunk's MLP runs under torch.utils.checkpoint: it keeps only its input, a view of the MLP
                input, which the layer holds anyway; the (chunk, I) tensors live while the chunk runs
    backward    each chunk's MLP runs again (without the down projection's matmul, whose output nothing in the chunk's
                backward reads: recompute_skip.py), then backpropagates: (chunk, I) tensors for one chunk at a time
    no grad     the chunks run plainly, one after the other
Cost: inside a checkpointed layer the MLP runs forward three times a step instead of twice (the layer's forward, its
recomputation, the chunk's recomputation; the down projection's matmul in the first alone), paid only for inputs
longer than one chunk; the output is the chunks' outputs concatenated, (B, T, H) twice for a moment. Measured on an
H100 (Llama 3.1 8B shape, compiled, offloaded layer inputs, CPU embedding), 1 x 32,768 tokens: 4,883 tokens/s
chunked by 8,192 against 6,525 unchunked (0.75x), the same 12.9 GB peak (at that length the MLP is not the peak). It
pays where a sequence does not fit otherwise: with it 399,360 tokens train on that GPU (61 GB peak), without it
262,144 do not.

The chunk loop is Python over a length known at run time, so under torch.compile it runs outside the graph
(torch.compiler.disable): a compiled layer becomes two graphs, before and after its MLP, with one graph break.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import decoder_layers
from .recompute_skip import mark_last_projections, recomputation_contexts


def chunk_mlps(model: nn.Module, chunk_tokens: int) -> int:
    """Run the MLP of every decoder layer of `model` (a transformers causal LM, peft-wrapped or not) over at most
    `chunk_tokens` tokens at a time; returns how many MLPs. Parameter names and state dicts stay as they are."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    if not mlps or any(not isinstance(m, nn.Module) for m in mlps):
        raise ValueError(f"{type(model).__name__}: the decoder layers have no `mlp` module to chunk")
    for mlp in mlps:
        if not is_chunked(mlp):
            mlp.__class__ = _chunked_class(type(mlp))
        mlp.chunk_tokens = chunk_tokens
    mark_last_projections(model, decoder_layers(model))  # a chunk's recomputation skips its down matmul
    return len(mlps)


def is_chunked(mlp: nn.Module) -> bool:
    return getattr(type(mlp), "_chunked_mlp", False)


_CLASSES: dict[type, type] = {}


def _chunked_class(cls: type) -> type:
    """A subclass whose __call__ splits the tokens (a class swap, as activation_checkpointing.py does)."""
    if cls not in _CLASSES:

        @torch.compiler.disable
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            run = super(new, self).__call__
            flat = x.reshape(-1, x.shape[-1])  # (N, H), N = B * T
            if flat.shape[0] <= self.chunk_tokens:
                return run(x)
            grad = torch.is_grad_enabled()
            # each chunk keeps only its input for backward (a view of x) and recomputes its MLP there
            outs = [checkpoint(run, part, use_reentrant=False, context_fn=recomputation_contexts) if grad else run(part)
                    for part in flat.split(self.chunk_tokens)]  # fmt: skip  # [(chunk, H_out)]
            if not isinstance(outs[0], torch.Tensor):
                raise TypeError(f"chunk_mlps: {cls.__name__} returns {type(outs[0]).__name__}, not one tensor: it "
                                "cannot run by chunks of tokens")  # fmt: skip
            return torch.cat(outs).view(*x.shape[:-1], -1)  # (B, T, H_out)

        new = type(f"Chunked{cls.__name__}", (cls,), {"__call__": __call__, "_chunked_mlp": True})
        _CLASSES[cls] = new
    return _CLASSES[cls]
