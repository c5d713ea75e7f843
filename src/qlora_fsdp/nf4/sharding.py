"""Shards of an NF4 weight over any number of ranks, and the bytes FSDP2 all-gathers to rebuild it.

FSDP2 cuts a weight (R, C) along dim 0 into chunks of s = ceil(R/N) rows (the last shorter, possibly none). The
4-bit bytes cannot follow those row boundaries: a shard must hold whole quant groups, G = blocksize x
nested_blocksize elements (64 x 256 = 16,384) with double quantization, G = blocksize without, because a group's
statistics (absmax bytes, one nested absmax) describe all of it. So a shard holds a window of groups instead:

    T   = ceil(R*C / G)            groups of the weight (the last may be partial)
    M   = ceil(R / s)              non-empty row chunks (torch.chunk can return fewer than N)
    per = ceil(T / M)              groups every shard holds: rank k holds groups [k*per, (k+1)*per)

zero-padded past the end of the weight, as FSDP2 pads uneven rows. Every rank's all-gather inputs then have the
same size, and concatenated in rank order the valid bytes are a prefix:

    data (per*G/2,) uint8 | absmax (per*G/B,) uint8 | nested_absmax (per,) float32 viewed as uint8

so no mixed-precision cast touches them, the gathered size is the 4-bit size plus at most M-1 groups of padding,
and the rebuilt weight takes the first ceil(n/2), ceil(n/B), ceil(n/B/NB) entries: padding never reaches a matmul.
The code books and the double-quant offset are one for the whole weight and are not gathered. When the row
chunks fall on group boundaries (R % N == 0 and (R/N)*C a multiple of G: Llama-3.1-8B's projections for N up to
64), the windows are exactly the row chunks' bytes. A shard's outer shape is FSDP2's row chunk; its bytes are
its window, not those rows, so it cannot be dequantized on its own (NF4Tensor refuses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import NF4FormatError, NF4Weight


def shard_granularity(w: NF4Weight) -> int:
    """Elements in one quant group: what a shard must hold whole."""
    return w.blocksize * (w.nested_blocksize if w.double_quant else 1)


@dataclass(frozen=True)
class ShardLayout:
    """How a weight of `shape` is windowed for FSDP2 chunks of `split_rows` rows (module docstring)."""

    shape: tuple[int, ...]  # the whole weight's
    split_rows: int  # s
    group: int  # G, elements
    per: int  # groups per shard

    @staticmethod
    def of(w: NF4Weight, split_rows: int) -> ShardLayout:
        rows, g = w.shape[0], shard_granularity(w)
        groups, chunks = -(-w.numel // g), -(-rows // split_rows)
        return ShardLayout(tuple(w.shape), split_rows, g, -(-groups // chunks))

    @property
    def chunks(self) -> int:
        return -(-self.shape[0] // self.split_rows)


def zero_window(like: NF4Weight, per: int, group: int) -> NF4Weight:
    """`per` groups of zero bytes and statistics, a 1-D weight of per * group elements, with `like`'s code books
    and offset (shared, never recomputed)."""
    n = per * group
    blocks = n // like.blocksize
    zeros = lambda k, t: torch.zeros(k, dtype=t.dtype, device=t.device)  # noqa: E731
    nested = {}
    if like.double_quant:
        nested = dict(nested_absmax=zeros(blocks // like.nested_blocksize, like.nested_absmax),
                      nested_quant_map=like.nested_quant_map, offset=like.offset,
                      nested_blocksize=like.nested_blocksize)  # fmt: skip
    return NF4Weight(data=zeros(n // 2, like.data), absmax=zeros(blocks, like.absmax), shape=torch.Size([n]),
                     dtype=like.dtype, blocksize=like.blocksize, quant_map=like.quant_map, **nested)  # fmt: skip


def window(w: NF4Weight, k: int, layout: ShardLayout) -> NF4Weight:
    """Shard k's groups [k*per, (k+1)*per) of the whole weight `w`: views of its bytes where the window lies inside
    the weight, else a zero-padded copy (the weight's last groups, or nothing)."""
    n, g, per = w.numel, layout.group, layout.per
    e0, e1 = k * per * g, (k + 1) * per * g
    b0, nb0 = e0 // w.blocksize, k * per
    if e1 <= n:  # whole groups of the weight: views
        b1 = e1 // w.blocksize
        nested = {}
        if w.double_quant:
            nested = dict(nested_absmax=w.nested_absmax[nb0 : nb0 + per], nested_quant_map=w.nested_quant_map,
                          offset=w.offset, nested_blocksize=w.nested_blocksize)  # fmt: skip
        return NF4Weight(data=w.data[e0 // 2 : e1 // 2], absmax=w.absmax[b0:b1], shape=torch.Size([e1 - e0]),
                         dtype=w.dtype, blocksize=w.blocksize, quant_map=w.quant_map, **nested)  # fmt: skip
    out = zero_window(w, per, g)
    if e0 < n:  # the weight ends inside this window
        data, absmax = w.data[e0 // 2 :], w.absmax[b0:]
        out.data[: data.numel()].copy_(data)
        out.absmax[: absmax.numel()].copy_(absmax)
        if w.double_quant:
            nested = w.nested_absmax[nb0:]
            out.nested_absmax[: nested.numel()].copy_(nested)
    return out


def row_slice(w: NF4Weight, start: int, stop: int) -> NF4Weight:
    """Rows [start, stop) of `w` as an NF4Weight sharing its storage (whole blocks only)."""
    cols = w.numel // w.shape[0]
    e0, e1 = start * cols, stop * cols
    g = shard_granularity(w)
    if e0 % g or (e1 % g and stop != w.shape[0]):
        raise NF4FormatError(f"rows [{start}, {stop}) of {tuple(w.shape)} do not cover whole quant blocks of {g}")
    b0, b1 = e0 // w.blocksize, -(-e1 // w.blocksize)
    nested = {}
    if w.double_quant:
        n0, n1 = b0 // w.nested_blocksize, -(-b1 // w.nested_blocksize)
        nested = dict(nested_absmax=w.nested_absmax[n0:n1], nested_quant_map=w.nested_quant_map, offset=w.offset,
                      nested_blocksize=w.nested_blocksize)  # fmt: skip
    return NF4Weight(data=w.data[e0 // 2 : -(-e1 // 2)], absmax=w.absmax[b0:b1], shape=torch.Size([stop - start, *w.shape[1:]]),
                     dtype=w.dtype, blocksize=w.blocksize, quant_map=w.quant_map, **nested)  # fmt: skip


def gather_inputs(w: NF4Weight) -> tuple[torch.Tensor, ...]:
    """The uint8 tensors one shard contributes to the all-gather."""
    parts = [w.data, w.absmax.view(torch.uint8)]
    if w.double_quant:
        parts.append(w.nested_absmax.contiguous().view(torch.uint8))
    return tuple(parts)


def from_gathered(outputs: tuple[torch.Tensor, ...], like: NF4Weight, shape: torch.Size) -> NF4Weight:
    """The whole weight of `shape` from the all-gathered uint8 tensors (shards concatenated in rank order): the
    prefixes that hold its bytes and statistics (views of `outputs`: FSDP2 re-fills them in place)."""
    n = 1
    for d in shape:
        n *= d
    blocks = -(-n // like.blocksize)
    data, absmax = outputs[0][: -(-n // 2)], outputs[1]
    if like.absmax.dtype != torch.uint8:
        absmax = absmax.view(like.absmax.dtype)
    nested = {}
    if like.double_quant:
        nested = dict(nested_absmax=outputs[2].view(torch.float32)[: -(-blocks // like.nested_blocksize)],
                      nested_quant_map=like.nested_quant_map, offset=like.offset,
                      nested_blocksize=like.nested_blocksize)  # fmt: skip
    return NF4Weight(data=data, absmax=absmax[:blocks], shape=torch.Size(shape), dtype=like.dtype,
                     blocksize=like.blocksize, quant_map=like.quant_map, **nested)  # fmt: skip
