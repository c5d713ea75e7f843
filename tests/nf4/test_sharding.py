"""Shards of NF4 weights over any number of ranks and the uint8 all-gather that rebuilds them (FSDP2's view,
simulated in one process): windows of whole quant groups, equal on every rank, the valid bytes a prefix."""

import pytest
import torch

from qlora_fsdp.nf4 import dequantize_reference, quantize_nf4
from qlora_fsdp.nf4.sharding import ShardLayout, from_gathered, gather_inputs, row_slice, shard_granularity, window


def shards_of(w, world):
    """What FSDP2 makes: chunks of ceil(R/N) rows (torch.chunk), padded to N with empty ones."""
    layout = ShardLayout.of(w, -(-w.shape[0] // world))
    return layout, [window(w, k, layout) for k in range(world)]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape, world", [((512, 128), 1), ((512, 128), 2), ((512, 128), 4),  # whole groups per row chunk
                                          ((128, 128), 2), ((128, 128), 3), ((576, 576), 2), ((576, 576), 3),
                                          ((896, 896), 3), ((6, 4), 4), ((130, 70), 8)])  # fmt: skip
def test_shards_gather_back_bit_exact_on_any_world_size(shape, world, double_quant):
    w = quantize_nf4(torch.randn(*shape, dtype=torch.bfloat16), double_quant=double_quant)
    layout, shards = shards_of(w, world)
    sizes = {tuple(t.numel() for t in gather_inputs(s)) for s in shards}
    assert len(sizes) == 1  # every rank contributes the same bytes: FSDP2 sizes the all-gather from its own
    inputs = [gather_inputs(s) for s in shards]
    assert all(t.dtype == torch.uint8 for parts in inputs for t in parts)  # only bytes travel
    gathered = tuple(torch.cat([parts[i] for parts in inputs]) for i in range(len(inputs[0])))
    back = from_gathered(gathered, shards[0], w.shape)
    assert torch.equal(back.data, w.data) and torch.equal(back.absmax, w.absmax)
    if double_quant:
        assert torch.equal(back.nested_absmax, w.nested_absmax)
    assert torch.equal(dequantize_reference(back), dequantize_reference(w))
    # each rank holds at most 1/N of the groups plus one (shard_granularity elements each), fewer chunks aside
    groups = -(-w.numel // shard_granularity(w))
    assert layout.per <= -(-groups // min(world, layout.chunks))
    if layout.chunks == world:
        assert layout.per <= groups // world + 1


def test_aligned_shards_are_the_row_chunks_bytes():
    """Where the row chunks hold whole groups (Llama-3.1-8B's widths), the windows are views of those rows."""
    w = quantize_nf4(torch.randn(512, 128))
    _, shards = shards_of(w, 4)
    for k, s in enumerate(shards):
        rows = row_slice(w, 128 * k, 128 * (k + 1))
        assert s.data.data_ptr() == rows.data.data_ptr() and torch.equal(s.absmax, rows.absmax)
        assert s.nbytes() - 4 == (w.nbytes() - 4) // 4  # 1/N of the bytes (the fp32 offset is on every rank)
