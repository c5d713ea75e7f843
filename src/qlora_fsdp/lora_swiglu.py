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

`patch_lora_swiglu(model)` routes every Llama-style MLP (gate_proj, up_proj, down_proj, SiLU) whose gate and up are
plain single-adapter LoRA layers (lora_linear.RankScaledLoraLinear, no dropout, not merged or disabled, no DoRA)
through it on CUDA; anything else, and CPU tensors, take the module's own forward. The op is a
`torch.library.triton_op`, so compiled decoder layers trace it without a graph break.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from . import rank_product
from .lora_linear import RankScaledLoraLinear
from .nf4.triton_dequant import HAS_TRITON, kernel_for
from .rank_product import dot_options

BLOCK_T, BLOCK_I = 64, 128  # the tile of (T, I) one program computes

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
        out1_ptr, out2_ptr,  # (T, I): act (forward); d gate, d up (BACKWARD)
        T, I, R,
        BT: tl.constexpr, BI: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr, BACKWARD: tl.constexpr,
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
            tl.store(out1_ptr + offs, (da * u * sig * (1 + g * (1 - sig))).to(dtype), mask=mask)  # d gate
            tl.store(out2_ptr + offs, (da * g * sig).to(dtype), mask=mask)  # d up
        else:
            tl.store(out1_ptr + offs, (g * sig * u).to(dtype), mask=mask)  # act


def _gate_up_reference(base_g, base_u, hg, hu, wg, wu) -> tuple[Tensor, Tensor]:
    """gate and up as fp32, each rounded once to the base outputs' dtype (the kernel's math in PyTorch ops)."""
    gate = (base_g.float() + hg.float() @ wg.float().t()).to(base_g.dtype)
    up = (base_u.float() + hu.float() @ wu.float().t()).to(base_u.dtype)
    return gate.float(), up.float()


def lora_swiglu_reference(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
    """act in PyTorch ops, the same math and roundings as the kernel."""
    g, u = _gate_up_reference(base_g, base_u, hg, hu, wg, wu)
    return (g * torch.sigmoid(g) * u).to(base_g.dtype)


def lora_swiglu_backward_reference(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor,
                                   grad_act: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d gate, d up) in PyTorch ops, the same math and roundings as the kernel."""
    g, u = _gate_up_reference(base_g, base_u, hg, hu, wg, wu)
    da, sig = grad_act.float(), torch.sigmoid(g)
    return (da * u * sig * (1 + g * (1 - sig))).to(base_g.dtype), (da * g * sig).to(base_g.dtype)


def _launch(kernel, base_g, base_u, hg, hu, wg, wu, grad_act=None):
    t, i = base_g.shape
    r = hg.shape[1]
    backward = grad_act is not None
    out1 = torch.empty_like(base_g)
    out2 = torch.empty_like(base_g) if backward else out1
    grid = (triton.cdiv(t, BLOCK_T), triton.cdiv(i, BLOCK_I))
    kernel[grid](base_g, base_u, hg, hu, wg, wu, grad_act if backward else base_g, out1, out2, t, i, r, BT=BLOCK_T,
                 BI=BLOCK_I, **dot_options(r, base_g.dtype), BACKWARD=backward, num_warps=4)  # fmt: skip
    return (out1, out2) if backward else out1


@torch.library.triton_op("qlora_fsdp::lora_swiglu", mutates_args=())
def lora_swiglu_op(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
    """act of contiguous 2-D inputs of one dtype (see the module docstring)."""
    kernel = kernel_for(_lora_swiglu_kernel, base_g) if HAS_TRITON else None
    if kernel is not None:
        return _launch(kernel, base_g, base_u, hg, hu, wg, wu)
    return lora_swiglu_reference(base_g, base_u, hg, hu, wg, wu)


@torch.library.triton_op("qlora_fsdp::lora_swiglu_backward", mutates_args=())
def lora_swiglu_backward_op(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor,
                            grad_act: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d gate, d up): gate and up recomputed from the forward's inputs, then the SwiGLU derivative."""
    grad_act = grad_act.contiguous()
    kernel = kernel_for(_lora_swiglu_kernel, base_g) if HAS_TRITON else None
    if kernel is not None:
        return _launch(kernel, base_g, base_u, hg, hu, wg, wu, grad_act)
    return lora_swiglu_backward_reference(base_g, base_u, hg, hu, wg, wu, grad_act)


class LoraSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
        ctx.save_for_backward(base_g, base_u, hg, hu, wg, wu)  # gate and up are recomputed in backward's kernel
        return torch.ops.qlora_fsdp.lora_swiglu(base_g, base_u, hg, hu, wg, wu)

    @staticmethod
    def backward(ctx, grad_act: Tensor):
        base_g, base_u, hg, hu, wg, wu = ctx.saved_tensors
        grad_gate, grad_up = torch.ops.qlora_fsdp.lora_swiglu_backward(base_g, base_u, hg, hu, wg, wu, grad_act)
        return (grad_gate, grad_up, grad_gate @ wg, grad_up @ wu, grad_gate.t() @ hg, grad_up.t() @ hu)


def lora_swiglu(base_g: Tensor, base_u: Tensor, hg: Tensor, hu: Tensor, wg: Tensor, wu: Tensor) -> Tensor:
    """act = silu(base_g + hg @ wg^T) * (base_u + hu @ wu^T), (T, I) in base_g's dtype, differentiable in all six
    inputs; the rank-r inputs are cast to that dtype (as autocast would for lora_B). ValueError on shapes that do
    not fit together."""
    t, i = base_g.shape
    r = hg.shape[-1]
    if base_u.shape != (t, i) or hg.shape != (t, r) or hu.shape != (t, r) or wg.shape != (i, r) or wu.shape != (i, r):
        raise ValueError(f"lora_swiglu: base (T, I), h (T, r), w (I, r) expected, got base {tuple(base_g.shape)}, "
                         f"{tuple(base_u.shape)}, h {tuple(hg.shape)}, {tuple(hu.shape)}, w {tuple(wg.shape)}, "
                         f"{tuple(wu.shape)}")  # fmt: skip
    dtype = base_g.dtype
    args = [a.to(dtype).contiguous() for a in (base_g, base_u, hg, hu, wg, wu)]
    return LoraSwiGLUFunction.apply(*args)


def _single_plain_adapter(module: nn.Module) -> str | None:
    """The adapter of a RankScaledLoraLinear with one active vanilla adapter, no dropout and no B bias; else None."""
    if not isinstance(module, RankScaledLoraLinear):
        return None
    name = module.single_unbiased_adapter(module.vanilla_adapters())
    return name if name is not None and isinstance(module.lora_dropout[name], nn.Identity) else None


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _fused_mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    names = [_single_plain_adapter(self.gate_proj), _single_plain_adapter(self.up_proj)]
    if x.device.type not in rank_product.FUSE_DEVICES or None in names:
        return type(self).forward(self, x)
    (base_g, hg, wg), (base_u, hu, wu) = (
        (proj.base_layer(x), proj.scaled_rank_activations(x, name), proj.lora_B[name].weight)  # (..., I), (..., r)
        for proj, name in zip((self.gate_proj, self.up_proj), names)
    )
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  (..., n) -> (T, n)
    act = lora_swiglu(flat(base_g), flat(base_u), flat(hg), flat(hu), wg, wu)  # (T, I)
    return self.down_proj(act.view(base_g.shape))


def patch_lora_swiglu(model: nn.Module) -> int:
    """Route the SiLU MLPs of `model` (gate_proj, up_proj, down_proj, act_fn) through lora_swiglu where it applies
    (see the module docstring); the number of MLPs patched. Each checks its adapters at every call and falls back to
    its own forward."""
    patched = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            patched += 1
    return patched
