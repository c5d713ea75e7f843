"""Row shards of NF4 weights and the uint8 all-gather that rebuilds them (FSDP2's view, simulated in one process)."""

import pytest
import torch

from qlora_fsdp.nf4 import NF4FormatError, dequantize_reference, quantize_nf4
from qlora_fsdp.nf4.sharding import check_shardable, from_gathered, gather_inputs, row_slice


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shards_hold_1_over_n_and_gather_back_bit_exact(world_size, double_quant):
    w = quantize_nf4(torch.randn(512, 128, dtype=torch.bfloat16), double_quant=double_quant)
    check_shardable(w, world_size)
    rows = 512 // world_size
    shards = [row_slice(w, r * rows, (r + 1) * rows) for r in range(world_size)]
    sharded_bytes = lambda x: x.nbytes() - (4 if x.double_quant else 0)  # noqa: E731 (the fp32 offset is replicated)
    for s in shards:  # each rank holds 1/N of the bytes at rest
        assert sharded_bytes(s) * world_size == sharded_bytes(w)
    inputs = [gather_inputs(s) for s in shards]
    assert all(t.dtype == torch.uint8 for parts in inputs for t in parts)  # only bytes travel
    gathered = tuple(torch.cat([parts[i] for parts in inputs]) for i in range(len(inputs[0])))
    assert sum(t.numel() for t in gathered) == sharded_bytes(w)  # the 4-bit size
    back = from_gathered(gathered, shards[0], w.shape)
    assert torch.equal(back.data, w.data) and torch.equal(back.absmax, w.absmax)
    assert torch.equal(dequantize_reference(back), dequantize_reference(w))
    for r, s in enumerate(shards):
        assert torch.equal(dequantize_reference(s), dequantize_reference(w)[r * rows : (r + 1) * rows])


@pytest.mark.parametrize("world_size", [3, 8])
def test_world_size_that_splits_blocks_is_refused(world_size):
    w = quantize_nf4(torch.randn(512, 128))  # 8 ranks: 64 rows x 128 = 8192 elements, half a nested group
    with pytest.raises(NF4FormatError, match=f"cannot be split into {world_size} row shards"):
        check_shardable(w, world_size)
