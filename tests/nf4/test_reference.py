"""The pure-PyTorch dequantizer against bitsandbytes' dequantize_4bit, bit for bit."""

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from qlora_fsdp.nf4 import NF4FormatError, dequantize_reference, nf4_from_bnb  # noqa: E402
from tests.nf4.bnb_oracle import dequantize_4bit as bnb_dequantize_4bit  # noqa: E402
from qlora_fsdp.nf4.reference import dequantize_nf4_reference  # noqa: E402

SHAPES = [(1, 64), (3, 200), (7, 13), (1, 1), (1, 63), (5, 7, 9), (64, 64), (33, 4096), (1024, 4096)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def bnb_pair(w, blocksize=64, double_quant=True):
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return packed, qs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_reference_matches_bitsandbytes(shape, out_dtype, double_quant):
    packed, qs = bnb_pair((torch.randn(shape) * 0.02).bfloat16(), 64, double_quant)
    ours = dequantize_reference(nf4_from_bnb(packed, qs), out_dtype)  # imported from bnb's state, no requantizing
    qs.dtype = out_dtype
    expected = bnb_dequantize_4bit(packed, qs)
    assert ours.shape == expected.shape and ours.dtype == out_dtype
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_reference_blocksizes_match_bitsandbytes(blocksize):
    for double_quant in (True, False):
        packed, qs = bnb_pair(torch.randn(17, 4096, dtype=torch.float16), blocksize, double_quant)
        ours = dequantize_reference(nf4_from_bnb(packed, qs), torch.bfloat16)
        qs.dtype = torch.bfloat16
        assert torch.equal(ours, bnb_dequantize_4bit(packed, qs))


def test_reference_llama_shape_matches_bitsandbytes():
    packed, qs = bnb_pair(torch.randn(11008, 4096, dtype=torch.bfloat16) * 0.02)
    ours = dequantize_reference(nf4_from_bnb(packed, qs))
    assert torch.equal(ours, bnb_dequantize_4bit(packed, qs))


def test_reference_rejects_non_float_output():
    packed, qs = bnb_pair(torch.randn(4, 64))
    w = nf4_from_bnb(packed, qs)
    with pytest.raises(NF4FormatError, match="output dtype torch.int8"):
        dequantize_nf4_reference(w.data, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset,
                                 w.shape, 64, 256, torch.int8)  # fmt: skip
