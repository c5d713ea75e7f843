"""The LoRA terms of gate and up added inside the SwiGLU kernel: the (T, I) LoRA products are never written.

    act = lora_swiglu(base_g, base_u, hg, hu, wg, wu)      # (T, I)
    with gate = base_g + hg @ wg^T,  up = base_u + hu @ wu^T,  act = silu(gate) * up
         base_g, base_u (T, I): the NF4 base outputs; hg, hu (T, r): the scaled rank-r activations lora_A(x) * s;
         wg, wu (I, r): the lora_B weights

peft's MLP writes each LoRA product B(h s) as a (T, I) tensor (14,336 wide for Llama 3.1 8B) and the SwiGLU reads it
back beside the base output: per layer, at 8,192 tokens, 0.94 GB of traffic that carries a rank-16 term. Here one
Triton kernel per (T, I) tile computes the two rank-r products on the tensor cores (`tl.dot`, fp32 accumulation,
rank_product.py), adds them to the base outputs and writes act alone. Backward keeps the base outputs (not gate and
up: the forward writes neither) and its own kernel recomputes gate and up per tile, then writes the SwiGLU
derivative; the LoRA matmuls are eager mode's:
    d gate = d act * up * s(g) (1 + g (1 - s(g))),  d up = d act * silu(g),  with s the sigmoid and g = gate
    d base = d gate,  d h = d gate @ w,  d w = d gate^T @ h                  (the same for up)
Rounding: gate and up are rounded once (peft rounds the LoRA product, then the sum), the same in both passes; act
and the two derivatives once each.

    act, h = lora_swiglu_down_a(base_g, base_u, hg, hu, wg, wu, a_down)     # h = act @ a_down^T  (T, r_d)
         a_down (r_d, I): the down projection's lora_A weight, so h is its rank activations before scaling

The down projection reads act twice, in its NF4 base matmul and in its lora_A; in backward autograd then adds the
two input gradients, d act = (d y W_down) + d h @ a_down: a (T, I) product written, then read back with the base
term by an add kernel that writes the sum (0.94 GB a layer at 8,192 tokens). Taking lora_A into the function, the
backward kernel adds the rank-r term to d act per tile instead (d a_down = d h^T @ act, act saved as lora_A saved it).

The model patch that routes Llama-style MLPs through these functions is lora/fused_mlp.py. The ops are
`torch.library.triton_op`s, so compiled decoder layers trace them without a graph break; the autograd Functions run
their PyTorch references (below) on CPU tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import rank_product
from .lora_add import lora_add
from ..nf4.triton_dequant import HAS_TRITON
from .rank_product import dot_options

# the tile of (T, I) one program computes, and its warps; the fastest of benchmarks/lora_kernels.py on an H100 at
# (8192, 14336), r=16: forward 254 us, backward 445 us (1.08x and 1.14x the bytes at copy bandwidth; 64 x 128 took
# 324 and 563)
FORWARD_TILE = (32, 128, 4)
BACKWARD_TILE = (16, 128, 4)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .rank_product import rank_product_tile

    @triton.jit
    def _gate_up_tile(bg_ptr, bu_ptr, hg_ptr, hu_ptr, wg_ptr, wu_ptr, rows, cols, offs, mask, T, I, R,
                      RP: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):  # fmt: skip
        """gate and up of one (BT, BI) tile as fp32, each rounded once to the base outputs' dtype."""
        lora_g = rank_product_tile(hg_ptr, wg_ptr, rows, cols, T, I, R, RP, PRECISION, DOT_FP32)  # (BT, BI) fp32
        lora_u = rank_product_tile(hu_ptr, wu_ptr, rows, cols, T, I, R, RP, PRECISION, DOT_FP32)
        dtype = bg_ptr.dtype.element_ty
        gate = (tl.load(bg_ptr + offs, mask=mask, other=0.0).to(tl.float32) + lora_g).to(dtype)
        up = (tl.load(bu_ptr + offs, mask=mask, other=0.0).to(tl.float32) + lora_u).to(dtype)
        return gate.to(tl.float32), up.to(tl.float32)

    @triton.jit
    def _lora_swiglu_kernel(
        bg_ptr, bu_ptr,  # (T, I) base outputs, contiguous
        hg_ptr, hu_ptr,  # (T, R) scaled rank-R activations, contiguous
        wg_ptr, wu_ptr,  # (I, R) lora_B weights, contiguous
        da_ptr,  # (T, I) d act (BACKWARD)
        dh_ptr, ad_ptr,  # (T, RD) d h, (I, RD) a_down^T: d act += d h @ a_down (BACKWARD and DOWN_A)
        out1_ptr, out2_ptr,  # (T, I): act (forward); d gate, d up (BACKWARD)
        T, I, R, RD,
        BT: tl.constexpr, BI: tl.constexpr, RP: tl.constexpr, RPD: tl.constexpr, PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr, BACKWARD: tl.constexpr, DOWN_A: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BT + tl.arange(0, BT)  # (BT,)
        cols = tl.program_id(1) * BI + tl.arange(0, BI)  # (BI,)
        offs = rows[:, None].to(tl.int64) * I + cols[None, :]  # (BT, BI)
        mask = (rows < T)[:, None] & (cols < I)[None, :]
        g, u = _gate_up_tile(bg_ptr, bu_ptr, hg_ptr, hu_ptr, wg_ptr, wu_ptr, rows, cols, offs, mask, T, I, R,
                             RP, PRECISION, DOT_FP32)  # fmt: skip
        sig = tl.sigmoid(g)
        dtype = out1_ptr.dtype.element_ty
        if BACKWARD:
            da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if DOWN_A:
                da += rank_product_tile(dh_ptr, ad_ptr, rows, cols, T, I, RD, RPD, PRECISION, DOT_FP32)
            tl.store(out1_ptr + offs, (da * u * sig * (1 + g * (1 - sig))).to(dtype), mask=mask)  # d gate
            tl.store(out2_ptr + offs, (da * g * sig).to(dtype), mask=mask)  # d up
        else:
            tl.store(out1_ptr + offs, (g * sig * u).to(dtype), mask=mask)  # act


def _gate_up_reference(base_g, base_u, hg, hu, wg, wu) -> tuple[Tensor, Tensor]:
    """gate and up as fp32 (fp64 for fp64 inputs), each rounded once to the base outputs' dtype (the kernel's math in
    PyTorch ops)."""
    acc = torch.promote_types(base_g.dtype, torch.float32)
    gate = (base_g.to(acc) + hg.to(acc) @ wg.to(acc).t()).to(base_g.dtype)
    up = (base_u.to(acc) + hu.to(acc) @ wu.to(acc).t()).to(base_u.dtype)
    return gate.to(acc), up.to(acc)


@rank_product.without_autocast
def lora_swiglu_reference(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
    """act in PyTorch ops, the same math and roundings as the kernel."""
    g, u = _gate_up_reference(base_g, base_u, hg, hu, wg, wu)
    return (g * torch.sigmoid(g) * u).to(base_g.dtype)


@rank_product.without_autocast
def lora_swiglu_backward_reference(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor,
                                   grad_act: Tensor, grad_h: Tensor | None = None,
                                   a_down_t: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d gate, d up) in PyTorch ops, the same math and roundings as the kernel."""
    g, u = _gate_up_reference(base_g, base_u, hg, hu, wg, wu)
    da, sig = grad_act.to(g.dtype), torch.sigmoid(g)
    if grad_h is not None:
        da = da + grad_h.to(g.dtype) @ a_down_t.to(g.dtype).t()
    return (da * u * sig * (1 + g * (1 - sig))).to(base_g.dtype), (da * g * sig).to(base_g.dtype)


def _launch(kernel, base_g, base_u, hg, hu, wg, wu, grad_act=None, grad_h=None, a_down_t=None, tile=None):
    """tile: (BT, BI, warps), by default FORWARD_TILE or BACKWARD_TILE. ValueError (one line) for ranks whose tiles
    exceed the GPU's shared memory per block (rank_product.check_fused_rank)."""
    t, i = base_g.shape
    r = hg.shape[1]
    backward, down_a = grad_act is not None, grad_h is not None
    block_t, block_i, num_warps = tile or (BACKWARD_TILE if backward else FORWARD_TILE)
    rd = grad_h.shape[1] if down_a else r
    rank_product.check_fused_rank(max(r, rd), base_g.dtype, base_g.device)
    out1 = torch.empty_like(base_g)
    out2 = torch.empty_like(base_g) if backward else out1
    options = dot_options(r, base_g.dtype)
    grid = (triton.cdiv(t, block_t), triton.cdiv(i, block_i))
    kernel[grid](base_g, base_u, hg, hu, wg, wu, grad_act if backward else base_g, grad_h if down_a else hg,
                 a_down_t if down_a else wg, out1, out2, t, i, r, rd, BT=block_t, BI=block_i, **options,
                 RPD=dot_options(rd, base_g.dtype)["RP"], BACKWARD=backward, DOWN_A=down_a,
                 num_warps=num_warps)  # fmt: skip
    return (out1, out2) if backward else out1


@torch.library.triton_op("qlora_fsdp::lora_swiglu", mutates_args=())
def lora_swiglu_op(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
    """act of contiguous 2-D inputs of one dtype (see the module docstring)."""
    kernel = rank_product.lora_kernel(_lora_swiglu_kernel, base_g)
    if kernel is not None:
        return _launch(kernel, base_g, base_u, hg, hu, wg, wu)
    return lora_swiglu_reference(base_g, base_u, hg, hu, wg, wu)


@torch.library.triton_op("qlora_fsdp::lora_swiglu_backward", mutates_args=())
def lora_swiglu_backward_op(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor,
                            grad_act: Tensor, grad_h: Tensor | None = None,
                            a_down_t: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d gate, d up): gate and up recomputed from the forward's inputs, then the SwiGLU derivative of
    d act = grad_act (+ grad_h @ a_down_t^T: grad_h (T, r_d), a_down_t (I, r_d) contiguous)."""
    grad_act = grad_act.contiguous()
    grad_h = grad_h.contiguous() if grad_h is not None else None
    kernel = rank_product.lora_kernel(_lora_swiglu_kernel, base_g)
    if kernel is not None:
        return _launch(kernel, base_g, base_u, hg, hu, wg, wu, grad_act, grad_h, a_down_t)
    return lora_swiglu_backward_reference(base_g, base_u, hg, hu, wg, wu, grad_act, grad_h, a_down_t)


def _swiglu_fused(base_g, base_u, hg, hu, wg, wu) -> Tensor:
    """lora_swiglu_op: its kernel launched directly in plain eager CUDA code (rank_product.launches_directly)."""
    if rank_product.launches_directly(base_g):
        return _launch(_lora_swiglu_kernel, base_g, base_u, hg, hu, wg, wu)
    return torch.ops.qlora_fsdp.lora_swiglu(base_g, base_u, hg, hu, wg, wu)


def _swiglu_backward_fused(base_g, base_u, hg, hu, wg, wu, grad_act, grad_h=None, a_down_t=None) -> tuple:
    """lora_swiglu_backward_op: its kernel launched directly in plain eager CUDA code (as _swiglu_fused)."""
    if rank_product.launches_directly(base_g):
        grad_h = grad_h.contiguous() if grad_h is not None else None
        return _launch(_lora_swiglu_kernel, base_g, base_u, hg, hu, wg, wu, grad_act.contiguous(), grad_h, a_down_t)
    return torch.ops.qlora_fsdp.lora_swiglu_backward(base_g, base_u, hg, hu, wg, wu, grad_act, grad_h, a_down_t)


class LoraSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
        ctx.save_for_backward(base_g, base_u, hg, hu, wg, wu)  # gate and up are recomputed in backward's kernel
        return _swiglu_fused(base_g, base_u, hg, hu, wg, wu)

    @staticmethod
    def backward(ctx, grad_act: Tensor):
        base_g, base_u, hg, hu, wg, wu = ctx.saved_tensors
        grad_gate, grad_up = _swiglu_backward_fused(base_g, base_u, hg, hu, wg, wu, grad_act)
        return _with_lora_grads(grad_gate, grad_up, hg, hu, wg, wu)


def _with_lora_grads(grad_gate: Tensor, grad_up: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> tuple:
    """The gradients of (base_g, base_u, hg, hu, wg, wu) from d gate and d up: the LoRA matmuls of eager mode."""
    return grad_gate, grad_up, grad_gate @ wg, grad_up @ wu, grad_gate.t() @ hg, grad_up.t() @ hu


class LoraSwiGLUDownAFunction(torch.autograd.Function):
    """LoraSwiGLUFunction and the down projection's lora_A: (act, act @ a_down^T)."""

    @staticmethod
    def forward(ctx, base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor,
                a_down: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        act = _swiglu_fused(base_g, base_u, hg, hu, wg, wu)  # (T, I)
        ctx.save_for_backward(base_g, base_u, hg, hu, wg, wu, a_down, act)  # act for d a_down, as lora_A saves it
        return act, act @ a_down.t()  # (T, I), (T, r_d)

    @staticmethod
    def backward(ctx, grad_act: Tensor, grad_h: Tensor | None):
        base_g, base_u, hg, hu, wg, wu, a_down, act = ctx.saved_tensors
        if grad_act is None:
            grad_act = torch.zeros_like(act)
        a_down_t = a_down.t().contiguous() if grad_h is not None else None  # (I, r_d)
        grad_gate, grad_up = _swiglu_backward_fused(base_g, base_u, hg, hu, wg, wu, grad_act, grad_h, a_down_t)
        grad_a = grad_h.t() @ act if grad_h is not None else None  # (r_d, I)
        return *_with_lora_grads(grad_gate, grad_up, hg, hu, wg, wu), grad_a


def _checked(base_g, base_u, hg, hu, wg, wu) -> list[Tensor]:
    t, i = base_g.shape
    r = hg.shape[-1]
    if base_u.shape != (t, i) or hg.shape != (t, r) or hu.shape != (t, r) or wg.shape != (i, r) or wu.shape != (i, r):
        raise ValueError(f"lora_swiglu: base (T, I), h (T, r), w (I, r) expected, got base {tuple(base_g.shape)}, "
                         f"{tuple(base_u.shape)}, h {tuple(hg.shape)}, {tuple(hu.shape)}, w {tuple(wg.shape)}, "
                         f"{tuple(wu.shape)}")  # fmt: skip
    return [a.to(base_g.dtype).contiguous() for a in (base_g, base_u, hg, hu, wg, wu)]


def lora_swiglu(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
    """act = silu(base_g + hg @ wg^T) * (base_u + hu @ wu^T), (T, I) in base_g's dtype, differentiable in all six
    inputs; the rank-r inputs are cast to that dtype (as autocast would for lora_B). ValueError on shapes that do
    not fit together."""
    return LoraSwiGLUFunction.apply(*_checked(base_g, base_u, hg, hu, wg, wu))


def lora_swiglu_down_a(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor,
                       a_down: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(act, act @ a_down^T): lora_swiglu and the down projection's rank activations before scaling, a_down (r_d, I)
    its lora_A weight, cast to base_g's dtype; differentiable in all seven inputs (see the module docstring)."""
    args = _checked(base_g, base_u, hg, hu, wg, wu)
    if a_down.dim() != 2 or a_down.shape[1] != base_g.shape[1]:
        raise ValueError(f"lora_swiglu_down_a: a_down (r, I={base_g.shape[1]}) expected, got {tuple(a_down.shape)}")
    return LoraSwiGLUDownAFunction.apply(*args, a_down.to(base_g.dtype).contiguous())
