"""The approximate reciprocal bitsandbytes' CUDA quantizer uses, so CUDA quantization matches it bit for bit.

bitsandbytes builds its CUDA kernels with `--use_fast_math`, so the `1.0f / absmax` of its blockwise quantizer
compiles to the hardware's approximate reciprocal (`rcp.approx.ftz.f32`, within 1 ulp of the exact one). For
fp16/bf16 weights the difference almost never changes a code; for fp32 weights it does, near NF4 thresholds.
This one-instruction Triton kernel computes the same reciprocal. Without CUDA or Triton: the exact one.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

BLOCK = 1024

if HAS_TRITON:

    @triton.jit
    def _rcp_approx_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=1.0)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)  # fmt: skip
        tl.store(out_ptr + offs, r, mask=mask)


def approx_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x as a CUDA fast-math build computes it (fp32); the exact 1/x off CUDA."""
    if not (HAS_TRITON and x.is_cuda):
        return 1.0 / x
    x = x.contiguous().float()
    out = torch.empty_like(x)
    _rcp_approx_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK)
    return out
