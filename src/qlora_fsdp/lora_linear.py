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

Registered through peft's custom-module dispatch (`LoraConfig._register_custom_module`), for `nn.Linear` targets.
"""

from __future__ import annotations

import torch
from torch import nn

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
                result = result + lora_B(h * self.scaling[name])
            return result.to(result_dtype)


def register_rank_scaled_lora(config) -> bool:
    """Make `config` (a peft LoraConfig) build RankScaledLoraLinear for nn.Linear targets; False where this peft
    has no custom-module dispatch (peft's own Linear is used then)."""
    if PeftLoraLinear is None or not hasattr(config, "_register_custom_module"):
        return False
    config._register_custom_module({nn.Linear: RankScaledLoraLinear})
    return True
