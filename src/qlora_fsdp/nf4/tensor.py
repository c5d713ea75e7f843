"""NF4Tensor: a frozen NF4 weight that stands where a dense `(out, in)` weight stands.

Its outer shape is the original weight's and its outer dtype the compute dtype (what `F.linear` multiplies
in); inside it holds only the 4-bit bytes and the statistics of an `NF4Weight`. A model keeps its
`nn.Linear` modules with an `nn.Parameter(NF4Tensor)` as the weight, so transformers, peft ("all-linear",
`get_peft_model`) and `generate` see the model they know, and `F.linear` on it runs `nf4_linear`: the base
path that dequantizes for its matmul and again in backward, and yields an input gradient only.

Supported tensor operations are the few a frozen weight meets: detach/alias, `.to(device)` (moves the
bytes and statistics), `.to(dtype)` (changes the compute dtype only: statistics are never cast), clone,
`dequantize()`, and what FSDP2 does to shard it: splits along rows, zero padding, narrowing, flat views, copies,
pinning, plus its all-gather extension (`fsdp_pre_all_gather` / `fsdp_post_all_gather`, which gather the shard's
uint8 bytes). A shard (FSDP2's row chunk outside) holds a window of whole quant groups inside, on any number of
ranks (sharding.py); it cannot be dequantized alone. Anything else raises one line that says to dequantize first.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .format import FLOAT_DTYPES, NF4Weight
from .sharding import ShardLayout, from_gathered, gather_inputs, row_slice, window, zero_window
from .reference import dequantize_reference
from .triton_dequant import dequantize_nf4

aten = torch.ops.aten
_INNER = ("data", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


class NF4Tensor(Tensor):
    nf4: NF4Weight
    shard: ShardLayout | None  # an FSDP2 shard's layout: its bytes a window of quant groups, its shape FSDP2's rows

    @staticmethod
    def __new__(cls, nf4: NF4Weight, dtype: torch.dtype | None = None, shard: ShardLayout | None = None,
                shape: torch.Size | None = None):  # fmt: skip
        dtype = dtype or nf4.dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Tensor: compute dtype {dtype} is not one of float16, bfloat16, float32")
        shape = nf4.shape if shape is None else torch.Size(shape)
        return Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=nf4.device, requires_grad=False)

    def __init__(self, nf4: NF4Weight, dtype: torch.dtype | None = None, shard: ShardLayout | None = None,
                 shape: torch.Size | None = None):  # fmt: skip
        self.nf4, self.shard = nf4, shard

    def __repr__(self) -> str:
        return f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, blocksize={self.nf4.blocksize})"

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight: the Triton kernel on CUDA, the PyTorch reference elsewhere (both bit-exact)."""
        if self.shard is not None:
            raise RuntimeError(f"NF4Tensor: a shard of a {tuple(self.shard.shape)} weight holds a window of its quant "
                               "groups, not its rows: gather it first (FSDP2 does, before forward)")  # fmt: skip
        w = self.nf4
        return (dequantize_nf4 if w.data.is_cuda else dequantize_reference)(w, dtype or self.dtype)

    # torch.compile / subclass protocol: the inner tensors and what rebuilds the wrapper from them. torch reads
    # each inner tensor as getattr(wrapper, name), so the names are the wrapper's `nf4_*` properties below (a
    # bare "data" would be Tensor.data, the wrapper itself: endless recursion when Dynamo wraps the weight)
    def __tensor_flatten__(self):
        names = [f"nf4_{n}" for n in _INNER if getattr(self.nf4, n) is not None]
        w = self.nf4
        return names, (tuple(w.shape), w.dtype, w.blocksize, w.nested_blocksize, self.dtype, self.shard)

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx, outer_size, outer_stride):
        shape, orig_dtype, blocksize, nested_blocksize, dtype, shard = ctx
        nf4 = NF4Weight(shape=shape, dtype=orig_dtype, blocksize=blocksize, nested_blocksize=nested_blocksize,
                        **{n: inner.get(f"nf4_{n}") for n in _INNER})  # fmt: skip
        return NF4Tensor(nf4, dtype, shard, outer_size if shard is not None else None)

    nf4_data = property(lambda self: self.nf4.data)
    nf4_absmax = property(lambda self: self.nf4.absmax)
    nf4_quant_map = property(lambda self: self.nf4.quant_map)
    nf4_nested_absmax = property(lambda self: self.nf4.nested_absmax)
    nf4_nested_quant_map = property(lambda self: self.nf4.nested_quant_map)
    nf4_offset = property(lambda self: self.nf4.offset)

    def _map_inner(self, fn, dtype: torch.dtype | None = None) -> NF4Tensor:
        w = self.nf4
        nf4 = NF4Weight(shape=w.shape, dtype=w.dtype, blocksize=w.blocksize, nested_blocksize=w.nested_blocksize,
                        **{n: None if getattr(w, n) is None else fn(getattr(w, n)) for n in _INNER})  # fmt: skip
        return NF4Tensor(nf4, dtype or self.dtype, self.shard, self.shape)

    # FSDP2 all-gather extension: the shard's uint8 bytes travel, the full NF4Tensor is rebuilt from them. The
    # one-argument form: FSDP2's five-argument one requires every rank's inputs in the padded row chunk's shape,
    # which byte windows of uneven rows are not (docs/design/uneven_nf4_sharding.md)
    def fsdp_pre_all_gather(self, mesh):
        inputs = gather_inputs(self.nf4)
        shape = torch.Size(self.shard.shape) if self.shard is not None else self.shape  # the whole weight's
        if mesh.size() == 1:  # FSDP2 copies only the first input at world size 1 (torch 2.11-2.13): send one
            return (torch.cat(inputs),), (self.nf4, shape, [t.numel() for t in inputs])
        return inputs, (self.nf4, shape, None)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        like, shape, sizes = metadata
        if sizes is not None:  # N = 1: the one flat output in its pieces, each with a storage of its own on the first
            outputs = torch.split(outputs[0], sizes)  # call: FSDP2 frees and reallocates every unsharded inner
            if out is None:  # tensor's storage by itself, which resized views of one storage to the last's size
                outputs = [t.clone() for t in outputs]
        if out is not None:  # later all-gathers: `out` views the same storage (N > 1) or takes a copy (N = 1)
            if sizes is not None:
                for dst, src in zip(gather_inputs(out.nf4), outputs):
                    dst.copy_(src[: dst.numel()])  # the prefix: the window's padding stays behind
            return
        full = from_gathered(tuple(outputs), like, shape)
        # the compute dtype is MixedPrecisionPolicy's param_dtype when one is set; statistics are never cast
        return NF4Tensor(full, param_dtype if param_dtype in FLOAT_DTYPES else self.dtype), tuple(outputs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            from .linear import nf4_linear

            return nf4_linear(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"NF4Tensor does not support {func}: dequantize the weight first (weight.dequantize())"
            )
        return handler(*args, **kwargs)


def _rows(t: NF4Tensor, start: int, stop: int) -> NF4Tensor:
    return NF4Tensor(row_slice(t.nf4, start, stop), t.dtype)


def _split(t: NF4Tensor, split_size: int, dim: int = 0) -> list[NF4Tensor]:
    """FSDP2's chunks of `split_size` rows, each a shard holding its window of quant groups (sharding.py)."""
    if dim != 0 or t.shard is not None:
        raise NotImplementedError("NF4Tensor splits a whole weight along dim 0 (rows) only")
    layout, (rows, *cols) = ShardLayout.of(t.nf4, split_size), t.shape
    return [NF4Tensor(window(t.nf4, k, layout), t.dtype, layout, (min(split_size, rows - k * split_size), *cols))
            for k in range(layout.chunks)]  # fmt: skip


def _slice(t: NF4Tensor, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> NF4Tensor:
    rows = t.shape[0]
    start, end = start or 0, rows if end is None else min(end, rows)
    if dim != 0 or step != 1:
        raise NotImplementedError("NF4Tensor slices whole rows (dim 0, step 1) only")
    if t.shard is not None:  # FSDP2 narrows a padded shard to its rows: the window stays whole
        if start != 0:
            raise NotImplementedError("NF4Tensor: a shard narrows from its first row only")
        return NF4Tensor(t.nf4, t.dtype, t.shard, (end, *t.shape[1:]))
    return _rows(t, start, end)  # a new wrapper even for all rows: a view op may not return its input


def _zero_shard(t: NF4Tensor, size, layout: ShardLayout) -> NF4Tensor:
    return NF4Tensor(zero_window(t.nf4, layout.per, layout.group), t.dtype, layout, torch.Size(size))


def _new_zeros(t: NF4Tensor, size, dtype=None, layout=None, device=None, pin_memory=None) -> NF4Tensor:
    """FSDP2's padding: a shard of `size` (s rows x t's columns) whose window is all zero bytes, for the whole
    weight t (its layout for chunks of s rows) or for a shard of it (the same layout)."""
    shape = torch.Size(size)
    if t.shard is not None:
        return _zero_shard(t, shape, t.shard)
    if len(shape) != t.dim() or tuple(shape[1:]) != tuple(t.shape[1:]):
        raise NotImplementedError(f"NF4Tensor.new_zeros({tuple(shape)}) must keep the columns {tuple(t.shape[1:])}")
    return _zero_shard(t, shape, ShardLayout.of(t.nf4, shape[0]))


def _new_empty(t: NF4Tensor, size, dtype=None, layout=None, device=None, pin_memory=None) -> NF4Tensor:
    """FSDP2's stand-in for a rank without rows (fewer chunks than ranks): an empty shard of t's layout."""
    if t.shard is None:
        raise NotImplementedError("NF4Tensor.new_empty applies to shards only")
    return _zero_shard(t, size, t.shard)


def _view(t: NF4Tensor, size) -> NF4Tensor:
    shape = torch.Size(size)
    if -1 in shape:
        shape = torch.Size([t.numel() // math.prod(d for d in shape if d != -1) if d == -1 else d for d in shape])
    if math.prod(shape) != t.numel():
        raise RuntimeError(f"NF4Tensor.view: {tuple(shape)} is not {tuple(t.shape)} reshaped")
    if t.shard is not None:  # FSDP2's flat view of a padded shard: the window stays as it is
        return NF4Tensor(t.nf4, t.dtype, t.shard, shape)
    w = t.nf4
    return NF4Tensor(replace(w, shape=shape), t.dtype)


def _as_strided(t: NF4Tensor, size, stride, storage_offset=None) -> NF4Tensor:
    """Only the identity (same shape, contiguous strides, no offset): FSDP2 asks for it on the gathered weight."""
    contiguous = [math.prod(size[i + 1 :]) for i in range(len(size))]
    if tuple(size) != tuple(t.shape) or tuple(stride) != tuple(contiguous) or (storage_offset or 0) != 0:
        raise NotImplementedError(f"NF4Tensor.as_strided({tuple(size)}, {tuple(stride)}) changes the layout")
    return t._map_inner(lambda x: x)


def _is_pinned(t: NF4Tensor, device=None) -> bool:
    return t.nf4.data.is_pinned()


def _pin_memory(t: NF4Tensor, device=None) -> NF4Tensor:
    return t._map_inner(lambda x: x.pin_memory())


def _detach(t: NF4Tensor) -> NF4Tensor:
    return t._map_inner(lambda x: x.detach())


def _to_copy(t: NF4Tensor, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False,
             memory_format=None) -> NF4Tensor:  # fmt: skip
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"NF4Tensor: cannot convert to {dtype}; dequantize the weight first (weight.dequantize())")
    if device is None or torch.device(device) == t.device:
        return t._map_inner(lambda x: x, dtype)
    return t._map_inner(lambda x: x.to(device, non_blocking=non_blocking), dtype)


def _clone(t: NF4Tensor, memory_format=None) -> NF4Tensor:
    return t._map_inner(lambda x: x.clone())


def _is_same_size(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape


def _copy_(dst: NF4Tensor, src: Tensor, non_blocking: bool = False) -> NF4Tensor:
    if not isinstance(src, NF4Tensor) or src.shape != dst.shape or src.nf4.blocksize != dst.nf4.blocksize:
        raise NotImplementedError("NF4Tensor.copy_ takes only an NF4Tensor of the same shape and blocksize")
    if src.shard != dst.shard:
        raise NotImplementedError("NF4Tensor.copy_: a shard copies from a shard of the same layout only")
    for n in _INNER:
        d, s = getattr(dst.nf4, n), getattr(src.nf4, n)
        if (d is None) != (s is None):
            raise NotImplementedError("NF4Tensor.copy_: source and destination differ in double quantization")
        if d is not None:
            d.copy_(s, non_blocking=non_blocking)
    return dst


_HANDLERS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.is_same_size.default: _is_same_size,
    aten.copy_.default: _copy_,
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.new_empty.default: _new_empty,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: _pin_memory,
    aten._unsafe_view.default: _view,
}

