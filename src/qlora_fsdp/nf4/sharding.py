"""Row shards of an NF4 weight, and the bytes FSDP2 all-gathers to rebuild it.

A weight of shape (R, C) splits along dim 0 into N shards of R/N rows. A shard holds its rows' packed bytes,
their 8-bit absmax codes and the nested absmax of their groups, so it must cover whole quant blocks and whole
nested groups:

    (R / N) * C  must be a multiple of  blocksize * nested_blocksize   (64 * 256 = 16384 by default)

(Llama-3.1-8B's projections split so for N up to 64.) The code books and the double-quant offset are the
same for every shard and are not gathered. What the all-gather moves is bytes only:

    data (R/N*C/2,) uint8 | absmax (R/N*C/B,) uint8 | nested_absmax (R/N*C/B/NB,) float32 viewed as uint8

so no mixed-precision cast can touch them, and the gathered size is the 4-bit size.
"""

from __future__ import annotations

import torch

from .format import NF4FormatError, NF4Weight


def shard_granularity(w: NF4Weight) -> int:
    """Elements a shard must be a multiple of."""
    return w.blocksize * (w.nested_blocksize if w.double_quant else 1)


def check_shardable(w: NF4Weight, world_size: int) -> None:
    rows, cols = w.shape[0], w.numel // w.shape[0]
    g = shard_granularity(w)
    if rows % world_size or (rows // world_size * cols) % g:
        raise NF4FormatError(
            f"an NF4 weight of shape {tuple(w.shape)} cannot be split into {world_size} row shards of whole quant "
            f"blocks ({g} elements each): use a world size that divides {rows} with (rows/N)*{cols} a multiple of {g}"
        )


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
    """The whole weight from the all-gathered uint8 tensors (shards concatenated in rank order)."""
    data, absmax = outputs[0], outputs[1]
    if like.absmax.dtype != torch.uint8:
        absmax = absmax.view(like.absmax.dtype)
    nested = {}
    if like.double_quant:
        nested = dict(nested_absmax=outputs[2].view(torch.float32), nested_quant_map=like.nested_quant_map,
                      offset=like.offset, nested_blocksize=like.nested_blocksize)  # fmt: skip
    return NF4Weight(data=data, absmax=absmax, shape=shape, dtype=like.dtype, blocksize=like.blocksize,
                     quant_map=like.quant_map, **nested)  # fmt: skip
