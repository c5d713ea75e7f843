"""A LoRA layer's output in one Triton kernel: the rank-r product added to the base output tile by tile.

    y = lora_add(base, h, w)          # (T, N) = base + h @ w^T
        base (T, N): the NF4 base output x W^T; h (T, r): the scaled rank-r activations lora_A(x) * s;
        w (N, r): the lora_B weight

peft writes B(h) as a (T, N) tensor and a second kernel adds it to the base output: in eager mode, for the q, k, v,
o and down projections of a Llama 3.1 8B layer at 8,192 tokens, 0.47 GB of writes and reads that carry a rank-16
term. Here each (T, N) tile computes its rank-r product on the tensor cores (rank_product.py), adds it to the base
tile in fp32 and writes y once, rounded once (peft rounds the product, then the sum). Under torch.compile inductor
already folds peft's add into the kernel that consumes y (RoPE, the residual add), so there the traffic is about
the same either way. Backward is the LoRA matmuls of eager mode: d base = d y, d h = d y @ w, d w = d y^T @ h.

RankScaledLoraLinear (lora/linear.py) takes this path on CUDA for one plain adapter (no lora_B bias); the MLP's gate
and up take lora_swiglu.py instead (lora/fused_mlp.py). The op is a `torch.library.triton_op`: compiled layers trace it without a graph
break. CPU tensors run it under Triton's interpreter (tests) and otherwise in PyTorch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import rank_product
from ..nf4.triton_dequant import HAS_TRITON
from .rank_product import dot_options

TILE = (64, 128, 4)  # the (T, N) tile one program computes, and its warps (benchmarks/lora_kernels.py: 1.05x the
# bytes at copy bandwidth at (8192, 4096) on an H100)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .rank_product import rank_product_tile

    @triton.jit
    def _lora_add_kernel(
        base_ptr,  # (T, N) contiguous
        h_ptr, w_ptr,  # (T, R), (N, R) contiguous
        out_ptr,  # (T, N)
        T, N, R,
        BT: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BT + tl.arange(0, BT)  # (BT,)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,)
        lora = rank_product_tile(h_ptr, w_ptr, rows, cols, T, N, R, RP, PRECISION, DOT_FP32)  # (BT, BN) fp32
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]  # (BT, BN)
        mask = (rows < T)[:, None] & (cols < N)[None, :]
        base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (base + lora).to(out_ptr.dtype.element_ty), mask=mask)


@rank_product.without_autocast
def lora_add_reference(base: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """The kernel's math in PyTorch ops: fp32 (fp64 for fp64 inputs) product and sum, rounded once to base's dtype."""
    acc = torch.promote_types(base.dtype, torch.float32)
    return (base.to(acc) + h.to(acc) @ w.to(acc).t()).to(base.dtype)


def _launch(kernel, base: Tensor, h: Tensor, w: Tensor, tile=None) -> Tensor:
    """tile: (BT, BN, warps), by default TILE. ValueError (one line) for a rank whose tiles exceed the GPU's shared
    memory per block (rank_product.check_fused_rank)."""
    block_t, block_n, num_warps = tile or TILE
    t, n = base.shape
    r = h.shape[1]
    rank_product.check_fused_rank(r, base.dtype, base.device)
    out = torch.empty_like(base)
    grid = (triton.cdiv(t, block_t), triton.cdiv(n, block_n))
    kernel[grid](base, h, w, out, t, n, r, BT=block_t, BN=block_n, **dot_options(r, base.dtype), num_warps=num_warps)
    return out


@torch.library.triton_op("qlora_fsdp::lora_add", mutates_args=())
def lora_add_op(base: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """base + h @ w^T for contiguous 2-D inputs of one dtype, at least one row (see the module docstring)."""
    kernel = rank_product.lora_kernel(_lora_add_kernel, base)
    if kernel is not None:
        return _launch(kernel, base, h, w)
    return lora_add_reference(base, h, w)


def _lora_add_fused(base: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """lora_add_op: its kernel launched directly in plain eager CUDA code (rank_product.launches_directly)."""
    if rank_product.launches_directly(base):
        return _launch(_lora_add_kernel, base, h, w)
    return torch.ops.qlora_fsdp.lora_add(base, h, w)


class LoraAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base: Tensor, h: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(h, w)
        return _lora_add_fused(base, h, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w = ctx.saved_tensors
        grad_h = grad @ w if ctx.needs_input_grad[1] else None  # (T, r)
        grad_w = grad.t() @ h if ctx.needs_input_grad[2] else None  # (N, r)
        return grad, grad_h, grad_w


def lora_add(base: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """base + h @ w^T: base (..., N), h (..., r), w (N, r) -> (..., N) in base's dtype, differentiable in all three;
    h and w are cast to that dtype (as autocast would for lora_B). ValueError on shapes that do not fit together."""
    n, r = base.shape[-1], h.shape[-1]
    if h.shape[:-1] != base.shape[:-1] or w.shape != (n, r):
        raise ValueError(f"lora_add: base (..., N), h (..., r), w (N, r) expected, got base {tuple(base.shape)}, "
                         f"h {tuple(h.shape)}, w {tuple(w.shape)}")  # fmt: skip
    dtype = base.dtype
    flat_base, flat_h = base.reshape(-1, n), h.reshape(-1, r)
    if flat_base.shape[0] == 0:
        return base + (h.to(dtype) @ w.to(dtype).t())
    out = LoraAddFunction.apply(flat_base.contiguous(), flat_h.to(dtype).contiguous(), w.to(dtype).contiguous())
    return out.view(base.shape)
