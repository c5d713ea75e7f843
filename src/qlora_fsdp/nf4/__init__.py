"""NF4 4-bit weights: bitsandbytes' format, a pure-PyTorch reference dequantizer and a Triton kernel.

    w = quantize_nf4(weight)            # bit-exact with bitsandbytes.functional.quantize_4bit(..., "nf4")
    dense = dequantize_nf4(w, bf16)     # one Triton launch on CUDA; the reference on CPU
"""

from .bnb import nf4_from_bnb, nf4_from_state_dict, nf4_to_bnb, nf4_to_state_dict
from .format import NF4_CODE, NF4FormatError, NF4Weight, dynamic_code, nf4_code, quantize_nf4, validate
from .reference import dequantize_reference
from .triton_dequant import dequantize_nf4

__all__ = [
    "NF4_CODE",
    "NF4FormatError",
    "NF4Weight",
    "dequantize_nf4",
    "dequantize_reference",
    "dynamic_code",
    "nf4_code",
    "nf4_from_bnb",
    "nf4_from_state_dict",
    "nf4_to_bnb",
    "nf4_to_state_dict",
    "quantize_nf4",
    "validate",
]
