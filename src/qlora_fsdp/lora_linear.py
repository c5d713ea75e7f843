"""peft's LoRA Linear with the scaling applied on the rank side.

    peft:  y = base(x) + B(A(drop(x))) * s          x (T, in), A: in -> r, B: r -> out
    here:  y = base(x) + B(A(drop(x)) * s)          the same function; s multiplies a (T, r) tensor

In backward, peft's form hands B the gradient times s: autograd, and a compiled layer, materialize that (T, out)
product beside the unscaled gradient the base weight's input gradient needs. Here B gets the unscaled gradient
and s is applied to (T, r) tensors only. For the Llama 3.1 8B MLP at 2,048 tokens that is two (T, 14,336) bf16
tensors (117 MB) less at the backward peak. The parameters, their names, the saved adapters, merging and every
other peft feature are peft's own: only the vanilla-LoRA forward is overridden (DoRA and other variants, mixed
adapter batches, merged or disabled adapters take peft's path). Rounding differs from peft's order in the last
bit of the LoRA term.

Under torch.compile on CUDA the up-projection `B(h)` is written as r multiply-adds into the base output
(`LoraUp`): inductor then fuses the LoRA term into whatever reads the output next (SwiGLU, RoPE, the residual add),
and the (T, out) LoRA product is never written to memory nor read back. Backward is two matmuls as in eager mode.

Registered through peft's custom-module dispatch (`LoraConfig._register_custom_module`), for `nn.Linear` targets.
"""

from __future__ import annotations

import torch
from torch import nn

UNROLL_DEVICES = ("cuda",)  # device types whose compiled forward unrolls the up-projection (tests add "cpu")


class LoraUp(torch.autograd.Function):
    """base + hs @ B^T: base (..., out), hs (..., r) the scaled rank-r activations, B (out, r) lora_B's weight.

    Forward in eager mode: one matmul and an add. Under torch.compile on CUDA: the r products hs[..., j] * B[:, j]
    summed in fp32 into base, pointwise ops that inductor fuses into the output's consumer. Backward (both):
    d base = g, d hs = g @ B, d B = g^T @ hs, in g's dtype."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, hs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hs, weight)
        w = weight.to(hs.dtype)  # autocast's cast, as lora_B(hs) would make it
        if not (torch.compiler.is_compiling() and base.device.type in UNROLL_DEVICES):
            return base + hs @ w.t()
        acc = base.float()  # (..., out)
        for j in range(w.shape[1]):
            acc = acc + hs[..., j : j + 1].float() * w[:, j].float()
        return acc.to(base.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hs, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (T, out)
        grad_hs = (g @ weight.to(g.dtype)).view(hs.shape).to(hs.dtype)  # (..., r)
        grad_weight = (g.t() @ hs.reshape(-1, hs.shape[-1]).to(g.dtype)).to(weight.dtype)  # (out, r)
        return grad, grad_hs, grad_weight


try:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
except ImportError:  # pragma: no cover - peft is a dependency
    PeftLoraLinear = None


if PeftLoraLinear is not None:

    class RankScaledLoraLinear(PeftLoraLinear):
        """peft's `lora.Linear` whose vanilla forward scales the rank-r activations (see the module docstring)."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            variants = getattr(self, "lora_variant", {})
            if args or kwargs or self.disable_adapters or self.merged or any(a in variants for a in self.active_adapters):
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x)
            result = self.base_layer(x)  # (..., out)
            result_dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                h = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))  # (..., r)
                if type(lora_B) is nn.Linear and lora_B.bias is None and not lora_B._forward_hooks:
                    result = LoraUp.apply(result, h * self.scaling[name], lora_B.weight)
                else:
                    result = result + lora_B(h * self.scaling[name])
            return result.to(result_dtype)


def register_rank_scaled_lora(config) -> bool:
    """Make `config` (a peft LoraConfig) build RankScaledLoraLinear for nn.Linear targets; False where this peft
    has no custom-module dispatch (peft's own Linear is used then)."""
    if PeftLoraLinear is None or not hasattr(config, "_register_custom_module"):
        return False
    config._register_custom_module({nn.Linear: RankScaledLoraLinear})
    return True
