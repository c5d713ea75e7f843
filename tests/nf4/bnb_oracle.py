"""bitsandbytes' dequantize_4bit as the test oracle, on any CPU.

On CPUs with AVX-512, bitsandbytes 0.50 dispatches CPU tensors to a native kernel that mis-dequantizes
weights whose rows split a quantization block (e.g. 64x160 or 2x96 at blocksize 64: its error against
the original weight is twice that of the portable path). On CPU we therefore take bitsandbytes' own
portable implementation (`backends/default/ops.py`, the code its native kernel is meant to agree with),
uncompiled; on CUDA, `bitsandbytes.functional.dequantize_4bit` as it is.
"""

import torch
import bitsandbytes.functional as bnbF
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code

_portable = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip its torch.compile


def dequantize_4bit(packed: torch.Tensor, qs) -> torch.Tensor:
    if packed.device.type != "cpu":
        return bnbF.dequantize_4bit(packed, qs)
    absmax = qs.absmax
    if qs.nested:  # as functional.dequantize_4bit does before it dispatches
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = _get_4bit_code(qs.quant_type, packed.device)
    return _portable(packed.view(torch.uint8).reshape(-1), absmax.float(), code, qs.blocksize, qs.shape, qs.dtype)
