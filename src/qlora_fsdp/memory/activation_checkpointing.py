"""Activation checkpointing of decoder layers: all or all but the last few, optionally with the saved layer inputs
in host memory.

    checkpoint_layers(model)                   # every decoder layer recomputed in backward
    checkpoint_layers(model, keep_last=8)      # the last 8 keep their activations: faster, more memory
    checkpoint_layers(model, offload=True)     # the layer inputs wait for backward in pinned host memory
    checkpoint_layers(model, reentrant=True)   # fewer Python hooks a step (one process: what TrainLoop uses)

A checkpointed layer keeps only its input (B, T, H) from forward to backward and runs its forward again in
backward. The checkpoint wraps the layer's whole call, outside its module hooks and outside `torch.compile`
(compile.py compiles what is inside), the same way on every transformers version.

Memory held between forward and backward, Llama 3.1 8B shape, bf16, compiled layers:
    checkpointed layer   8 KB per token (its input), in host memory with offload=True
    kept layer           about 150 KB per token (attention inputs and outputs, the MLP's 14,336-wide tensors;
                         on an H100, 8,192 tokens without checkpointing peaked at 46 GB against 11 GB with it)

Two forms, the same gradients:
- non-reentrant (torch's default): the layer's forward runs with autograd recording and every tensor it saves
  passes through a pack hook; backward unpacks them, which recomputes the layer. Works with `torch.autograd.grad`
  on chosen inputs (the zero-bubble pipeline's split backward) and under FSDP2.
- reentrant: the forward runs without autograd and saves the layer input alone; backward reruns the layer with
  autograd and backpropagates through it. About 90 pack/unpack hook calls fewer per layer and step for a compiled
  Llama layer (counted on CPU): on an H100 the 1 x 2048 step is bound by the host, not the GPU, and this is host
  time. It needs an input that requires grad (the embedding output is made to, `input_grad.py`) and an ordinary
  `backward()`.
Both keep the forward's random-number state and autocast for the recomputation.

Both forms' recomputations leave out the layer's last matmul, whose output backward never reads (recompute_skip.py).

offload=True (reentrant) moves the saved layer inputs to pinned host memory as they are saved and brings each one
back while backward works on the layer above it (_HostOffload: copies on a side stream, overlapping compute).
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .input_grad import embedding_output_requires_grad
from .recompute_skip import mark_last_projections, recomputation_contexts
from ..nf4.linear import outputs_unused
from ..model import decoder_layers


def checkpoint_layers(model: nn.Module, *, keep_last: int = 0, offload: bool = False, reentrant: bool = False) -> int:
    """Checkpoint every decoder layer of `model` (a transformers causal LM, peft-wrapped or not) but the last
    `keep_last`; returns how many are checkpointed. Call before FSDP2 and torch.compile. offload implies
    reentrant."""
    layers = decoder_layers(model)
    if not 0 <= keep_last <= len(layers):
        raise ValueError(f"keep_last must be between 0 and the {len(layers)} decoder layers, got {keep_last}")
    mode = "offload" if offload else "reentrant" if reentrant else "non-reentrant"
    if mode != "non-reentrant":
        embedding_output_requires_grad(model)  # reentrant checkpointing: the first layer's input must require grad
    n = len(layers) - keep_last
    for layer in list(layers)[:n]:
        layer.__class__ = _checkpointed_class(type(layer), mode)
    mark_last_projections(model, list(layers)[:n])
    return n


def is_checkpointed(layer: nn.Module) -> bool:
    return getattr(type(layer), "_checkpoint_mode", None) is not None


_CLASSES: dict[tuple[type, str], type] = {}


def _checkpointed_class(cls: type, mode: str) -> type:
    """A subclass of the layer's class whose __call__ runs the original call under checkpointing (a class swap,
    as FSDP2's fully_shard does, so parameter names and state dicts stay as they are)."""
    if (cls, mode) not in _CLASSES:

        def __call__(self, *args, **kwargs):
            call = partial(super(new, self).__call__, **kwargs)
            if not (self.training and torch.is_grad_enabled()):
                return call(*args)
            if mode == "non-reentrant":
                return checkpoint(call, *args, use_reentrant=False, context_fn=recomputation_contexts)
            run = partial(_run_reentrant, call)
            if mode == "offload":
                with torch.autograd.graph.saved_tensors_hooks(_OFFLOAD.pack, _OFFLOAD.unpack):
                    return checkpoint(run, *args, use_reentrant=True)
            return checkpoint(run, *args, use_reentrant=True)

        new = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_checkpoint_mode": mode})
        _CLASSES[cls, mode] = new
    return _CLASSES[cls, mode]


def _run_reentrant(call, *args):
    """The layer's call under a reentrant checkpoint: its forward runs without autograd, its recomputation in
    backward with it, and there the last projection computes no output (recompute_skip.py)."""
    if torch.is_grad_enabled():
        with outputs_unused():
            return call(*args)
    return call(*args)


# Pinned host memory comes from torch's caching host allocator, which rounds every block up to a power of two: a
# 3.3 GB layer input (400k tokens of Llama 3.1 8B) would take 4.3 GB. The saved tensors go into pieces of this size
# instead (the last one rounded), so 32 of them take 105 GB of host memory, not 137.
HOST_PIECE_BYTES = 1 << 27


class _Saved:
    """One saved tensor in pinned host memory (uint8 pieces of its bytes): the D2H copy's event, and the device copy
    once prefetched."""

    __slots__ = ("host", "shape", "dtype", "device", "copied", "prefetched", "__weakref__")

    def __init__(self, host: list[torch.Tensor], like: torch.Tensor, copied: torch.cuda.Event):
        self.host, self.copied, self.prefetched = host, copied, None
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device


def _byte_pieces(flat: torch.Tensor) -> list[torch.Tensor]:
    """`flat` (N,) uint8 as consecutive views of at most HOST_PIECE_BYTES."""
    return list(flat.split(HOST_PIECE_BYTES))


class _HostOffload:
    """Saved-tensor hooks that keep a CUDA tensor in pinned host memory until backward.

    pack:   a copy to the host on a side stream, after the work that made the tensor (the compute stream is not
            held up); the tensor's memory is not reused before the copy has read it.
    unpack: the tensor back on the device. Backward unpacks the layer inputs in the reverse order of forward, so
            unpacking one starts the copy of the one saved before it on the side stream: it overlaps the
            recomputation and backward of this layer, and one extra layer input is on the device at a time.
    CPU tensors pass through. The stack holds weak references: a graph freed without backward frees its copies."""

    def __init__(self):
        self.stack: list[weakref.ref] = []  # saved tensors not yet unpacked, in forward order
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor):
        if t.device.type != "cuda":
            return t
        t = t.contiguous()
        stream = self.stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        src = _byte_pieces(t.view(-1).view(torch.uint8))
        host = [torch.empty(p.numel(), dtype=torch.uint8, pin_memory=True) for p in src]
        with torch.cuda.stream(stream):
            for h, p in zip(host, src):
                h.copy_(p, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        t.record_stream(stream)
        saved = _Saved(host, t, copied)
        self.stack = [r for r in self.stack if r() is not None] + [weakref.ref(saved)]
        return saved

    def _prefetch(self, saved: _Saved) -> None:
        stream = self.stream(saved.device)
        with torch.cuda.stream(stream):
            stream.wait_event(saved.copied)
            x = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
            for d, h in zip(_byte_pieces(x.view(-1).view(torch.uint8)), saved.host):
                d.copy_(h, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        saved.prefetched = (x, ready)

    def unpack(self, saved) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.prefetched is None:
            self._prefetch(saved)
        x, ready = saved.prefetched
        compute = torch.cuda.current_stream(saved.device)
        compute.wait_event(ready)
        x.record_stream(compute)
        i = next((k for k, r in enumerate(self.stack) if r() is saved), None)
        if i is not None:
            del self.stack[i]
            below = self.stack[i - 1]() if i > 0 else None
            if below is not None and below.prefetched is None:  # the next layer input backward will ask for
                self._prefetch(below)
        saved.host = saved.prefetched = None
        return x


_OFFLOAD = _HostOffload()
