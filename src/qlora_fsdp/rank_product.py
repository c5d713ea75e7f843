"""The rank-r LoRA product as a Triton tile, for kernels that add it to a base output instead of writing it.

    lora = rank_product_tile(h_ptr, w_ptr, rows, cols, T, N, R, ...)    # (BT, BN) fp32 tile of h @ w^T
    with h (T, R) the scaled rank-r activations lora_A(x) * s and w (N, R) the lora_B weight, both contiguous

R is padded to RP, a power of two of at least 16 (tl.dot's smallest K); the padding and the rows and columns past
T and N load as zeros. The product runs on the tensor cores with fp32 accumulation ("tf32" input precision only
matters for fp32 inputs; 16-bit inputs multiply exactly). Triton's interpreter multiplies 16-bit floats as raw
integers, so there the tiles are cast to fp32 first (DOT_FP32).
"""

from __future__ import annotations

import torch

from .nf4.triton_dequant import HAS_TRITON, triton_interpreting

FUSE_DEVICES = ("cuda",)  # device types whose LoRA layers take the fused kernels (tests add "cpu", interpreted)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def rank_product_tile(
        h_ptr, w_ptr,  # (T, R), (N, R) contiguous
        rows, cols,  # (BT,), (BN,) indices of the tile
        T, N, R,
        RP: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        ks = tl.arange(0, RP)  # (RP,)
        k_ok = ks < R
        h_offs = rows[:, None].to(tl.int64) * R + ks[None, :]  # (BT, RP)
        w_offs = cols[None, :].to(tl.int64) * R + ks[:, None]  # (RP, BN): the transposed weight tile
        h = tl.load(h_ptr + h_offs, mask=(rows < T)[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_offs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
        if DOT_FP32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        return tl.dot(h, w, input_precision=PRECISION)  # (BT, BN) fp32


def dot_options(r: int, dtype: torch.dtype) -> dict:
    """The constexpr arguments of rank_product_tile for rank r and inputs of dtype."""
    interpreting = triton_interpreting()
    return {"RP": max(16, triton.next_power_of_2(r)), "DOT_FP32": interpreting,
            "PRECISION": "ieee" if interpreting or dtype == torch.float32 else "tf32"}  # fmt: skip
