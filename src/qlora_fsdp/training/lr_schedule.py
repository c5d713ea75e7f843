"""The learning rate of each optimizer step: linear warmup, then cosine decay to 0.

    factor(k) = (k + 1) / warmup                                      k < warmup   (k: 0-based optimizer step)
              = (1 + cos(pi * (k - warmup) / (total - warmup))) / 2   afterwards

The warmup starts at lr / warmup, so the first step trains (transformers' schedule starts at 0: a step spent on
nothing), and reaches the full lr on its last step; the decay is transformers' cosine.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over warmup_cosine_factor (its state_dict resumes like any scheduler's)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, total))
