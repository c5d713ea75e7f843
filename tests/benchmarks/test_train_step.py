"""benchmarks/train_step.py's optimizer contract: every system (the peers' manual_step, ours' TrainLoop) steps with
the same AdamW and the same gradient clip; a system that clipped otherwise trains another trajectory (on an H100 at the
8B shape ours ended 1% below HF after 14 steps while ours clipped at 1.0 and HF did not)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_step  # noqa: E402


def _adamw_reference(batches, clip: float) -> torch.Tensor:
    """torch's AdamW on gradients rescaled by hand to norm <= clip (clip 0: as they are)."""
    w = torch.ones(4, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=train_step.LR, weight_decay=train_step.WEIGHT_DECAY)
    for x in batches:
        (w * x).sum().backward()
        if clip:
            w.grad.mul_(min(1.0, clip / (float(w.grad.norm()) + 1e-6)))
        opt.step()
        opt.zero_grad()
    return w.detach()


def test_manual_step_clips_each_gradient_before_adamw():
    # gradients of norm 600, 60 and 6: each scaled to norm 1 by its own factor, which changes AdamW's second update
    batches = [torch.tensor([300.0, -300.0, 300.0, -300.0]) / 10**i for i in range(3)]
    w = torch.ones(4, requires_grad=True)
    step = train_step.manual_step([w], lambda x: (w * x).sum(), autocast=False)
    for x in batches:
        step(x)
    clipped, unclipped = _adamw_reference(batches, train_step.MAX_GRAD_NORM), _adamw_reference(batches, 0.0)
    assert not torch.allclose(clipped, unclipped, rtol=0, atol=1e-7)  # the clip matters here
    torch.testing.assert_close(w.detach(), clipped, rtol=0, atol=1e-7)


def test_ours_steps_with_the_same_optimizer_as_the_peers():
    step = train_step.ours(train_step.tiny_config(), None)
    loop = step.loop
    assert loop.cfg.max_grad_norm == train_step.MAX_GRAD_NORM
    group = loop.optimizer.param_groups[0]
    assert isinstance(loop.optimizer, torch.optim.AdamW)
    assert (group["lr"], group["weight_decay"]) == (train_step.LR, train_step.WEIGHT_DECAY)
