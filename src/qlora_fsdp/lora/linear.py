"""peft's LoRA Linear with the scaling applied on the rank side.

    peft:  y = base(x) + B(A(drop(x))) * s          x (T, in), A: in -> r, B: r -> out
    here:  y = base(x) + B(A(drop(x)) * s)          the same function; s multiplies a (T, r) tensor

In backward, peft's form hands B the gradient times s: autograd, and a compiled layer, materialize that (T, out)
product beside the unscaled gradient the base weight's input gradient needs. Here B gets the unscaled gradient
and s is applied to (T, r) tensors only. For the Llama 3.1 8B MLP at 2,048 tokens that is two (T, 14,336) bf16
tensors (117 MB) less at the backward peak. The parameters, their names, the saved adapters, merging and every
other peft feature are peft's own: only the vanilla-LoRA forward is overridden (DoRA and other variants, mixed
adapter batches, merged or disabled adapters take peft's path). Rounding differs from peft's order in the last
bit of the LoRA term. On CUDA, a layer with one adapter and no lora_B bias adds B(A(drop(x)) s) to the base output
inside one kernel (kernels/lora_add.py): the (T, out) product is never written.

Registered through peft's custom-module dispatch (`LoraConfig._register_custom_module`), for `nn.Linear` targets.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import rank_product
from ..kernels.lora_add import lora_add

try:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
except ImportError:  # pragma: no cover - peft is a dependency
    PeftLoraLinear = None


if PeftLoraLinear is not None:

    class RankScaledLoraLinear(PeftLoraLinear):
        """peft's `lora.Linear` whose vanilla forward scales the rank-r activations (see the module docstring)."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            names = self.vanilla_adapters()
            if args or kwargs or names is None:
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x)
            result = self.base_layer(x)  # (..., out)
            result_dtype = result.dtype
            name = self.single_unbiased_adapter(names)
            if name is not None and rank_product.takes_fused(x, self.r[name]):
                # one kernel adds the rank-r product to the base output (kernels/lora_add.py)
                return lora_add(result, self.scaled_rank_activations(x, name), self.lora_B[name].weight)
            for name in names:
                result = result + self.lora_B[name](self.scaled_rank_activations(x, name))
            return result.to(result_dtype)

        def vanilla_adapters(self) -> list[str] | None:
            """The active adapters this layer holds, when all take the vanilla `B(A(drop(x)) s)`; None where peft's
            own forward is needed (merged or disabled adapters, DoRA and other variants)."""
            variants = getattr(self, "lora_variant", {})
            if self.disable_adapters or self.merged or any(a in variants for a in self.active_adapters):
                return None
            return [name for name in self.active_adapters if name in self.lora_A]

        def single_unbiased_adapter(self, names: list[str] | None) -> str | None:
            """The adapter when `names` (from vanilla_adapters) is one adapter whose lora_B has no bias: what the
            fused kernels (kernels/lora_add.py, kernels/lora_swiglu.py) take; else None."""
            if not names or len(names) != 1 or self.lora_B[names[0]].bias is not None:
                return None
            return names[0]

        def scaled_rank_activations(self, x: torch.Tensor, name: str) -> torch.Tensor:
            """A(drop(x)) * s of adapter `name`: (..., r)."""
            lora_A = self.lora_A[name]
            return lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))) * self.scaling[name]


def register_rank_scaled_lora(config) -> bool:
    """Make `config` (a peft LoraConfig) build RankScaledLoraLinear for nn.Linear targets; False where this peft
    has no custom-module dispatch (peft's own Linear is used then)."""
    if PeftLoraLinear is None or not hasattr(config, "_register_custom_module"):
        return False
    config._register_custom_module({nn.Linear: RankScaledLoraLinear})
    return True
