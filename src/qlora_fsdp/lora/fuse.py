"""Our fused LoRA layers on a peft model built elsewhere: the Trainer / SFTTrainer recipe.

    model = peft.get_peft_model(load_model(...), peft.LoraConfig(...))
    fuse_lora(model)                          # before the trainer sees it; {"linears": 224, "mlps": 32} for Llama 3.1 8B
    transformers.Trainer(model=model, ...).train()

Our loop builds its LoRA layers as RankScaledLoraLinear (lora/linear.py: peft's Linear with the scaling on the rank
side, and on CUDA and CPU the rank-r product added inside one kernel) and routes the MLPs through the fused LoRA SwiGLU
(lora/fused_mlp.py). A model from peft.get_peft_model has peft's own Linear: fuse_lora gives its LoRA layers the same
forward, in place. RankScaledLoraLinear adds methods only, no state, so each layer's class is swapped and nothing
else changes: parameters, their names, the adapter files, merging and peft's other features stay peft's. Layers that
are not plain peft Linears (DoRA, other tuners, bnb's 4-bit layers) are left alone; each layer still checks its
adapters at every call and takes peft's forward where the fused one does not apply.
"""

from __future__ import annotations

from torch import nn

from .fused_mlp import patch_lora_swiglu
from .linear import PeftLoraLinear, RankScaledLoraLinear


def fuse_lora(model: nn.Module, *, activation_checkpointing: bool = False) -> dict[str, int]:
    """Give `model`'s peft LoRA Linears our forward and its Llama-style MLPs the fused SwiGLU; how many Linears
    changed class, and how many MLPs go through the fused SwiGLU (none in a model without our LoRA layers).

    activation_checkpointing: whether the model's layers are checkpointed (gradient_checkpointing_enable). With
    it the down projection's lora_A stays out of the SwiGLU kernel, one (T, I) tensor less at the backward peak of a
    recomputed layer (what our loop does with --activation-checkpointing)."""
    if PeftLoraLinear is None:  # pragma: no cover - peft is a dependency
        return {"linears": 0, "mlps": 0}
    linears = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = RankScaledLoraLinear
            linears += 1
    fused = any(isinstance(m, RankScaledLoraLinear) for m in model.modules())  # (swapped now, or built so)
    mlps = patch_lora_swiglu(model, fuse_down_a=not activation_checkpointing) if fused else 0
    return {"linears": linears, "mlps": mlps}
