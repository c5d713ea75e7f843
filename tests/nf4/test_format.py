"""NF4 quantization against bitsandbytes (the oracle), bit for bit."""

import numpy as np
import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from qlora_fsdp.nf4 import NF4FormatError, NF4Weight, dynamic_code, nf4_code, quantize_nf4  # noqa: E402
from qlora_fsdp.nf4.fast_math import approx_reciprocal  # noqa: E402
from qlora_fsdp.nf4.format import _cuda_binary_search, _nf4_thresholds, _quantize_nf4_codes, decimal_to_fp32  # noqa: E402


SHAPES = [(1, 64), (3, 200), (7, 13), (1, 1), (1, 63), (5, 7, 9), (64, 64), (33, 4096), (1024, 4096)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def assert_same_as_bnb(w: torch.Tensor, blocksize: int, double_quant: bool) -> NF4Weight:
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(ours.data, packed.view(-1)), "packed bytes differ"
    assert torch.equal(ours.absmax, qs.absmax), "absmax differs"
    assert torch.equal(ours.quant_map, qs.code)
    assert ours.shape == qs.shape and ours.dtype == qs.dtype and ours.blocksize == qs.blocksize
    if double_quant:
        assert torch.equal(ours.nested_absmax, qs.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.nested_quant_map, qs.state2.code)
        assert torch.equal(ours.offset, qs.offset), "offset differs"
        assert ours.nested_blocksize == qs.state2.blocksize
    else:
        assert not ours.double_quant
    return ours


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_matches_bitsandbytes(shape, dtype, double_quant):
    w = (torch.randn(shape) * 0.02).to(dtype)
    assert_same_as_bnb(w, 64, double_quant)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("shape", [(3, 200), (17, 4096), (2, 9000)])
def test_quantize_blocksizes_match_bitsandbytes(blocksize, shape):
    assert_same_as_bnb(torch.randn(shape).bfloat16(), blocksize, True)
    assert_same_as_bnb(torch.randn(shape).half(), blocksize, False)


def test_quantize_llama_mlp_shape_matches_bitsandbytes():
    # the 11008 x 4096 MLP of Llama-2-7B, heavy-tailed rows, a dead row and a huge outlier
    w = torch.randn(11008, 4096, dtype=torch.bfloat16) * 0.02
    w[::97] *= 30
    w[5] = 0
    w[9, 100] = 40.0
    assert_same_as_bnb(w, 64, True)


def test_zero_blocks_and_zero_weight_match_bitsandbytes():
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    w[3:5] = torch.randn(2, 128).bfloat16()
    for double_quant in (True, False):
        assert_same_as_bnb(w, 64, double_quant)
        assert_same_as_bnb(torch.zeros(4, 64), 64, double_quant)


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map())
    # bitsandbytes' CPU path thresholds at the fp32 midpoints of the code book ...
    assert torch.equal(_nf4_thresholds("cpu"), (nf4_code()[:-1] + nf4_code()[1:]) / 2)
    # ... its CUDA tree at its literals rounded once to fp32: they differ at four thresholds
    tree = _nf4_thresholds("cpu", cuda_tree=True)
    assert (tree != _nf4_thresholds("cpu")).nonzero().flatten().tolist() == [0, 8, 12, 14]


def test_decimal_to_fp32_rounds_once():
    # 0.5016634166240692 lies within 1e-17 of the midpoint of two floats; fp64 rounding first would pick the upper
    assert decimal_to_fp32("0.5016634166240692") == 0.5016633868217468
    assert decimal_to_fp32("1.5") == 1.5 and decimal_to_fp32("-0.1") == np.float32(-0.1)
    for s in ["0.3893125355243683", "1e-3", "3.14159265358979"]:  # the usual case: no double-rounding trap
        assert decimal_to_fp32(s) == float(np.float32(float(s)))


def test_cuda_flavour_binary_search_is_nearest_code():
    # The CUDA-semantics 8-bit search (run here on CPU) picks the nearest dynamic code, exact codes included.
    # Within an ulp of a midpoint bitsandbytes compares against the fp32-rounded midpoint, so those are left out.
    code = dynamic_code()
    x = torch.cat([torch.rand(200_000) * 2 - 1, code])
    dist = (x.double()[:, None] - code.double()[None, :]).abs()
    two = dist.topk(2, dim=1, largest=False)
    clear = (two.values[:, 1] - two.values[:, 0]) > 1e-6
    assert clear.sum() > 199_000
    assert torch.equal(_cuda_binary_search(x, code)[clear], two.indices[clear, 0])


def test_cuda_flavour_nf4_codes_agree_with_cpu_flavour_off_ties():
    # Both flavours multiply by the same reciprocal for full blocks and share thresholds: same codes.
    flat = torch.randn(64 * 500)
    cpu_codes, cpu_absmax = _quantize_nf4_codes(flat, 64, on_cpu=True)
    cuda_codes, cuda_absmax = _quantize_nf4_codes(flat, 64, on_cpu=False)
    assert torch.equal(cpu_codes, cuda_codes) and torch.equal(cpu_absmax, cuda_absmax)
    # ...and an all-zero block is where they part: 0.0 (code 7) on CPU, NaN -> code 0 in CUDA
    flat[:64] = 0
    assert _quantize_nf4_codes(flat, 64, on_cpu=True)[0][:64].eq(7).all()
    assert _quantize_nf4_codes(flat, 64, on_cpu=False)[0][:64].eq(0).all()


def test_quantize_rejects_bad_input():
    with pytest.raises(NF4FormatError, match="float16/bfloat16/float32"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(NF4FormatError, match="blocksize 48"):
        quantize_nf4(torch.ones(4, 64), blocksize=48)
    with pytest.raises(NF4FormatError, match="no elements"):
        quantize_nf4(torch.ones(0, 64))


def test_weight_rejects_inconsistent_tensors():
    w = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(NF4FormatError, match="`data` has 255 elements, expected 256"):
        NF4Weight(data=w.data[:-1], absmax=w.absmax, shape=w.shape, dtype=w.dtype, nested_absmax=w.nested_absmax,
                  nested_quant_map=w.nested_quant_map, offset=w.offset)  # fmt: skip
    with pytest.raises(NF4FormatError, match="`absmax` has dtype torch.float32, expected torch.uint8"):
        NF4Weight(data=w.data, absmax=w.absmax.float(), shape=w.shape, dtype=w.dtype,
                  nested_absmax=w.nested_absmax, nested_quant_map=w.nested_quant_map, offset=w.offset)  # fmt: skip
    with pytest.raises(NF4FormatError, match="expected 512 for the stored shape"):
        NF4Weight(data=w.data, absmax=w.absmax, shape=(16, 64), dtype=w.dtype, nested_absmax=w.nested_absmax,
                  nested_quant_map=w.nested_quant_map, offset=w.offset)  # fmt: skip
    with pytest.raises(NF4FormatError, match="`nested_absmax` is missing"):
        NF4Weight(data=w.data, absmax=w.absmax, shape=w.shape, dtype=w.dtype, nested_absmax=None,
                  nested_quant_map=None, offset=None)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(1, 64), (3, 200), (7, 13), (1024, 4096), (4096, 14336)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_on_cuda_matches_bitsandbytes_cuda(shape, dtype):
    w = (torch.randn(shape, device="cuda") * 0.02).to(dtype)
    w.view(-1)[:64] = 0  # an all-zero block: bitsandbytes' CUDA kernel codes it differently from its CPU path
    for double_quant in (True, False):
        ours = assert_same_as_bnb(w, 64, double_quant)
        assert ours.device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantize_fp32_on_cuda_matches_bitsandbytes_cuda():
    """fp32 values land next to NF4 thresholds often enough to tell the approximate reciprocal from 1/x."""
    w = torch.randn(4096, 4096, device="cuda") * 0.02
    ours = assert_same_as_bnb(w, 64, True)
    exact = (w.view(-1, 64) * (1.0 / w.view(-1, 64).abs().amax(1, keepdim=True))).view(-1)
    approx = (w.view(-1, 64) * approx_reciprocal(w.view(-1, 64).abs().amax(1)).view(-1, 1)).view(-1)
    assert (exact != approx).any()  # the test can tell the two apart
    assert ours.data.numel() == w.numel() // 2
