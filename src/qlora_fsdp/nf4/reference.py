"""Pure-PyTorch NF4 dequantization: the oracle for the kernel tests and the path on CPU.

Bit-exact with `bitsandbytes.functional.dequantize_4bit` for fp16, bf16 and fp32 outputs: every product is
formed in fp32 and rounded once to the output dtype (round to nearest even), and the double-quantized absmax
is `code[q] * nested_absmax` rounded, then `+ offset` rounded (never one fused multiply-add).
"""

from __future__ import annotations

import math

import torch

from .format import FLOAT_DTYPES, NF4FormatError, NF4Weight


def dequantize_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """(n_blocks,) block absmax in fp32; a no-op when there is no double quantization."""
    if nested_absmax is None:
        return absmax
    n_blocks = absmax.numel()
    scales = nested_absmax.repeat_interleave(nested_blocksize)[:n_blocks]  # (n_blocks,)
    # Two separate ops: the multiply rounds before the add, as in bitsandbytes.
    a = nested_quant_map[absmax.long()] * scales
    return a + offset


def unpack_codes(data: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2),) uint8 -> (n,) int64 NF4 codes; the high nibble is the even element."""
    return torch.stack([data >> 4, data & 0xF], dim=-1).reshape(-1)[:n].long()


def dequantize_nf4_reference(
    data: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int] | torch.Size,
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize the NF4 tensors of one weight to a contiguous `shape` tensor of `dtype`."""
    if dtype not in FLOAT_DTYPES:
        raise NF4FormatError(f"dequantize_nf4: output dtype {dtype} is not one of float16, bfloat16, float32")
    n = math.prod(shape)
    scales = dequantize_absmax(absmax, nested_absmax, nested_quant_map, offset, nested_blocksize)
    values = quant_map[unpack_codes(data, n)]  # (n,) fp32
    values = values * scales.repeat_interleave(blocksize)[:n]
    return values.to(dtype).view(shape)


def dequantize_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`NF4Weight` -> dense tensor of `w.shape` in `dtype` (default: the weight's original dtype)."""
    return dequantize_nf4_reference(
        w.data, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset,
        w.shape, w.blocksize, w.nested_blocksize, dtype or w.dtype,
    )  # fmt: skip
